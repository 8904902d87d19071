"""Losses of MTSA-Net, exactly as SPEC.md states them.

- `L_GTV = L_Dice + beta * L_Focal`, beta = 1/25000. The focal term is a SUM
  over pixels (hence the tiny beta), alpha = 0.8 on the tumour class, gamma = 2.
- `L_EGFR` = cross-entropy on the 2 logits {wild type, mutant}.
- Joint loss with learned uncertainty weights (Kendall et al. 2018):
  `L = L_GTV / (2 s1^2) + L_EGFR / (2 s2^2) + log(s1 * s2)`. The module learns
  `log s` (initialised to 0, i.e. s = 1) so s stays positive without clamping.

Decisions:
- Soft Dice is computed over the whole batch (all pixels of all slices pooled)
  with smoothing 1. Per-slice Dice would be undefined or saturated on the many
  tumour-free slices the deployed model must also be trained on; the pooled form
  still yields a gradient that pushes false positives down on those slices.
  `per_sample=True` (training's `crop_dice="per-crop"`, for tumour-centred crops
  only) averages one Dice per image instead: pooled, a 5 mm metastasis next to a
  30 mm one in the same batch carries about 3 % of the Dice term (the ratio of
  their sections); per image it carries its crop's full share. A tumour-free
  image's term is then `1 - 1 / (sum(p) + 1)`: it pushes a small false-positive
  mass down (gradient `1 / (sum(p) + 1)^2`), saturates for a large one, and
  otherwise adds an almost constant term to the mean.
- The focal sum is divided by the batch size (a sum over pixels per slice,
  averaged over slices), so beta keeps the paper's meaning whatever the batch.
- EGFR cross-entropy is computed only on slices with tumour (the label is a
  property of the lesions); a batch without any tumour slice contributes no
  EGFR term at all, neither the loss nor its `log s2` regulariser, so s2 is not
  pulled towards zero by batches that say nothing about it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FOCAL_ALPHA = 0.8
FOCAL_GAMMA = 2.0
FOCAL_BETA = 1.0 / 25000.0
DICE_SMOOTH = 1.0


def soft_dice_loss(
    logits: torch.Tensor, target: torch.Tensor, smooth: float = DICE_SMOOTH, *, per_sample: bool = False
) -> torch.Tensor:
    """`1 - (2 sum(p t) + smooth) / (sum(p) + sum(t) + smooth)` over the whole batch,
    or with `per_sample` the mean over images of each image's own Dice loss."""
    probability = torch.sigmoid(logits.float())
    target = target.float()
    dims = tuple(range(1, logits.dim())) if per_sample else tuple(range(logits.dim()))
    intersection = (probability * target).sum(dims)
    dice = (2.0 * intersection + smooth) / (probability.sum(dims) + target.sum(dims) + smooth)
    return 1.0 - dice.mean()


def focal_loss(
    logits: torch.Tensor, target: torch.Tensor, alpha: float = FOCAL_ALPHA, gamma: float = FOCAL_GAMMA
) -> torch.Tensor:
    """Binary focal loss summed over pixels, averaged over the batch's slices.

    Per pixel: `-alpha_t (1 - p_t)^gamma log(p_t)`, alpha_t = alpha for tumour
    and 1 - alpha for background; log(p_t) comes from the logits (stable).
    """
    logits = logits.float()
    target = target.float()
    log_p_t = -F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = log_p_t.exp()
    alpha_t = alpha * target + (1.0 - alpha) * (1.0 - target)
    per_pixel = -alpha_t * (1.0 - p_t) ** gamma * log_p_t
    return per_pixel.sum() / logits.shape[0]


def gtv_loss(
    logits: torch.Tensor, target: torch.Tensor, beta: float = FOCAL_BETA, *, per_sample_dice: bool = False
) -> torch.Tensor:
    """`L_GTV = L_Dice + beta * L_Focal` (Dice pooled over the batch unless `per_sample_dice`)."""
    return soft_dice_loss(logits, target, per_sample=per_sample_dice) + beta * focal_loss(logits, target)


def egfr_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over {wild type (0), mutant (1)}, mean over the given slices."""
    return F.cross_entropy(logits.float(), labels.long())


class UncertaintyWeightedLoss(nn.Module):
    """`L = L_GTV/(2 s1^2) + L_EGFR/(2 s2^2) + log(s1 s2)` with learned `log s1`, `log s2`."""

    def __init__(self) -> None:
        super().__init__()
        self.log_s1 = nn.Parameter(torch.zeros(()))
        self.log_s2 = nn.Parameter(torch.zeros(()))

    @property
    def sigmas(self) -> tuple[float, float]:
        """Current (s1, s2), for logging."""
        return float(self.log_s1.detach().exp()), float(self.log_s2.detach().exp())

    def combine(self, loss_gtv: torch.Tensor, loss_egfr: torch.Tensor | None) -> torch.Tensor:
        """Weight the task losses; `loss_egfr=None` (no tumour slice) drops the EGFR term."""
        total = loss_gtv * 0.5 * torch.exp(-2.0 * self.log_s1) + self.log_s1
        if loss_egfr is not None:
            total = total + loss_egfr * 0.5 * torch.exp(-2.0 * self.log_s2) + self.log_s2
        return total

    def forward(
        self,
        gtv_logits: torch.Tensor,
        egfr_logits: torch.Tensor,
        gtv_target: torch.Tensor,
        egfr_labels: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Joint loss of a batch; returns (total, L_GTV, L_EGFR or None).

        EGFR cross-entropy uses only slices whose target mask has tumour.
        """
        loss_gtv = gtv_loss(gtv_logits, gtv_target)
        has_tumour = gtv_target.flatten(1).amax(dim=1) > 0
        loss_egfr = egfr_loss(egfr_logits[has_tumour], egfr_labels[has_tumour]) if has_tumour.any() else None
        return self.combine(loss_gtv, loss_egfr), loss_gtv, loss_egfr
