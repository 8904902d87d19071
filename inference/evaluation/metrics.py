"""Segmentation and classification metrics (definitions after Primakov et al.).

Masks are boolean-like numpy arrays of any dimension; `spacing` gives the voxel
size in mm *per array axis, in array order* (for a SimpleITK image that is
`image.GetSpacing()[::-1]`), so anisotropic MR voxels are measured correctly.

Decisions:
- Surfaces are the mask voxels with at least one face-neighbour outside the mask
  (mask minus its erosion with the face-connected structuring element; borders
  of the array count as outside). Distances are Euclidean in mm between surface
  voxel centres, from `scipy.ndimage.distance_transform_edt` with `sampling`.
- HD95 is the 95th percentile of the pooled directed surface distances of both
  directions (A->B and B->A), the convention of medpy's `hd95`.
- Empty masks: when both prediction and truth are empty the prediction is
  perfect (Dice, Jaccard, surface Dice, precision, recall = 1.0; HD95 = 0.0).
  When exactly one is empty, the overlap scores are 0.0 and HD95 is `inf`
  (the distance to a surface that does not exist is unbounded; callers that
  average HD95 must decide how to treat it, and say so).
- Patient-level labels are 1 = EGFR mutant (the positive class), 0 = wild type.
  A ratio with a zero denominator (e.g. precision when nothing was called
  mutant) is 0.0, as scikit-learn's `zero_division=0`; ROC AUC is the
  rank-based Mann-Whitney estimate with ties counted one half, and `nan` when
  only one class is present (it is undefined, not 0.5).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from scipy.stats import rankdata

Spacing = Sequence[float]


def _as_bool(mask: np.ndarray) -> np.ndarray:
    return np.asarray(mask).astype(bool, copy=False)


def _overlap(pred: np.ndarray, truth: np.ndarray) -> tuple[int, int, int]:
    """(true positives, false positives, false negatives) in voxels."""
    pred, truth = _as_bool(pred), _as_bool(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"mask shapes differ: {pred.shape} vs {truth.shape}")
    tp = int(np.count_nonzero(pred & truth))
    return tp, int(np.count_nonzero(pred)) - tp, int(np.count_nonzero(truth)) - tp


def _ratio(numerator: float, denominator: float, both_empty: bool) -> float:
    if denominator == 0:
        return 1.0 if both_empty else 0.0
    return numerator / denominator


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """`2|A∩B| / (|A|+|B|)`; 1.0 when both are empty."""
    tp, fp, fn = _overlap(pred, truth)
    return _ratio(2 * tp, 2 * tp + fp + fn, both_empty=tp + fp + fn == 0)


def jaccard(pred: np.ndarray, truth: np.ndarray) -> float:
    """`|A∩B| / |A∪B|`; 1.0 when both are empty."""
    tp, fp, fn = _overlap(pred, truth)
    return _ratio(tp, tp + fp + fn, both_empty=tp + fp + fn == 0)


def voxel_precision(pred: np.ndarray, truth: np.ndarray) -> float:
    """`TP / (TP + FP)` in voxels; 1.0 when both are empty, 0.0 when only the prediction is."""
    tp, fp, fn = _overlap(pred, truth)
    return _ratio(tp, tp + fp, both_empty=tp + fp + fn == 0)


def voxel_recall(pred: np.ndarray, truth: np.ndarray) -> float:
    """`TP / (TP + FN)` in voxels; 1.0 when both are empty, 0.0 when only the truth is."""
    tp, fp, fn = _overlap(pred, truth)
    return _ratio(tp, tp + fn, both_empty=tp + fp + fn == 0)


def surface(mask: np.ndarray) -> np.ndarray:
    """Boolean surface voxels: in the mask with a face-neighbour outside it."""
    mask = _as_bool(mask)
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def _directed_distances(from_surface: np.ndarray, to_surface: np.ndarray, spacing: Spacing) -> np.ndarray:
    """Distance (mm) from every voxel of `from_surface` to the nearest voxel of `to_surface`."""
    distance_map = ndimage.distance_transform_edt(~to_surface, sampling=tuple(spacing))
    return distance_map[from_surface]


def _check_spacing(mask: np.ndarray, spacing: Spacing) -> None:
    if len(spacing) != np.ndim(mask):
        raise ValueError(f"spacing {tuple(spacing)} does not match a {np.ndim(mask)}-D mask")


def surface_distances(pred: np.ndarray, truth: np.ndarray, spacing: Spacing) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances in mm: (pred -> truth, truth -> pred); both masks non-empty."""
    _check_spacing(pred, spacing)
    pred_surface, truth_surface = surface(pred), surface(truth)
    return (
        _directed_distances(pred_surface, truth_surface, spacing),
        _directed_distances(truth_surface, pred_surface, spacing),
    )


def _emptiness(pred: np.ndarray, truth: np.ndarray) -> tuple[bool, bool]:
    pred, truth = _as_bool(pred), _as_bool(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"mask shapes differ: {pred.shape} vs {truth.shape}")
    return not pred.any(), not truth.any()


def hd95_mm(pred: np.ndarray, truth: np.ndarray, spacing: Spacing) -> float:
    """95th percentile of the pooled symmetric surface distances in mm."""
    pred_empty, truth_empty = _emptiness(pred, truth)
    if pred_empty or truth_empty:
        return 0.0 if pred_empty and truth_empty else math.inf
    forward, backward = surface_distances(pred, truth, spacing)
    return float(np.percentile(np.concatenate([forward, backward]), 95))


def surface_dice(pred: np.ndarray, truth: np.ndarray, spacing: Spacing, tau_mm: float) -> float:
    """Fraction of both surfaces lying within `tau_mm` of the other surface."""
    pred_empty, truth_empty = _emptiness(pred, truth)
    if pred_empty or truth_empty:
        return 1.0 if pred_empty and truth_empty else 0.0
    forward, backward = surface_distances(pred, truth, spacing)
    within = np.count_nonzero(forward <= tau_mm) + np.count_nonzero(backward <= tau_mm)
    return within / (forward.size + backward.size)


def _binary_counts(y_true: Sequence[int], y_pred: Sequence[int]) -> tuple[int, int, int, int]:
    """(TP, FP, FN, TN) with 1 = mutant as the positive class."""
    truth = np.asarray(y_true).astype(int)
    called = np.asarray(y_pred).astype(int)
    if truth.shape != called.shape:
        raise ValueError(f"label counts differ: {truth.shape} vs {called.shape}")
    if not np.isin(truth, (0, 1)).all() or not np.isin(called, (0, 1)).all():
        raise ValueError("labels must be 0 (wild type) or 1 (mutant)")
    tp = int(np.sum((truth == 1) & (called == 1)))
    fp = int(np.sum((truth == 0) & (called == 1)))
    fn = int(np.sum((truth == 1) & (called == 0)))
    tn = int(np.sum((truth == 0) & (called == 0)))
    return tp, fp, fn, tn


def _safe_ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0


def accuracy(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Fraction of patients called correctly (0.0 for no patients)."""
    tp, fp, fn, tn = _binary_counts(y_true, y_pred)
    return _safe_ratio(tp + tn, tp + fp + fn + tn)


def precision(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Positive predictive value of the "mutant" call."""
    tp, fp, _, _ = _binary_counts(y_true, y_pred)
    return _safe_ratio(tp, tp + fp)


def recall(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Sensitivity for mutants."""
    tp, _, fn, _ = _binary_counts(y_true, y_pred)
    return _safe_ratio(tp, tp + fn)


def f1(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Harmonic mean of precision and recall: `2TP / (2TP + FP + FN)`."""
    tp, fp, fn, _ = _binary_counts(y_true, y_pred)
    return _safe_ratio(2 * tp, 2 * tp + fp + fn)


def roc_auc(y_true: Sequence[int], scores: Sequence[float]) -> float:
    """Rank-based ROC AUC (Mann-Whitney U / (n_pos n_neg)); `nan` with a single class."""
    truth = np.asarray(y_true).astype(int)
    values = np.asarray(scores, dtype=float)
    if truth.shape != values.shape:
        raise ValueError(f"label and score counts differ: {truth.shape} vs {values.shape}")
    n_pos = int(np.sum(truth == 1))
    n_neg = int(np.sum(truth == 0))
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rankdata(values)
    u_statistic = ranks[truth == 1].sum() - n_pos * (n_pos + 1) / 2
    return float(u_statistic / (n_pos * n_neg))
