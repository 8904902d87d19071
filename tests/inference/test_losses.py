"""Each loss term against a hand-computed case."""

from __future__ import annotations

import math

import pytest
import torch

from inference.training.losses import (
    UncertaintyWeightedLoss,
    egfr_loss,
    focal_loss,
    gtv_loss,
    soft_dice_loss,
)

# one slice, 2x2 pixels, one tumour pixel; logit 0 means p = 0.5 everywhere
ZERO_LOGITS = torch.zeros(1, 1, 2, 2)
ONE_TUMOUR = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])


def test_soft_dice_by_hand() -> None:
    # intersection 0.5, sum p = 2, sum t = 1, smooth 1: 1 - (1 + 1) / (3 + 1)
    assert soft_dice_loss(ZERO_LOGITS, ONE_TUMOUR).item() == pytest.approx(0.5)


def test_soft_dice_perfect_prediction_is_near_zero() -> None:
    logits = (ONE_TUMOUR * 2 - 1) * 50
    assert soft_dice_loss(logits, ONE_TUMOUR).item() == pytest.approx(0.0, abs=1e-6)


def test_per_sample_dice_by_hand() -> None:
    # image 1 as above: 0.5. Image 2 tumour-free, p = 0.5: 1 - 1 / (2 + 0 + 1) = 2/3.
    logits = torch.zeros(2, 1, 2, 2)
    target = torch.cat([ONE_TUMOUR, torch.zeros(1, 1, 2, 2)])
    assert soft_dice_loss(logits, target, per_sample=True).item() == pytest.approx((0.5 + 2 / 3) / 2)
    # pooled: intersection 0.5, sum p = 4, sum t = 1: 1 - 2 / 6
    assert soft_dice_loss(logits, target).item() == pytest.approx(2 / 3)


def test_per_sample_dice_gives_a_small_lesion_its_images_share() -> None:
    # image 1: a large lesion found perfectly; image 2: a one-pixel lesion missed.
    large = torch.zeros(1, 1, 8, 8)
    large[..., :6, :6] = 1
    small = torch.zeros(1, 1, 8, 8)
    small[..., 0, 0] = 1
    target = torch.cat([large, small])
    logits = torch.cat([(large * 2 - 1) * 50, torch.full((1, 1, 8, 8), -50.0)])
    assert soft_dice_loss(logits, target).item() < 0.03  # pooled: the miss barely counts
    assert soft_dice_loss(logits, target, per_sample=True).item() == pytest.approx(0.25, abs=1e-4)


def test_focal_is_a_sum_over_pixels_by_hand() -> None:
    # tumour: 0.8 * 0.5^2 * ln 2; each background pixel: 0.2 * 0.5^2 * ln 2
    expected = 0.8 * 0.25 * math.log(2) + 3 * 0.2 * 0.25 * math.log(2)
    assert focal_loss(ZERO_LOGITS, ONE_TUMOUR).item() == pytest.approx(expected)


def test_focal_with_confident_pixel_by_hand() -> None:
    logits = torch.full((1, 1, 1, 1), math.log(3.0))  # p = 0.75
    target = torch.ones(1, 1, 1, 1)
    expected = 0.8 * 0.25**2 * -math.log(0.75)
    assert focal_loss(logits, target).item() == pytest.approx(expected, rel=1e-5)


def test_focal_is_averaged_over_slices_not_pixels() -> None:
    single = focal_loss(ZERO_LOGITS, ONE_TUMOUR)
    doubled = focal_loss(ZERO_LOGITS.repeat(2, 1, 1, 1), ONE_TUMOUR.repeat(2, 1, 1, 1))
    assert doubled.item() == pytest.approx(single.item())
    larger_image = focal_loss(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4))
    assert larger_image.item() == pytest.approx(16 * 0.2 * 0.25 * math.log(2))


def test_gtv_loss_is_dice_plus_focal_over_25000() -> None:
    expected = 0.5 + (0.35 * math.log(2)) / 25000
    assert gtv_loss(ZERO_LOGITS, ONE_TUMOUR).item() == pytest.approx(expected)


def test_egfr_cross_entropy_by_hand() -> None:
    logits = torch.tensor([[0.0, math.log(3.0)]])  # p(mutant) = 0.75
    assert egfr_loss(logits, torch.tensor([1])).item() == pytest.approx(-math.log(0.75))
    assert egfr_loss(logits, torch.tensor([0])).item() == pytest.approx(-math.log(0.25))


def test_uncertainty_weighting_arithmetic() -> None:
    weighting = UncertaintyWeightedLoss()
    assert weighting.sigmas == (1.0, 1.0)
    with torch.no_grad():
        weighting.log_s1.fill_(math.log(2.0))
        weighting.log_s2.fill_(math.log(0.5))
    total = weighting.combine(torch.tensor(3.0), torch.tensor(0.5))
    # 3 / (2 * 4) + 0.5 / (2 * 0.25) + log(2 * 0.5)
    assert total.item() == pytest.approx(3 / 8 + 1.0 + 0.0)


def test_uncertainty_weights_start_at_one() -> None:
    total = UncertaintyWeightedLoss().combine(torch.tensor(2.0), torch.tensor(4.0))
    assert total.item() == pytest.approx(1.0 + 2.0)


def test_egfr_term_only_on_tumour_slices() -> None:
    weighting = UncertaintyWeightedLoss()
    gtv_logits = torch.zeros(2, 1, 2, 2)
    target = torch.stack([ONE_TUMOUR[0], torch.zeros(1, 2, 2)])
    egfr_logits = torch.tensor([[0.0, math.log(3.0)], [100.0, -100.0]])
    labels = torch.tensor([1, 1])  # the tumour-free slice would add a huge loss
    total, loss_gtv, loss_egfr = weighting(gtv_logits, egfr_logits, target, labels)
    assert loss_egfr.item() == pytest.approx(-math.log(0.75))
    assert total.item() == pytest.approx(loss_gtv.item() / 2 + loss_egfr.item() / 2)


def test_batch_without_tumour_skips_egfr_term() -> None:
    weighting = UncertaintyWeightedLoss()
    with torch.no_grad():
        weighting.log_s2.fill_(1.0)
    target = torch.zeros(2, 1, 2, 2)
    total, loss_gtv, loss_egfr = weighting(torch.zeros(2, 1, 2, 2), torch.zeros(2, 2), target, torch.tensor([0, 1]))
    assert loss_egfr is None
    assert total.item() == pytest.approx(loss_gtv.item() / 2)  # no log s2 either
    total.backward()
    assert weighting.log_s2.grad is None or weighting.log_s2.grad.item() == 0.0
