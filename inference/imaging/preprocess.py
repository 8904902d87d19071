"""MR pre-processing and the model grid: N4, head mask, z-score, axial slices and back.

Why: MTSA-Net is a 2D model that sees axial T1-CE slices of a fixed size; the node
receives axial, sagittal, coronal and oblique series of any matrix. This module is
the single place that maps a source volume onto the model's slices and maps the
predicted probabilities back onto the *exact* source geometry. Training uses the
same functions (`prepare_model_input`, `to_model_grid`), so what the model learns
on is what it sees in the node.

Decisions:

- N4 runs on an image shrunk to voxels of about 6 mm (per-axis integer factors,
  thick slices are not shrunk further; 4x on a 1.5 mm series), inside the head
  mask, 3 fitting levels of at most 30/20/10 iterations; the fitted log bias field
  is then evaluated at full resolution and divided out. A bias field is smooth at
  the scale of its B-spline control points (several cm), so this loses nothing
  measurable: on 512x512x176 phantoms the white-matter CV after correction is the
  same as with 4 mm voxels and 50/40/30 iterations (0.036 vs 0.037, noise floor),
  at 3-4 s instead of 10 s (2 CPU cores); relative 4x shrinking of a 0.43 mm
  series took 95 s.
- Head mask, computed on a copy shrunk to about 2 mm voxels and sampled back with
  nearest neighbour (it only feeds N4, z-score statistics and the field of view):
  Otsu threshold, keep every connected component with at least 10 % of the largest
  one's voxels (brain and scalp may be separated by dark bone), fill 3D holes and
  then 2D holes in every source slice (cavities open at the volume's edge). An
  image without foreground (constant intensity) is an unusable series
  (`SeriesError`), not a crash.
- Normalisation is what the model package declares (manifest `input.normalisation`,
  one of `NORMALISATIONS`), because a model only works on the input it was trained on:
  - "zscore-brain" (the default for new packages): mean and standard deviation
    over the brain mask (`brain_mask.py`), so that white matter gets the same value
    on a full-head and on a skull-stripped series (over the head mask, the
    full-head scale differs: scalp and bone make the head mask about 1.4 brain
    volumes). The model grid is filled beyond the source volume by extending the
    source's edge voxels (nearest-neighbour extrapolation): where a field of view or
    a slab cuts through the head, the model sees no artificial step from tissue to
    a padding value, i.e. no edge it could take for an enhancing rim.
  - "zscore-foreground" (packages up to demo 0.3.0): mean and standard deviation
    over the head mask; voxels outside the source volume get the z-score of
    intensity 0.
- Model slices are axial with a fixed in-plane orientation: columns run to the
  patient's left (+x, LPS) and rows to posterior (+y), i.e. the usual radiological
  display of an axial slice; slice index increases towards superior.
- Near-axial series (slice normal within `NEAR_AXIAL_DEGREES` = 20 degrees of the
  patient's z axis, which covers AC-PC-angled axials) keep **one model slice per
  source slice**: the model grid lies in the source slice planes and only the
  in-plane sampling changes (rotation, flip, zoom), so thick slices are never
  interpolated along z and the way back is exact along z.
- Sagittal, coronal and strongly oblique series are resampled onto a patient-axis
  aligned axial grid with z spacing = the finest source spacing clipped to
  [1, 2] mm (finer than 1 mm only multiplies model work; coarser than 2 mm loses
  small lesions), covering the head mask's z extent.
- The square in-plane field of view covers the head mask's extent in the model's
  in-plane axes plus 10 % and at least 10 mm margin on each side; pixels are square
  (aspect ratio kept), the head is centred.
- Going back (`to_source_grid`) interpolates the probabilities linearly; masks go
  to the model grid with nearest neighbour (`to_model_grid(nearest=True)`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from inference.errors import SeriesError
from inference.imaging.brain_mask import SLICE_FILL_STRUCTURE, shrink_factors
from inference.imaging.brain_mask import brain_mask as compute_brain_mask

NEAR_AXIAL_DEGREES = 20.0
NORMALISATIONS = ("zscore-brain", "zscore-foreground")
DEFAULT_NORMALISATION = NORMALISATIONS[0]
_N4_SPACING_MM = 6.0


@dataclass
class ModelInput:
    """Model slices plus the grid they were sampled on.

    `grid` has size (size, size, n) and the model grid's origin, spacing and
    direction; `slices[j]` is `grid` slice j (rows along +y, columns along +x of
    the grid). `slice_aligned` is True when slice j lies in a source slice plane.
    `head_volume_cm3` is the head mask's volume (the plausibility gate's reference).
    """

    slices: np.ndarray  # (n, size, size) float32, z-scored
    grid: sitk.Image
    slice_aligned: bool
    head_volume_cm3: float | None = None

    @property
    def pixel_area_mm2(self) -> float:
        """In-plane area of one model pixel, for per-slice tumour areas."""
        spacing = self.grid.GetSpacing()
        return float(spacing[0] * spacing[1])


def head_mask(image: sitk.Image) -> sitk.Image:
    """uint8 mask of the head (1) against air (0) on `image`'s grid; see the module docstring."""
    small = sitk.Shrink(sitk.Cast(image, sitk.sitkFloat32), shrink_factors(image))
    binary = sitk.OtsuThreshold(small, 0, 1)
    components = sitk.RelabelComponent(sitk.ConnectedComponent(binary), sortByObjectSize=True)
    labels = sitk.GetArrayViewFromImage(components)
    sizes = np.bincount(labels.ravel())[1:]
    if sizes.size == 0:
        raise SeriesError("the image has no foreground (constant intensity): there is no head to process")
    keep = (labels > 0) & (labels <= int(np.sum(sizes >= 0.1 * sizes[0])))
    filled = ndimage.binary_fill_holes(ndimage.binary_fill_holes(keep), structure=SLICE_FILL_STRUCTURE)
    small_mask = sitk.GetImageFromArray(filled.astype(np.uint8))
    small_mask.CopyInformation(small)
    return sitk.Resample(small_mask, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)


def n4_correct(image: sitk.Image, *, mask: sitk.Image | None = None) -> sitk.Image:
    """N4 bias-field correction fitted on a shrunk image, applied at full resolution (float32)."""
    image = sitk.Cast(image, sitk.sitkFloat32)
    mask = head_mask(image) if mask is None else mask
    floor = 1e-3 * float(np.percentile(sitk.GetArrayViewFromImage(image), 99))
    positive = sitk.Maximum(image, floor)  # N4 works on log intensities
    factors = shrink_factors(image, _N4_SPACING_MM)
    small_image = sitk.Shrink(positive, factors)
    small_mask = sitk.Shrink(mask, factors)
    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    corrector.SetMaximumNumberOfIterations([30, 20, 10])
    corrector.Execute(small_image, small_mask)
    log_bias = corrector.GetLogBiasFieldAsImage(image)
    return sitk.Cast(image / sitk.Exp(log_bias), sitk.sitkFloat32)


def zscore(image: sitk.Image, mask: sitk.Image) -> sitk.Image:
    """(image - mean) / std with mean and std over the mask (float32)."""
    values = sitk.GetArrayViewFromImage(image)
    inside = values[sitk.GetArrayViewFromImage(mask) > 0].astype(np.float64)  # float32 sums overflow at 1e19
    if inside.size == 0:
        raise ValueError("zscore: empty mask")
    mean, std = float(inside.mean()), float(inside.std())
    if not (np.isfinite(mean) and np.isfinite(std) and std > 0):
        # A floor on std (1e-6 before) under-scaled an image rescaled by 1e-9 and the model saw no lesion.
        raise SeriesError(f"the brain's intensities have mean {mean:g} and spread {std:g}: nothing to normalise")
    scaled = (sitk.GetArrayFromImage(image).astype(np.float32) - np.float32(mean)) / np.float32(std)
    out = sitk.GetImageFromArray(scaled)
    out.CopyInformation(image)
    return out


def _direction(image: sitk.Image) -> np.ndarray:
    return np.array(image.GetDirection()).reshape(3, 3)


def is_near_axial(image: sitk.Image) -> bool:
    """True when the slice normal is within NEAR_AXIAL_DEGREES of the patient z axis."""
    normal = _direction(image)[:, 2]
    return bool(abs(normal[2]) / np.linalg.norm(normal) >= np.cos(np.deg2rad(NEAR_AXIAL_DEGREES)))


def _mask_points(mask: sitk.Image, max_points: int = 500_000) -> tuple[np.ndarray, float]:
    """LPS coordinates (m, 3) of (a regular subsample of) the mask voxels, and the sample step in mm."""
    array = sitk.GetArrayViewFromImage(mask)
    step = max(1, int(np.ceil((np.count_nonzero(array) / max_points) ** (1 / 3))))
    index = np.argwhere(array[::step, ::step, ::step])[:, ::-1] * step  # (i, j, k)
    spacing = np.array(mask.GetSpacing())
    points = np.array(mask.GetOrigin()) + (index * spacing) @ _direction(mask).T
    return points, float(step * spacing.max())


def _in_plane_axes(normal: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(u, v, n): u closest to +x (L), v closest to +y (P) in the plane, n = u x v towards superior."""
    n = normal / np.linalg.norm(normal)
    n = n if n[2] >= 0 else -n
    u = np.array([1.0, 0.0, 0.0]) - n[0] * n
    u /= np.linalg.norm(u)
    return u, np.cross(n, u), n


def model_grid(image: sitk.Image, mask: sitk.Image, size: int) -> tuple[sitk.Image, bool]:
    """The model's reference grid for `image` (see the module docstring) and whether it is slice aligned."""
    aligned = is_near_axial(image)
    if aligned:
        u, v, n = _in_plane_axes(_direction(image)[:, 2])
    else:
        u, v, n = np.eye(3)
    points, step_mm = _mask_points(mask)
    in_plane = points @ np.stack([u, v]).T
    lo, hi = in_plane.min(axis=0) - step_mm, in_plane.max(axis=0) + step_mm
    extent = float((hi - lo).max())
    fov = extent + 2 * max(10.0, 0.1 * extent)
    pixel = fov / size
    centre_uv = (lo + hi) / 2
    if aligned:
        source_spacing = image.GetSpacing()[2]
        count = image.GetSize()[2]
        first = 0 if _direction(image)[:, 2] @ n > 0 else count - 1
        plane_point = np.array(image.TransformIndexToPhysicalPoint((0, 0, first)))
        z0, dz = float(plane_point @ n), source_spacing
    else:
        dz = float(np.clip(min(image.GetSpacing()), 1.0, 2.0))
        z_lo, z_hi = float(points[:, 2].min() - step_mm), float(points[:, 2].max() + step_mm)
        count = int(np.floor((z_hi - z_lo) / dz)) + 1
        z0 = (z_lo + z_hi) / 2 - dz * (count - 1) / 2
    corner_uv = centre_uv - pixel * (size - 1) / 2
    origin = corner_uv[0] * u + corner_uv[1] * v + z0 * n
    grid = sitk.Image(size, size, count, sitk.sitkUInt8)
    grid.SetOrigin(origin.tolist())
    grid.SetSpacing([pixel, pixel, dz])
    grid.SetDirection(np.stack([u, v, n], axis=1).flatten().tolist())
    return grid, aligned


def prepare_model_input(
    image: sitk.Image,
    *,
    size: int = 384,
    n4: bool = True,
    normalisation: str = DEFAULT_NORMALISATION,
    brain: sitk.Image | None = None,
    timings: dict[str, float] | None = None,
) -> ModelInput:
    """Source volume -> z-scored axial model slices (n, size, size) and their grid.

    `brain` is the series' brain mask when the caller has it (computed here
    otherwise, for "zscore-brain"). With `timings`, the seconds spent in N4 are
    stored under "n4" (for the benchmarks).
    """
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"unknown normalisation {normalisation!r}; known: {', '.join(NORMALISATIONS)}")
    image = sitk.Cast(image, sitk.sitkFloat32)
    mask = head_mask(image)
    start = time.perf_counter()
    corrected = n4_correct(image, mask=mask) if n4 else image
    if timings is not None and n4:
        timings["n4"] = time.perf_counter() - start
    grid, aligned = model_grid(image, mask, size)
    if normalisation == "zscore-foreground":
        normalised = zscore(corrected, mask)
        values = sitk.GetArrayViewFromImage(corrected)[sitk.GetArrayViewFromImage(mask) > 0]
        background = float(-values.mean() / max(float(values.std()), 1e-6))
        resampled = sitk.Resample(normalised, grid, sitk.Transform(), sitk.sitkLinear, background, sitk.sitkFloat32)
    else:
        normalised = zscore(corrected, compute_brain_mask(image) if brain is None else brain)
        resampled = sitk.Resample(
            normalised,
            grid,
            sitk.Transform(),
            sitk.sitkLinear,
            0.0,
            sitk.sitkFloat32,
            useNearestNeighborExtrapolator=True,
        )
    head_cm3 = int(np.count_nonzero(sitk.GetArrayViewFromImage(mask))) * float(np.prod(image.GetSpacing())) / 1000.0
    return ModelInput(sitk.GetArrayFromImage(resampled), grid, aligned, head_cm3)


def to_model_grid(image: sitk.Image, model_input: ModelInput, *, nearest: bool = True) -> np.ndarray:
    """An image or mask on a source grid, sampled on the model grid: array (n, size, size)."""
    interpolator = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
    return sitk.GetArrayFromImage(sitk.Resample(image, model_input.grid, sitk.Transform(), interpolator, 0))


def to_source_grid(volume: np.ndarray, model_input: ModelInput, source: sitk.Image) -> sitk.Image:
    """Model-grid values (n, size, size), e.g. probabilities, linearly resampled onto `source`'s grid."""
    expected = sitk.GetArrayViewFromImage(model_input.grid).shape
    if volume.shape != expected:
        raise ValueError(f"to_source_grid: volume shape {volume.shape} != model grid {expected}")
    on_model = sitk.GetImageFromArray(np.asarray(volume, dtype=np.float32))
    on_model.CopyInformation(model_input.grid)
    return sitk.Resample(on_model, source, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
