"""The one interface the node uses: a series' files in, lesions and EGFR out, each stage timed.

Why: `dicom_node` (worker, `infer`, `demo`) and the evaluation all run the same
chain, screen -> load -> preprocess -> model -> postprocess (MONAI-Deploy-style
named stages), so a change to any stage reaches every caller and every timing is
recorded the same way.

Decisions:

- "screen" comes first: the headers are checked against the package's
  `accepts` (and a routing rule's name patterns) before any pixel is decoded
  (`inference.imaging.screening`); a series the model does not accept raises
  `SeriesRefused`, a defective one `SeriesError`.
- `timings_s` holds the six stages "screen", "load", "brain mask", "preprocess",
  "model", "postprocess" in seconds (they add up to the run), plus "preprocess: n4", the
  part of "preprocess" spent in N4 (reported because N4 must stay under a quarter
  of `infer`; not to be added to the total).
- Every series gets a brain mask (`imaging/brain_mask.py`) before anything else
  is computed from its pixels; it feeds the "zscore-brain" normalisation and is
  the only region where `extract_lesions` may report a lesion.
- "model" includes building the network from the package's weights, unless
  the caller passes a network it built from the package before (`model=`: a
  worker builds it once per device and reuses it across jobs); it then runs on
  that network's device.
- The model input size, whether to run N4 and the normalisation come from the
  package manifest's `input` (what the model was trained with; a manifest without
  `normalisation` means "zscore-foreground", the only one before it was declared); the probability threshold and
  minimum lesion volume from its `thresholds`.
- Probabilities go back to the source grid (linear), then `extract_lesions`.
  The EGFR rule's per-slice tumour area is measured on the model slices
  (pixels above threshold x model pixel area, mm2), counting only pixels of
  lesions that survived the minimum volume: a speck that is not reported as a
  lesion does not vote, and no reported lesion means "not assessable".
- A model output that is not finite (NaN or infinity, from pixel values the
  model cannot read) fails the job at once (`InferenceError`): a retry would
  compute the same.
- After post-processing the plausibility gate (`inference.plausibility`, bounds
  from the manifest's `plausibility`) fills `hold_reasons`; the caller decides
  what a held result means (the worker holds the job, `infer` exits with 3).
- `write_offline_outputs` writes `mask.nii.gz` (the uint16 label map in source
  geometry) and `summary.json`; the dict it returns is the JSON content.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import SimpleITK as sitk

from inference.errors import InferenceError
from inference.imaging import preprocess
from inference.imaging.brain_mask import brain_mask
from inference.imaging.postprocess import aggregate_egfr, extract_lesions
from inference.imaging.screening import NamePatterns, screen_series
from inference.imaging.volume_loader import load_series
from inference.plausibility import check_plausibility
from inference.result import InferenceResult

if TYPE_CHECKING:
    from inference.model.mtsa_net import MTSANet
    from inference.model.package import ModelPackage


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[stage] = time.perf_counter() - start


def run_series(
    files: Sequence[Path],
    package: ModelPackage,
    *,
    device: str | None = None,
    model: MTSANet | None = None,
    names: NamePatterns | None = None,
    batch_size: int = 8,
) -> InferenceResult:
    """Run the whole engine on one series; raises `SeriesError` for an unusable series and
    `SeriesRefused` for one the package does not accept (`names`: the routing rule's own patterns).

    `model`: `package`'s network, already built (and on its device); else it is built
    here on `device`. Give one or the other.
    """
    if model is not None and device is not None:
        raise ValueError("give run_series a device or a built model, not both (the model is on its device)")
    from inference.model.predictor import predict_slices, select_device

    timings: dict[str, float] = {}
    size = package.input_size
    with _timed(timings, "screen"):
        screening = screen_series(files, package.accepts, model_size=size, names=names)
    with _timed(timings, "load"):
        series = load_series(files)
    with _timed(timings, "brain mask"):
        brain = brain_mask(series.image)
    with _timed(timings, "preprocess"):
        parts: dict[str, float] = {}
        model_input = preprocess.prepare_model_input(
            series.image,
            size=size,
            n4=bool(package.input.get("n4", True)),
            normalisation=str(package.input.get("normalisation", "zscore-foreground")),
            brain=brain,
            timings=parts,
        )
    if "n4" in parts:
        timings["preprocess: n4"] = parts["n4"]
    with _timed(timings, "model"):
        if model is None:
            torch_device = select_device(device)
            model = package.build_model(torch_device)
        else:
            torch_device = next(model.parameters()).device
        gtv_prob, mutant_prob = predict_slices(model, model_input.slices, device=torch_device, batch_size=batch_size)
    if not (np.isfinite(gtv_prob).all() and np.isfinite(mutant_prob).all()):  # the same on a retry: fail now
        raise InferenceError(
            "the model's output is not finite (NaN or infinity) on this series: no result can be "
            "derived from it; the series' pixel values are likely outside anything the model can read"
        )
    with _timed(timings, "postprocess"):
        threshold, min_volume = package.gtv_threshold, package.min_lesion_volume_mm3
        probability = preprocess.to_source_grid(gtv_prob, model_input, series.image)
        label_map, lesions = extract_lesions(
            probability, brain_mask=brain, threshold=threshold, min_volume_mm3=min_volume
        )
        reported = preprocess.to_model_grid(label_map, model_input, nearest=True) > 0
        areas = ((gtv_prob > threshold) & reported).sum(axis=(1, 2)) * model_input.pixel_area_mm2
        egfr = aggregate_egfr(areas, mutant_prob)
        result = InferenceResult(
            series=series,
            label_map=label_map,
            probability_map=probability,
            lesions=lesions,
            egfr=egfr,
            model=package.identity,
            timings_s=timings,
            head_volume_cm3=model_input.head_volume_cm3,
            screening=screening.contrast,
            brain_mask=brain,
        )
        result.hold_reasons = check_plausibility(
            result, package.plausibility, threshold=threshold, brain_volume_cm3=_brain_volume_cm3(result)
        )
    return result


def summary_of(result: InferenceResult) -> dict[str, Any]:
    """The JSON-ready summary: series UIDs, screening evidence, model, brain volume, lesions, EGFR, timings."""
    first = result.series.datasets[0]
    return {
        "series": {
            "study_instance_uid": str(first.get("StudyInstanceUID", "")),
            "series_instance_uid": str(first.get("SeriesInstanceUID", "")),
            "frame_of_reference_uid": str(first.get("FrameOfReferenceUID", "")),
            "slices": len(result.series.files),
            "size": list(result.series.image.GetSize()),
            "spacing_mm": [round(v, 4) for v in result.series.image.GetSpacing()],
        },
        "screening": result.screening,
        "model": {
            "name": result.model.name,
            "version": result.model.version,
            "is_demo": result.model.is_demo,
            "display": result.model.display,
        },
        "brain_volume_cm3": _brain_volume_cm3(result),
        "lesions": [
            {
                "name": lesion.name,
                "label": lesion.label,
                "voxel_count": lesion.voxel_count,
                "volume_cm3": round(lesion.volume_cm3, 4),
                "max_diameter_mm": round(lesion.max_diameter_mm, 2),
                "centroid_mm": [round(v, 2) for v in lesion.centroid_mm],
            }
            for lesion in result.lesions
        ],
        "egfr": {
            "call": result.egfr.call.value,
            "mutant_probability": (
                None if result.egfr.mutant_probability is None else round(result.egfr.mutant_probability, 4)
            ),
            "slices_used": result.egfr.slices_used,
        },
        "timings_s": {stage: round(seconds, 3) for stage, seconds in result.timings_s.items()},
        "plausibility": {"held": bool(result.hold_reasons), "reasons": list(result.hold_reasons)},
    }


def _brain_volume_cm3(result: InferenceResult) -> float | None:
    """Volume of the brain mask (the searched region), for plausibility checks against lesion volumes."""
    if result.brain_mask is None:
        return None
    voxels = int(np.count_nonzero(sitk.GetArrayViewFromImage(result.brain_mask)))
    return round(voxels * float(np.prod(result.brain_mask.GetSpacing())) / 1000.0, 2)


def write_offline_outputs(result: InferenceResult, out_dir: Path) -> dict[str, Any]:
    """Write `mask.nii.gz` and `summary.json` into `out_dir`; return the summary."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(result.label_map, str(out_dir / "mask.nii.gz"), useCompression=True)
    summary = summary_of(result)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary
