"""Metrics on hand-made masks with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from inference.evaluation import metrics


def slabs(z_a: int, z_b: int, thickness: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Two 2-voxel-thick 4x4 slabs at different z: every voxel is a surface voxel."""
    a = np.zeros((16, 8, 8), bool)
    b = np.zeros_like(a)
    a[z_a : z_a + thickness, 2:6, 2:6] = True
    b[z_b : z_b + thickness, 2:6, 2:6] = True
    return a, b


def test_overlap_scores_by_hand() -> None:
    pred = np.array([1, 1, 1, 0, 0, 0])
    truth = np.array([0, 1, 1, 1, 1, 0])
    assert metrics.dice(pred, truth) == pytest.approx(4 / 7)
    assert metrics.jaccard(pred, truth) == pytest.approx(2 / 5)
    assert metrics.voxel_precision(pred, truth) == pytest.approx(2 / 3)
    assert metrics.voxel_recall(pred, truth) == pytest.approx(1 / 2)


def test_empty_mask_conventions() -> None:
    empty, full = np.zeros((4, 4), bool), np.ones((4, 4), bool)
    for score in (metrics.dice, metrics.jaccard, metrics.voxel_precision, metrics.voxel_recall):
        assert score(empty, empty) == 1.0
        assert score(empty, full) == 0.0
        assert score(full, empty) == 0.0
    assert metrics.hd95_mm(empty, empty, (1, 1)) == 0.0
    assert metrics.hd95_mm(empty, full, (1, 1)) == math.inf
    assert metrics.surface_dice(full, empty, (1, 1), 2.0) == 0.0
    assert metrics.surface_dice(empty, empty, (1, 1), 2.0) == 1.0


def test_hd95_of_shifted_slabs_uses_anisotropic_spacing() -> None:
    a, b = slabs(2, 10)  # voxel distances 7 and 8 along axis 0, half each
    assert metrics.hd95_mm(a, b, (3.0, 1.0, 1.0)) == pytest.approx(24.0)
    assert metrics.hd95_mm(b, a, (3.0, 1.0, 1.0)) == pytest.approx(24.0)
    assert metrics.hd95_mm(a, b, (1.0, 1.0, 3.0)) == pytest.approx(8.0)  # axis order matters


def test_surface_dice_of_shifted_slabs() -> None:
    a, b = slabs(2, 10)  # distances 21 mm and 24 mm, half each
    spacing = (3.0, 1.0, 1.0)
    assert metrics.surface_dice(a, b, spacing, 24.0) == pytest.approx(1.0)
    assert metrics.surface_dice(a, b, spacing, 22.0) == pytest.approx(0.5)
    assert metrics.surface_dice(a, b, spacing, 20.0) == pytest.approx(0.0)


def test_identical_masks_have_zero_distance() -> None:
    a, _ = slabs(2, 10)
    assert metrics.hd95_mm(a, a, (2.0, 0.5, 0.5)) == 0.0
    assert metrics.surface_dice(a, a, (2.0, 0.5, 0.5), 0.0) == 1.0


def test_surface_is_the_boundary_layer() -> None:
    cube = np.zeros((7, 7, 7), bool)
    cube[1:6, 1:6, 1:6] = True
    assert metrics.surface(cube).sum() == 5**3 - 3**3


def brute_force_hd95(a: np.ndarray, b: np.ndarray, spacing: tuple[float, ...]) -> float:
    points_a = np.argwhere(metrics.surface(a)) * np.asarray(spacing)
    points_b = np.argwhere(metrics.surface(b)) * np.asarray(spacing)
    distances = cdist(points_a, points_b)
    return float(np.percentile(np.concatenate([distances.min(1), distances.min(0)]), 95))


def test_hd95_matches_brute_force_on_random_blobs() -> None:
    rng = np.random.default_rng(3)
    a = rng.random((10, 12, 12)) > 0.7
    b = rng.random((10, 12, 12)) > 0.7
    spacing = (2.5, 0.9, 0.7)
    assert metrics.hd95_mm(a, b, spacing) == pytest.approx(brute_force_hd95(a, b, spacing))


def test_shape_and_spacing_mismatch_raise() -> None:
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.dice(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="spacing"):
        metrics.hd95_mm(np.ones((3, 3)), np.ones((3, 3)), (1.0, 1.0, 1.0))


def test_patient_classification_metrics_by_hand() -> None:
    truth = [1, 1, 0, 0, 1]
    called = [1, 0, 0, 1, 1]  # TP 2, FN 1, FP 1, TN 1
    assert metrics.accuracy(truth, called) == pytest.approx(3 / 5)
    assert metrics.precision(truth, called) == pytest.approx(2 / 3)
    assert metrics.recall(truth, called) == pytest.approx(2 / 3)
    assert metrics.f1(truth, called) == pytest.approx(2 / 3)


def test_precision_without_mutant_calls_is_zero() -> None:
    assert metrics.precision([1, 0], [0, 0]) == 0.0
    assert metrics.f1([0, 0], [0, 0]) == 0.0


def test_roc_auc_by_hand_with_ties_and_single_class() -> None:
    truth = [1, 1, 0, 0, 1]
    scores = [0.9, 0.4, 0.35, 0.8, 0.7]  # 4 of 6 positive-negative pairs ordered correctly
    assert metrics.roc_auc(truth, scores) == pytest.approx(4 / 6)
    assert metrics.roc_auc([1, 0], [0.5, 0.5]) == pytest.approx(0.5)
    assert metrics.roc_auc([0, 1], [0.2, 0.8]) == 1.0
    assert math.isnan(metrics.roc_auc([1, 1], [0.2, 0.8]))


def test_invalid_labels_raise() -> None:
    with pytest.raises(ValueError, match="0 \\(wild type\\) or 1"):
        metrics.accuracy([2, 0], [1, 0])
