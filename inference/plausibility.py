"""The plausibility gate: is this result one the node has reason to believe?

Why: a model that meets an image unlike its training data does not fail loudly;
it draws hundreds of "lesions" along the field of view or the brain surface
(an outside test delivered 321 GTV ROIs to a TPS). The gate runs after
post-processing, on every result, and returns the reasons a result must not be
delivered; an empty list means deliver. The node then writes the outputs but
sends nothing (job state `held`) until a physicist releases or cancels it, and
`dicom-node infer` exits with status 3.

The bounds come from the model package's manifest (`plausibility` section, read
by `inference.model.package`); a package without the section gets
`PlausibilityBounds()`, and a bound set to null switches that check off. The
defaults, and why:

- `max_lesions` = 30. Stereotactic radiosurgery trials treat up to 10-15
  metastases (JLGK0901: 1-10) and patients with dozens are referred for
  whole-brain radiotherapy, which needs no per-lesion GTV. More than 30
  detections is far more often a model out of its domain than a patient; the
  RTSTRUCT writer's own cap (1,000 ROIs) is a format guard, not a clinical one.
- `max_total_volume_cm3` = 100. The summed GTV of one patient rarely exceeds
  30-40 cm3 (the largest single metastases are 4-5 cm across, about 35-65 cm3);
  100 cm3 is a 5.8 cm sphere, beyond which a segmentation is more likely oedema,
  a vessel tree or a bias field than tumour.
- `max_brain_fraction` = 0.10 of the brain volume (about 120 cm3 of an adult
  brain). It agrees with the absolute bound on an adult head and also holds when
  the geometry is wrong (a PixelSpacing off by a factor scales both volumes) or
  the head is small. Until the pipeline measures the brain, the head foreground
  (brain, skull and scalp, about twice the brain) is the denominator, which makes
  this check about twice as lenient; the reason names which was used.
- `max_lesion_diameter_mm` = 80. The largest brain metastases are 4-6 cm
  across; a "lesion" longer than 8 cm spans a hemisphere and is something else
  (an outside test delivered two of 140 mm from an abdominal series).
- `max_brain_volume_cm3` = 2500. An adult intracranial volume is 1.1-1.9 L,
  and the measured mask adds a few millimetres around it (it is regrown and
  closed on ~2 mm blocks; the phantoms' MNI brain measures about 1.9 L);
  a "brain" of more than 2.5 L means the brain mask did not find a brain: a
  body region other than the head, an inverted or otherwise unreadable image,
  or a PixelSpacing too large. There is no lower bound: a slab covering part of
  the brain, or a child's, is legitimately small.
- `max_uncertain_fraction` = 0.5 with `uncertain_band` = 0.1: of the voxels whose
  probability reaches the threshold minus the band (the candidates), at most
  half may lie within the band around the threshold. A trained model is decisive
  inside lesions (probabilities near 1) and uncertain only on a thin rim; an
  output dominated by voxels hovering at the threshold is a model guessing, and
  its lesion count depends on the threshold's last digit. Measured: the demo
  model 0.3.0 on two phantoms it never saw (seeds 90210, 90211, 192x192x60):
  5-7 % of candidates in the band; the deliberately weak test model of
  `tests/conftest.py`: 52-100 %.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import SimpleITK as sitk

from inference.result import InferenceResult


@dataclass(frozen=True)
class PlausibilityBounds:
    """Limits a deliverable result stays within; None switches a check off."""

    max_lesions: int | None = 30
    max_total_volume_cm3: float | None = 100.0
    max_brain_fraction: float | None = 0.10
    max_lesion_diameter_mm: float | None = 80.0
    max_brain_volume_cm3: float | None = 2500.0
    max_uncertain_fraction: float | None = 0.5
    uncertain_band: float = 0.1

    def __post_init__(self) -> None:
        for name in (
            "max_lesions",
            "max_total_volume_cm3",
            "max_brain_fraction",
            "max_lesion_diameter_mm",
            "max_brain_volume_cm3",
            "max_uncertain_fraction",
        ):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"plausibility.{name}: must be a positive number or null, got {value!r}")
        if self.max_lesions is not None and int(self.max_lesions) != self.max_lesions:
            raise ValueError(f"plausibility.max_lesions: must be a whole number, got {self.max_lesions!r}")
        for name in ("max_brain_fraction", "max_uncertain_fraction"):
            value = getattr(self, name)
            if value is not None and value > 1:
                raise ValueError(f"plausibility.{name}: is a fraction (0-1], got {value!r}")
        if not 0 < self.uncertain_band < 0.5:
            raise ValueError(f"plausibility.uncertain_band: must lie in (0, 0.5), got {self.uncertain_band!r}")

    @classmethod
    def from_manifest(cls, section: Any) -> PlausibilityBounds:
        """Bounds from a manifest's `plausibility` object; missing keys keep their defaults.

        Raises `ValueError` naming the key for unknown keys or values out of range.
        """
        if section is None:
            return cls()
        if not isinstance(section, dict):
            raise ValueError(f"plausibility: must be a JSON object, got {type(section).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(section) - known)
        if unknown:
            raise ValueError(f"plausibility: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        for key, value in section.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
                raise ValueError(f"plausibility.{key}: must be a number or null, got {value!r}")
        return cls(**section)

    def to_manifest(self) -> dict[str, Any]:
        """The manifest's `plausibility` object."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def uncertain_fraction(probability: np.ndarray, threshold: float, band: float) -> tuple[float, int]:
    """(share of candidate voxels within `band` of `threshold`, number of candidates).

    Candidates are voxels with probability >= threshold - band; 0.0 when there are none.
    """
    candidates = int(np.count_nonzero(probability >= threshold - band))
    if candidates == 0:
        return 0.0, 0
    near = int(np.count_nonzero(np.abs(probability - threshold) < band))
    return near / candidates, candidates


def check_plausibility(
    result: InferenceResult,
    bounds: PlausibilityBounds,
    *,
    threshold: float,
    brain_volume_cm3: float | None = None,
) -> list[str]:
    """Reasons `result` must not be delivered (empty: deliver), each readable alone.

    `brain_volume_cm3`: the brain's volume when known; otherwise the head
    foreground volume recorded by the pipeline (`result.head_volume_cm3`) is used.
    """
    reasons = []
    count = len(result.lesions)
    if bounds.max_lesions is not None and count > bounds.max_lesions:
        reasons.append(f"{count} lesions, limit {bounds.max_lesions}")
    total = sum(lesion.volume_cm3 for lesion in result.lesions)
    if bounds.max_total_volume_cm3 is not None and total > bounds.max_total_volume_cm3:
        reasons.append(f"total GTV {total:.1f} cm3, limit {bounds.max_total_volume_cm3:g} cm3")
    longest = max((lesion.max_diameter_mm for lesion in result.lesions), default=0.0)
    if bounds.max_lesion_diameter_mm is not None and longest > bounds.max_lesion_diameter_mm:
        reasons.append(f"a lesion {longest:.0f} mm across, limit {bounds.max_lesion_diameter_mm:g} mm")
    if bounds.max_brain_volume_cm3 is not None and brain_volume_cm3 and brain_volume_cm3 > bounds.max_brain_volume_cm3:
        reasons.append(
            f"brain volume {brain_volume_cm3:.0f} cm3, limit {bounds.max_brain_volume_cm3:g} cm3: "
            "the brain mask did not find a brain (another body region, an inverted image, a wrong PixelSpacing?)"
        )
    reference, what = (brain_volume_cm3, "brain") if brain_volume_cm3 else (result.head_volume_cm3, "head")
    if bounds.max_brain_fraction is not None and reference and total > bounds.max_brain_fraction * reference:
        reasons.append(
            f"total GTV {total:.1f} cm3 is {100 * total / reference:.1f} % of the {what} volume "
            f"({reference:.0f} cm3), limit {100 * bounds.max_brain_fraction:g} %"
        )
    if bounds.max_uncertain_fraction is not None and result.probability_map is not None:
        probability = sitk.GetArrayViewFromImage(result.probability_map)
        share, candidates = uncertain_fraction(probability, threshold, bounds.uncertain_band)
        if share > bounds.max_uncertain_fraction:
            reasons.append(
                f"{100 * share:.0f} % of {candidates} candidate voxels lie within {bounds.uncertain_band:g} of the "
                f"probability threshold {threshold:g} (uncertain output), limit {100 * bounds.max_uncertain_fraction:g} %"
            )
    return reasons
