"""Evaluate a model package on freshly generated phantoms, through the real path.

Each phantom is written as a DICOM MR series and run through
`inference.pipeline.run_series`, the interface the node itself uses (loading,
pre-processing, model, post-processing back onto the source grid), so the
scores describe what a department would receive, not a shortcut.

Decisions:

- Truth is the phantom's label map on the source grid; prediction is the
  result's `label_map` (lesions above the package's minimum volume only).
- Lesion diameter for the ">= 5 mm" rule: the equivalent-sphere diameter
  `(6 V / pi)^(1/3)` of the true lesion's voxels, measurable on any mask.
- Per-lesion Dice: a true lesion is matched with every predicted component that
  overlaps it; its Dice is against the union of those components (a component
  touching two true lesions counts for both). No overlap = missed, Dice 0.
- Patient scores over the whole volume: Dice, HD95 (mm), voxel precision and
  recall (`inference.evaluation.metrics`). HD95 is `inf` when the truth or the prediction
  is empty; the summary reports the median of the finite values and how many
  were infinite.
- EGFR: the phantom's stored synthetic genotype is the truth (it carries the
  generator's 10 % label noise, as real labels carry errors). "Not assessable"
  results are counted and left out of accuracy, precision, recall, F1 and AUC.
- Seeds: the caller passes them; use seeds never used for training (the demo
  models were trained on seeds from 1000, see the model card).
- Styles (`inference.synthetic.styles`): the same seeds are drawn in each style
  asked for. "Own style" is the training style (``randomised``), "unseen" the
  held-out looks no training phantom has; ``classic`` is the generator up to
  demo model 0.3.0 (the regression set's style).
- Issue 12's figures per style: detection sensitivity for true lesions of at
  least 10 mm (equivalent-sphere diameter); false-positive lesions per case
  (predicted components touching no true lesion); false positives outside the
  brain (of those, the ones with most of their voxels outside the phantom's
  brain truth, `Phantom.brain`). `GOALS` holds the targets, `goals_met` checks them.
- Threshold calibration (`threshold_sweep`): one pipeline run per phantom, then
  the probability map on the source grid is re-thresholded with the package's
  own `extract_lesions` step for every candidate threshold and minimum lesion
  volume. Calibrate on seeds that are neither training nor test seeds, and
  report which ones.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from tqdm import tqdm

from inference.evaluation import metrics
from inference.imaging.postprocess import extract_lesions
from inference.model.package import ModelPackage
from inference.pipeline import run_series
from inference.result import EgfrCall, InferenceResult
from inference.synthetic.phantoms import Phantom, generate_phantom, write_phantom_series

MIN_LESION_DIAMETER_MM = 5.0
SENSITIVITY_DIAMETER_MM = 10.0
OWN_STYLE, UNSEEN_STYLE = "randomised", "unseen"
# Issue 12's goals: (summary key, "min" or "max", bound); lesion Dice by style.
GOALS: dict[str, list[tuple[str, str, float]]] = {
    style: [
        ("lesion_dice_mean", "min", dice),
        ("sensitivity_at_least_10mm", "min", 0.90),
        ("false_positive_lesions_per_case", "max", 0.5),
        ("false_positives_outside_brain", "max", 0),
    ]
    for style, dice in (("classic", 0.80), (OWN_STYLE, 0.80), (UNSEEN_STYLE, 0.75))
}


@dataclass(frozen=True)
class LesionScore:
    """One true lesion and how well it was segmented."""

    seed: int
    label: int
    diameter_mm: float  # equivalent-sphere diameter of the true lesion
    dice: float
    detected: bool


@dataclass(frozen=True)
class PhantomScore:
    """Whole-volume scores and the EGFR result for one phantom."""

    seed: int
    orientation: str
    genotype: int
    egfr_call: str
    egfr_probability: float | None
    dice: float
    hd95_mm: float
    precision: float
    recall: float
    false_positive_lesions: int  # predicted lesions touching no true lesion
    lesions: list[LesionScore] = field(default_factory=list)
    false_positives_outside_brain: int = 0  # of those, the ones mostly outside the brain truth
    style: str = "classic"


def equivalent_diameter_mm(voxels: int, spacing: Iterable[float]) -> float:
    """Diameter of the sphere with the volume of `voxels` voxels of `spacing` (mm)."""
    volume = voxels * float(np.prod(list(spacing)))
    return (6.0 * volume / math.pi) ** (1.0 / 3.0)


def lesion_scores(seed: int, truth: np.ndarray, predicted: np.ndarray, spacing: Iterable[float]) -> list[LesionScore]:
    """Per true lesion: Dice against the union of the predicted components overlapping it."""
    spacing = tuple(spacing)
    components, _ = ndimage.label(predicted > 0, structure=np.ones((3, 3, 3)))
    scores = []
    for label in (int(v) for v in np.unique(truth) if v != 0):
        lesion = truth == label
        touching = np.unique(components[lesion & (components > 0)])
        matched = np.isin(components, touching) if touching.size else np.zeros_like(lesion)
        scores.append(
            LesionScore(
                seed=seed,
                label=label,
                diameter_mm=round(equivalent_diameter_mm(int(lesion.sum()), spacing), 2),
                dice=metrics.dice(matched, lesion),
                detected=bool(touching.size),
            )
        )
    return scores


def score_result(phantom: Phantom, result: InferenceResult) -> PhantomScore:
    """Compare one pipeline result with its phantom's truth."""
    truth = sitk.GetArrayFromImage(phantom.mask)
    predicted = sitk.GetArrayFromImage(result.label_map)
    if truth.shape != predicted.shape:
        raise ValueError(f"phantom {phantom.seed}: result grid {predicted.shape} != truth grid {truth.shape}")
    spacing = phantom.mask.GetSpacing()[::-1]  # array axis order
    lesions = lesion_scores(phantom.seed, truth, predicted, spacing)
    components, n_components = ndimage.label(predicted > 0, structure=np.ones((3, 3, 3)))
    hit = set(np.unique(components[(truth > 0) & (components > 0)]).tolist())
    false_positives = [label for label in range(1, n_components + 1) if label not in hit]
    return PhantomScore(
        seed=phantom.seed,
        orientation=phantom.orientation,
        genotype=phantom.genotype,
        egfr_call=result.egfr.call.value,
        egfr_probability=result.egfr.mutant_probability,
        dice=metrics.dice(predicted > 0, truth > 0),
        hd95_mm=metrics.hd95_mm(predicted > 0, truth > 0, spacing),
        precision=metrics.voxel_precision(predicted > 0, truth > 0),
        recall=metrics.voxel_recall(predicted > 0, truth > 0),
        false_positive_lesions=len(false_positives),
        lesions=lesions,
        false_positives_outside_brain=_outside_brain(components, false_positives, phantom),
        style=phantom.look.style,
    )


def _outside_brain(components: np.ndarray, labels: list[int], phantom: Phantom) -> int:
    """How many of the components `labels` have most of their voxels outside the phantom's brain truth."""
    if not labels:
        return 0
    brain = sitk.GetArrayViewFromImage(phantom.brain) > 0
    sizes = ndimage.sum_labels(np.ones(components.shape), components, labels)
    inside = ndimage.sum_labels(brain, components, labels)
    return int(np.count_nonzero(inside < 0.5 * sizes))


def evaluate_phantom(
    seed: int,
    package: ModelPackage,
    work_dir: Path,
    device: str | None = None,
    phantom_options: dict[str, Any] | None = None,
) -> PhantomScore:
    """Generate phantom `seed` (`phantom_options` go to `generate_phantom`), run it as DICOM, score it."""
    phantom = generate_phantom(seed, **(phantom_options or {}))
    files = write_phantom_series(phantom, work_dir / f"phantom-{seed}")
    return score_result(phantom, run_series(files, package, device=device))


def _mean(values: list[float]) -> float | None:
    return round(float(np.mean(values)), 4) if values else None


def summarise(scores: list[PhantomScore], min_diameter_mm: float = MIN_LESION_DIAMETER_MM) -> dict[str, Any]:
    """Aggregate scores: lesion Dice (>= min diameter), detection, false positives, patient segmentation, EGFR."""
    lesions = [lesion for score in scores for lesion in score.lesions if lesion.diameter_mm >= min_diameter_mm]
    large = [lesion for score in scores for lesion in score.lesions if lesion.diameter_mm >= SENSITIVITY_DIAMETER_MM]
    hd95 = [s.hd95_mm for s in scores if math.isfinite(s.hd95_mm)]
    assessable = [s for s in scores if s.egfr_call != EgfrCall.NOT_ASSESSABLE.value]
    truth = [s.genotype for s in assessable]
    called = [int(s.egfr_call == EgfrCall.MUTANT.value) for s in assessable]
    probabilities = cast(list[float], [s.egfr_probability for s in assessable])  # assessable: never None
    auc = metrics.roc_auc(truth, probabilities) if assessable else math.nan
    return {
        "phantoms": len(scores),
        "lesions_at_least_mm": min_diameter_mm,
        "lesions": len(lesions),
        "lesion_dice_mean": _mean([lesion.dice for lesion in lesions]),
        "lesion_dice_median": round(float(np.median([lesion.dice for lesion in lesions])), 4) if lesions else None,
        "lesion_detection_rate": _mean([float(lesion.detected) for lesion in lesions]),
        "lesions_at_least_10mm": len(large),
        "sensitivity_at_least_10mm": _mean([float(lesion.detected) for lesion in large]),
        "patient_dice_mean": _mean([s.dice for s in scores]),
        "hd95_mm_median": round(float(np.median(hd95)), 2) if hd95 else None,
        "hd95_infinite": len(scores) - len(hd95),
        "voxel_precision_mean": _mean([s.precision for s in scores]),
        "voxel_recall_mean": _mean([s.recall for s in scores]),
        "false_positive_lesions": sum(s.false_positive_lesions for s in scores),
        "false_positive_lesions_per_case": _mean([float(s.false_positive_lesions) for s in scores]),
        "false_positives_outside_brain": sum(s.false_positives_outside_brain for s in scores),
        "egfr_assessable": len(assessable),
        "egfr_accuracy": round(metrics.accuracy(truth, called), 4) if assessable else None,
        "egfr_precision": round(metrics.precision(truth, called), 4) if assessable else None,
        "egfr_recall": round(metrics.recall(truth, called), 4) if assessable else None,
        "egfr_f1": round(metrics.f1(truth, called), 4) if assessable else None,
        "egfr_auc": None if math.isnan(auc) else round(auc, 4),
    }


def goals_met(style: str, summary: dict[str, Any]) -> list[tuple[str, bool]]:
    """Each goal of `style` as ("key >= bound", met); an undefined figure (no lesions) is not met."""
    checks = []
    for key, sense, bound in GOALS.get(style, []):
        value = summary.get(key)
        met = value is not None and (value >= bound if sense == "min" else value <= bound)
        checks.append((f"{key} {'>=' if sense == 'min' else '<='} {bound:g}", met))
    return checks


def evaluate_package(
    package: ModelPackage,
    seeds: Iterable[int],
    *,
    device: str | None = None,
    progress: bool = True,
    phantom_options: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], list[PhantomScore]]:
    """Scores of `package` on the phantoms `seeds`: (summary, per-phantom scores).

    `phantom_options` go to `generate_phantom` (``{"style": "unseen"}`` for the held-out looks).
    """
    seeds = list(seeds)
    with tempfile.TemporaryDirectory(prefix="dicom-node-eval-") as tmp:
        scores = [
            evaluate_phantom(seed, package, Path(tmp), device, phantom_options)
            for seed in tqdm(seeds, desc="evaluating", disable=not progress)
        ]
    return summarise(scores), scores


def threshold_sweep(
    package: ModelPackage,
    seeds: Iterable[int],
    thresholds: Iterable[float],
    *,
    min_volumes_mm3: Iterable[float] | None = None,
    min_diameter_mm: float = MIN_LESION_DIAMETER_MM,
    device: str | None = None,
    progress: bool = True,
    phantom_options: dict[str, Any] | None = None,
) -> dict[tuple[float, float], dict[str, Any]]:
    """Segmentation summary per (GTV probability threshold, minimum lesion volume in mm3).

    Minimum volumes default to the package's own. EGFR keys are left out: they do not move.
    """
    volumes = [package.min_lesion_volume_mm3] if min_volumes_mm3 is None else list(min_volumes_mm3)
    pairs = list(dict.fromkeys((t, v) for t in thresholds for v in volumes))  # each setting once
    if not pairs:
        raise ValueError("threshold_sweep: no thresholds or no minimum volumes to try")
    per_setting: dict[tuple[float, float], list[PhantomScore]] = {pair: [] for pair in pairs}
    with tempfile.TemporaryDirectory(prefix="dicom-node-sweep-") as tmp:
        for seed in tqdm(list(seeds), desc="sweeping", disable=not progress):
            phantom = generate_phantom(seed, **(phantom_options or {}))
            result = run_series(write_phantom_series(phantom, Path(tmp) / f"phantom-{seed}"), package, device=device)
            assert result.probability_map is not None and result.brain_mask is not None  # run_series sets both
            for threshold, min_volume in pairs:
                label_map, lesions = extract_lesions(
                    result.probability_map,
                    brain_mask=result.brain_mask,
                    threshold=threshold,
                    min_volume_mm3=min_volume,
                )
                rethresholded = replace(result, label_map=label_map, lesions=lesions)
                per_setting[(threshold, min_volume)].append(score_result(phantom, rethresholded))
    return {
        pair: {k: v for k, v in summarise(scores, min_diameter_mm).items() if not k.startswith("egfr")}
        for pair, scores in per_setting.items()
    }


def scores_as_dicts(scores: list[PhantomScore]) -> list[dict[str, Any]]:
    """JSON-ready per-phantom scores (inf HD95 becomes None)."""
    rows = []
    for score in scores:
        row = asdict(score)
        row["hd95_mm"] = score.hd95_mm if math.isfinite(score.hd95_mm) else None
        rows.append(row)
    return rows
