"""What one inference run produces: the single hand-over object of the engine.

`dicom_node` drives inference through one small interface
(`inference.pipeline.run_series(files, package) -> InferenceResult`) and the
DICOM writers (`inference.outputs.rtstruct`, `inference.outputs.sr`, `inference.outputs.seg`) consume
an `InferenceResult` plus the source headers. Keeping these types in one
module, free of torch and networking, lets each side be tested alone.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk


class EgfrCall(str, enum.Enum):
    """Patient-level EGFR call. "not assessable" when no tumour was found."""

    MUTANT = "mutant"
    WILD_TYPE = "wild type"
    NOT_ASSESSABLE = "not assessable"


@dataclass(frozen=True)
class ModelIdentity:
    """Who produced the result; written into every output."""

    name: str
    version: str
    is_demo: bool

    @property
    def display(self) -> str:
        """Name, version and, for the demo model, the not-for-clinical-use warning."""
        text = f"{self.name} {self.version}"
        return f"{text} (DEMO MODEL, synthetic data, NOT FOR CLINICAL USE)" if self.is_demo else text


@dataclass(frozen=True)
class Lesion:
    """One 3D connected component of the predicted GTV, numbered by size (1 = largest)."""

    label: int  # value of this lesion in InferenceResult.label_map
    name: str  # "GTV_1" .. "GTV_n"
    voxel_count: int
    volume_cm3: float
    max_diameter_mm: float  # maximum 3D Feret diameter in patient space
    centroid_mm: tuple[float, float, float]  # LPS patient coordinates


@dataclass(frozen=True)
class EgfrPrediction:
    """Patient-level EGFR by the paper's rule (upper 50 % of tumour slices by area)."""

    call: EgfrCall
    mutant_probability: float | None  # None when not assessable
    slices_used: int  # number of slices averaged (0 when not assessable)


@dataclass
class LoadedSeries:
    """A validated source series: a volume with exact geometry plus its headers.

    `image` is float32 with origin, spacing and direction cosines taken from the
    DICOM headers; `datasets[k]` (headers only, no pixel data) and `files[k]` are
    the source instance of slice index k of `image` (SimpleITK index order x, y, k).
    """

    image: sitk.Image
    datasets: list[pydicom.Dataset]
    files: list[Path]


@dataclass
class InferenceResult:
    """Lesion masks in the exact source geometry plus predictions and timings.

    `label_map` is a uint16 SimpleITK image with the source series' geometry
    (same size, origin, spacing, direction as `series.image`): 0 background,
    lesion i has value `lesions[i-1].label`. `head_volume_cm3` is the head
    foreground's volume (the plausibility gate's denominator until the brain is
    measured); `hold_reasons` are the plausibility gate's reasons not to deliver
    the result (empty: deliver).
    """

    series: LoadedSeries
    label_map: sitk.Image
    probability_map: sitk.Image | None  # float32 GTV probability on the source grid
    lesions: list[Lesion]
    egfr: EgfrPrediction
    model: ModelIdentity
    timings_s: dict[str, float] = field(default_factory=dict)
    screening: str = ""  # the header evidence the input screening accepted the series on
    head_volume_cm3: float | None = None
    hold_reasons: list[str] = field(default_factory=list)
    brain_mask: sitk.Image | None = None  # uint8 on the source grid: where lesions were searched for

    def lesion_mask(self, lesion: Lesion) -> np.ndarray:
        """Boolean array (k, rows, cols) of one lesion on the source grid."""
        return sitk.GetArrayViewFromImage(self.label_map) == lesion.label
