"""Synthetic T1-CE brain phantoms with contrast-enhancing metastases, written as DICOM MR.

Why: no public weights and no shareable patient data, so the demo model, the tests
and the benchmarks need realistic inputs with a known truth (SPEC.md).

Decisions:

- Anatomy is the MNI ICBM152 2009a T1 template shipped *inside nilearn's wheel*
  (never downloaded). That template is skull-stripped; a simple head is added
  around it in template space (a thin dark CSF layer, dark bone, bright scalp fat)
  so that the head mask and the model see a bright rim that is *not* a lesion.
- Everything random is drawn first from ``numpy.random.default_rng(seed)`` in a
  fixed order, keyword overrides are applied afterwards: a seed always gives the
  same phantom, and an override does not reshuffle the other draws.
- The acquisition grid is drawn first (orientation, matrix, pixel spacing, slice
  spacing, slice count); the template is then resampled (linear) into it.
  Lesions are *implicit functions of patient coordinates* (a rotated ellipsoid
  whose radius is modulated by a few random plane waves: irregular borders) and
  are evaluated directly on the acquisition grid, so the ground-truth mask lives on
  exactly the image grid, with no second resampling. Lesion centres are drawn in
  brain parenchyma (grey + white matter maps) far enough from the brain surface
  and inside the acquired volume; the mask is clipped to the brain.
- The GTV of a ring-enhancing lesion includes its necrotic core (as contoured in
  radiotherapy). Oedema (T1-hypointense, around the lesion, in the brain) is not
  part of the GTV.
- Synthetic genotype (NO CLINICAL MEANING): mutant (1) phantoms have mostly solid,
  homogeneously enhancing lesions, wild type (0) mostly ring-enhancing lesions with
  a necrotic core (each lesion follows its patient's pattern with probability
  0.85); the stored label is then flipped with probability 0.10 (label noise).
- Intensities: white matter about 1000 before bias and noise; multiplicative smooth
  bias field (exp of a random quadratic, about +-25 % in the classic style); Rician
  noise (sigma 2-5 % of white matter in the classic style). DICOM files store
  uint16 values with RescaleSlope 1 unless the range needs a slope.
- ``lesion_diameters_mm`` are the nominal diameters (twice the mean semi-axis),
  log-uniform in 3-30 mm; the irregular border changes the true extent slightly.
- Appearance comes from a style (`inference.synthetic.styles`): the default
  ``classic`` draws exactly what this generator drew before styles existed (same
  seed, same phantom, bit for bit); ``randomised`` and ``unseen`` remap the
  template's contrast, strip the skull or draw its layers' intensities, deform
  the anatomy (a B-spline field, sampled every 4 mm), blur, scale the bias field,
  add an N/2 ghost, choose Gaussian or Rician noise, zero-fill field-of-view
  margins, and give lesions the appearance of their size (`_ring_probability`:
  small ones mostly solid, rings mostly large with a rim of 2-5 mm). The extra
  draws come from their own streams (``[seed, 4]`` look, ``[seed, 5]`` deformation).
- The brain truth (`Phantom.brain`) is the template's filled brain outline
  (parenchyma, ventricles and sulci: what skull stripping keeps), deformed and
  resampled with the image: the reference for brain masks and for "false positive
  outside the brain".
- Written headers are those of a post-contrast 3D MPRAGE at 3 T (ContrastBolusAgent,
  IR/GR, TR 2300 ms, TE 2.32 ms, TI 900 ms, flip 8 degrees, "T1 MPRAGE +Gd"), so
  input screening sees a plausible T1-CE.
"""

from __future__ import annotations

import datetime as dt
import functools
import importlib.resources
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, MRImageStorage
from scipy import ndimage

from inference.synthetic.styles import (
    CLASSIC,
    ORIENTATIONS,
    TEMPLATE_CSF_RATIO,
    TEMPLATE_GM_RATIO,
    Look,
    Style,
    draw_look,
    get_style,
)
from inference.uids import new_uid

__all__ = ["ORIENTATIONS", "Phantom", "generate_phantom", "write_phantom_series", "write_phantom_truth"]
_TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
_WHITE_MATTER = 1000.0
_MUTANT_SOLID_P = 0.85
_LABEL_NOISE_P = 0.10
# Base direction cosines (columns: row direction, column direction, slice normal), LPS.
_BASE_DIRECTIONS = {
    "axial": np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], float).T,
    "sagittal": np.array([[0, 1, 0], [0, 0, -1], [-1, 0, 0]], float).T,
    "coronal": np.array([[1, 0, 0], [0, 0, -1], [0, 1, 0]], float).T,
}


@dataclass
class Phantom:
    """One synthetic series: image and truth on the same acquisition grid."""

    image: sitk.Image  # float32, acquisition geometry (LPS)
    mask: sitk.Image  # uint8 label map, lesion i = i, same grid as image
    genotype: int  # synthetic label: 0 wild type, 1 mutant (no clinical meaning)
    lesion_diameters_mm: list[float]
    seed: int
    orientation: str
    brain: sitk.Image  # uint8, 1 inside the intracranial brain (what skull stripping keeps), same grid
    look: Look  # the drawn appearance (style, skull, margins, contrast, noise, artefacts)
    lesion_kinds: list[str] = field(default_factory=list)  # "solid" or "ring"


@dataclass(frozen=True)
class _Anatomy:
    """Template-space images, built once per process."""

    reference: sitk.Image  # the template's geometry
    t1: np.ndarray  # float32 skull-stripped template, white matter ~ 1000
    layers: np.ndarray  # uint8 shells outside the brain: 1 CSF 0-2 mm, 2 bone 2-7 mm, 3 scalp 7-12 mm
    brain: np.ndarray  # float32 parenchyma probability (gm + wm) in [0, 1]
    intracranial: np.ndarray  # float32 1 inside the filled brain outline (the brain truth), 0 outside
    centres: np.ndarray  # (m, 3) candidate lesion centres in LPS mm
    depth_mm: np.ndarray  # (m,) distance of each candidate to the brain surface
    head_centre: np.ndarray  # LPS mm, centroid of the parenchyma


@dataclass(frozen=True)
class _Lesion:
    centre: np.ndarray  # LPS mm
    diameter_mm: float
    axes_mm: np.ndarray  # three semi-axes
    rotation: np.ndarray  # 3x3
    waves: np.ndarray  # (k, 3) wave vectors, rad/mm
    phases: np.ndarray  # (k,)
    amplitudes: np.ndarray  # (k,)
    kind: str  # "solid" | "ring"
    core_fraction: float  # core radius / lesion radius (ring lesions)
    enhancement: float  # rim or solid intensity / white matter
    core_level: float  # necrotic core intensity / white matter
    oedema_extent: float  # in units of the lesion radius; 0 = none
    oedema_depth: float


def _template_path(key: str) -> Path:
    resource = importlib.resources.files("nilearn.datasets") / "data" / _TEMPLATE_FILES[key]
    return Path(str(resource))


@functools.lru_cache(maxsize=1)
def _anatomy() -> _Anatomy:
    """Template T1 with an added skull and scalp, the parenchyma map, lesion centres."""
    t1_img = sitk.Cast(sitk.ReadImage(str(_template_path("t1"))), sitk.sitkFloat32)
    t1 = sitk.GetArrayFromImage(t1_img)
    gm = sitk.GetArrayFromImage(sitk.ReadImage(str(_template_path("gm")))).astype(np.float32) / 255
    wm = sitk.GetArrayFromImage(sitk.ReadImage(str(_template_path("wm")))).astype(np.float32) / 255
    t1 *= _WHITE_MATTER / float(t1[wm > 0.9].mean())
    intracranial = ndimage.binary_fill_holes(t1 > 0.05 * _WHITE_MATTER)
    layers = _skull_and_scalp_layers(intracranial)
    brain = np.clip(gm + wm, 0, 1)
    parenchyma = brain > 0.5
    depth = ndimage.distance_transform_edt(parenchyma)  # template spacing is 1 mm
    idx = np.argwhere(parenchyma & (depth >= 2))[::7]  # (z, y, x), thinned for memory
    direction = np.array(t1_img.GetDirection()).reshape(3, 3)
    centres = np.array(t1_img.GetOrigin()) + (idx[:, ::-1] * np.array(t1_img.GetSpacing())) @ direction.T
    head_centre = centres.mean(axis=0)
    return _Anatomy(
        t1_img, t1, layers, brain, intracranial.astype(np.float32), centres, depth[tuple(idx.T)], head_centre
    )


def _skull_and_scalp_layers(intracranial: np.ndarray) -> np.ndarray:
    """Shells outside the skull-stripped brain: 1 CSF 0-2 mm, 2 bone 2-7 mm, 3 scalp 7-12 mm."""
    outside = ndimage.distance_transform_edt(~intracranial)
    layers = np.zeros(intracranial.shape, np.uint8)
    for label, (inner, outer) in enumerate(((0, 2), (2, 7), (7, 12)), start=1):
        layers[(outside > inner) & (outside <= outer)] = label
    return layers


def _template_head(look: Look) -> np.ndarray:
    """The template with the look's contrast, and its skull and scalp unless skull-stripped.

    The contrast is a monotonic piecewise-linear remap through (CSF, grey, white
    matter) landmarks, so the template's texture is kept; above white matter the
    slope is 1. The template's own ratios leave it untouched (classic style).
    """
    anatomy = _anatomy()
    head = anatomy.t1.copy()
    if (look.gm_ratio, look.csf_ratio) != (TEMPLATE_GM_RATIO, TEMPLATE_CSF_RATIO):
        landmarks = _WHITE_MATTER * np.array([0.0, TEMPLATE_CSF_RATIO, TEMPLATE_GM_RATIO, 1.0])
        targets = _WHITE_MATTER * np.array([0.0, look.csf_ratio, look.gm_ratio, 1.0])
        head = np.where(head <= _WHITE_MATTER, np.interp(head, landmarks, targets), head).astype(np.float32)
    if look.skull:
        for label, level in enumerate(look.skull_layers, start=1):
            head[anatomy.layers == label] = level * _WHITE_MATTER
    return head


def _deformation(rng: np.random.Generator, amplitude_mm: float) -> sitk.Transform:
    """A smooth random deformation of the anatomy: a cubic B-spline on a 4x4x4 mesh over the template."""
    if amplitude_mm <= 0:
        return sitk.Transform()
    reference = _anatomy().reference
    spline = sitk.BSplineTransformInitializer(reference, [4, 4, 4], 3)
    spline.SetParameters(rng.normal(0.0, amplitude_mm, spline.GetNumberOfParameters()).tolist())
    # Sampled every 4 mm: a B-spline evaluated per voxel costs ten times more, for the same smooth field.
    size = [int(np.ceil(n / 4)) + 1 for n in reference.GetSize()]
    field = sitk.TransformToDisplacementField(
        spline, sitk.sitkVectorFloat64, size, reference.GetOrigin(), [4.0] * 3, reference.GetDirection()
    )
    return sitk.DisplacementFieldTransform(field)


def _resample_anatomy(look: Look, grid: sitk.Image, transform: sitk.Transform) -> tuple[np.ndarray, ...]:
    """Head image, parenchyma probability and intracranial fraction on the acquisition grid.

    Three scalar resamples: one vector-image resample measured 15 times slower.
    """
    anatomy = _anatomy()
    resampled = []
    for array in (_template_head(look), anatomy.brain, anatomy.intracranial):
        channel = sitk.GetImageFromArray(array.astype(np.float32, copy=False))
        channel.CopyInformation(anatomy.reference)
        resampled.append(sitk.GetArrayFromImage(sitk.Resample(channel, grid, transform, sitk.sitkLinear, 0.0)))
    return tuple(resampled)


def _random_rotation(rng: np.random.Generator, max_degrees: float, min_degrees: float = 0.0) -> np.ndarray:
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = np.deg2rad(rng.uniform(min_degrees, max_degrees))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * (k @ k)


def _acquisition_grid(
    rng: np.random.Generator,
    style: Style,
    orientation: str | None,
    matrix: int | None,
    slices: int | None,
    pixel_spacing: float | None,
    slice_spacing: float | None,
) -> tuple[sitk.Image, str]:
    """An empty float32 image with a random (or requested) acquisition geometry."""
    drawn: dict[str, Any] = {
        "orientation": str(rng.choice(ORIENTATIONS, p=list(style.orientation_p))),
        "oblique_base": str(rng.choice(["axial", "sagittal", "coronal"], p=[0.6, 0.2, 0.2])),
        "rotation": _random_rotation(rng, 35.0, 10.0),
        "matrix": int(rng.choice(list(style.matrices))),
        "fov": rng.uniform(*style.fov_mm),
        "slice_spacing": round(float(rng.uniform(*style.slice_spacing_mm)), 1),
        "coverage": rng.uniform(130.0, 170.0),
        "offset": rng.uniform(-8.0, 8.0, size=3),
    }
    orientation = orientation or drawn["orientation"]
    if orientation not in ORIENTATIONS:
        raise ValueError(f"orientation must be one of {ORIENTATIONS}, got {orientation!r}")
    if orientation == "oblique":
        direction = drawn["rotation"] @ _BASE_DIRECTIONS[drawn["oblique_base"]]
    else:
        direction = _BASE_DIRECTIONS[orientation]
    matrix = matrix or drawn["matrix"]
    pixel = pixel_spacing or round(drawn["fov"] / matrix, 4)
    if slice_spacing is None and slices is not None:  # cover the brain with the slices asked for
        slice_spacing = float(np.clip(round(drawn["coverage"] / slices, 2), 0.8, max(5.0, style.slice_spacing_mm[1])))
    dz = slice_spacing or drawn["slice_spacing"]
    n = slices or int(np.clip(round(drawn["coverage"] / dz), 30, 80))
    spacing = np.array([pixel, pixel, dz])
    size = np.array([matrix, matrix, n])
    centre = _anatomy().head_centre + drawn["offset"]
    origin = centre - direction @ (spacing * (size - 1) / 2)
    grid = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
    grid.SetSpacing(spacing.tolist())
    grid.SetDirection(direction.flatten().tolist())
    grid.SetOrigin(origin.tolist())
    return grid, orientation


def _ring_probability(diameter_mm: float, genotype: int) -> float:
    """P(ring enhancement) by size: about 0.1 at 5 mm, 0.4 at 10 mm, 0.7 from 20 mm.

    Small metastases are mostly solid or nodular, necrotic rings mostly large; the
    synthetic genotype still tilts the odds (mutant fewer rings), so the EGFR head
    has a (synthetic) signal.
    """
    by_size = float(np.clip(0.1 + 0.6 * np.log(diameter_mm / 5.0) / np.log(4.0), 0.1, 0.7))
    return by_size * 0.6 if genotype else min(0.9, by_size * 1.4)


def _ring_core_fraction(rng: np.random.Generator, radius_mm: float) -> float:
    """Core radius / lesion radius for a rim several mm thick (2-5 mm; 30-50 % of the radius below 5 mm)."""
    rim_mm = rng.uniform(2.0, 5.0) if radius_mm >= 5.0 else rng.uniform(0.3, 0.5) * radius_mm
    return float(np.clip(1.0 - rim_mm / radius_mm, 0.3, 0.85))


def _draw_lesions(rng: np.random.Generator, count: int, genotype: int, grid: sitk.Image, style: Style) -> list[_Lesion]:
    """Lesions in brain parenchyma, inside the acquired volume, not overlapping."""
    anatomy = _anatomy()
    inverse = np.linalg.inv(np.array(grid.GetDirection()).reshape(3, 3))
    spacing, size, origin = np.array(grid.GetSpacing()), np.array(grid.GetSize()), np.array(grid.GetOrigin())
    lesions: list[_Lesion] = []
    for _ in range(count):
        diameter = float(np.exp(rng.uniform(np.log(3.0), np.log(30.0))))
        radius = diameter / 2
        if style.lesion_appearance == "genotype":
            kind = "solid" if (rng.random() < _MUTANT_SOLID_P) == bool(genotype) else "ring"
        else:
            kind = "ring" if rng.random() < _ring_probability(diameter, genotype) else "solid"
        for _attempt in range(200):
            i = rng.integers(len(anatomy.centres))
            centre = anatomy.centres[i] + rng.uniform(-0.5, 0.5, size=3)
            index = inverse @ (centre - origin) / spacing
            inside = np.all(index >= radius / spacing) and np.all(index <= size - 1 - radius / spacing)
            deep = anatomy.depth_mm[i] >= 0.5 * radius + 1
            apart = all(np.linalg.norm(centre - o.centre) > radius + o.diameter_mm / 2 + 3 for o in lesions)
            if inside and deep and apart:
                break
        else:
            continue  # no room left for this lesion; fewer lesions than asked
        n_waves = 6
        axes = rng.uniform(0.8, 1.2, size=3)
        directions = rng.normal(size=(n_waves, 3))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        rotation = _random_rotation(rng, 180.0)
        waves = directions * (2 * np.pi / (diameter * rng.uniform(0.4, 1.2, size=(n_waves, 1))))
        phases = rng.uniform(0, 2 * np.pi, size=n_waves)
        amplitudes = rng.uniform(0.02, 0.07, size=n_waves)
        if style.lesion_appearance == "genotype":
            core_fraction = float(rng.uniform(0.45, 0.75))
        else:
            core_fraction = _ring_core_fraction(rng, radius)
        enhancement = float(rng.uniform(*style.enhancement))
        oedema_extent = float(rng.uniform(0.3, 1.2)) if rng.random() < 0.6 else 0.0
        oedema_depth = float(rng.uniform(0.1, 0.3))
        core_level = float(rng.uniform(*style.core)) if style.core else 0.35
        lesions.append(
            _Lesion(
                centre=centre,
                diameter_mm=diameter,
                axes_mm=radius * axes / axes.mean(),
                rotation=rotation,
                waves=waves,
                phases=phases,
                amplitudes=amplitudes,
                kind=kind,
                core_fraction=core_fraction,
                enhancement=enhancement,
                core_level=core_level,
                oedema_extent=oedema_extent,
                oedema_depth=oedema_depth,
            )
        )
    return lesions


def _physical_points(grid: sitk.Image, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """LPS coordinates (3, k, j, i) of the grid voxels in index box [lo, hi)."""
    direction = np.array(grid.GetDirection()).reshape(3, 3)
    spacing, origin = np.array(grid.GetSpacing()), np.array(grid.GetOrigin())
    i, j, k = (np.arange(lo[a], hi[a], dtype=np.float32) * spacing[a] for a in range(3))
    return (
        origin.reshape(3, 1, 1, 1).astype(np.float32)
        + direction[:, 0].reshape(3, 1, 1, 1) * i.reshape(1, 1, 1, -1)
        + direction[:, 1].reshape(3, 1, 1, 1) * j.reshape(1, 1, -1, 1)
        + direction[:, 2].reshape(3, 1, 1, 1) * k.reshape(1, -1, 1, 1)
    ).astype(np.float32)


def _normalised_radius(lesion: _Lesion, points: np.ndarray) -> np.ndarray:
    """rho <= 1 inside the irregular lesion; rho grows like distance/radius outside."""
    rel = points - lesion.centre.reshape(3, 1, 1, 1)
    local = np.tensordot(lesion.rotation.T, rel, axes=1) / lesion.axes_mm.reshape(3, 1, 1, 1)
    rho = np.sqrt((local**2).sum(axis=0))
    phase = np.tensordot(lesion.waves, rel, axes=1) + lesion.phases.reshape(-1, 1, 1, 1)
    perturbation = (lesion.amplitudes.reshape(-1, 1, 1, 1) * np.sin(phase)).sum(axis=0)
    return rho / (1 + perturbation)


def _paint_lesion(
    lesion: _Lesion, label: int, grid: sitk.Image, image: np.ndarray, mask: np.ndarray, brain: np.ndarray
) -> None:
    """Write the lesion's enhancement, core and oedema into `image`, its label into `mask`."""
    reach = 1.3 * (1 + lesion.oedema_extent) * lesion.axes_mm.max() + 2
    corners = lesion.centre + reach * np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)])
    index = np.array([grid.TransformPhysicalPointToContinuousIndex(c.tolist()) for c in corners])
    lo = np.clip(np.floor(index.min(axis=0)).astype(int), 0, grid.GetSize())
    hi = np.clip(np.ceil(index.max(axis=0)).astype(int) + 1, 0, grid.GetSize())
    box = (slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0]))
    rho = _normalised_radius(lesion, _physical_points(grid, lo, hi))
    in_brain = brain[box]
    edge_mm = 0.6 / (lesion.diameter_mm / 2)  # soft edge about 0.6 mm wide
    weight = in_brain * (1 / (1 + np.exp((rho - 1) / edge_mm)))
    bright = lesion.enhancement * _WHITE_MATTER
    if lesion.kind == "ring":
        core = 1 / (1 + np.exp((rho - lesion.core_fraction) / (2 * edge_mm)))  # 1 in core
        value = bright * (1 - core) + lesion.core_level * _WHITE_MATTER * core
    else:
        value = np.full_like(rho, bright)
    sub = image[box]
    if lesion.oedema_extent > 0:
        shell = np.clip((1 + lesion.oedema_extent - rho) / lesion.oedema_extent, 0, 1) * (rho > 1)
        sub *= 1 - lesion.oedema_depth * shell * in_brain
    image[box] = sub * (1 - weight) + value * weight
    mask[box][(rho <= 1) & (in_brain > 0.5)] = label


def _bias_field(rng: np.random.Generator, grid: sitk.Image, scale: float = 1.0) -> np.ndarray:
    """exp(random quadratic in patient coordinates), about +-25 % over the head at `scale` 1."""
    linear = rng.normal(0, 0.12, size=3) * scale
    quadratic = rng.normal(0, 0.08, size=(3, 3)) * scale
    size = grid.GetSize()
    points = _physical_points(grid, np.zeros(3, int), np.array(size))
    q = (points - _anatomy().head_centre.astype(np.float32).reshape(3, 1, 1, 1)) / 90.0
    log_field = np.tensordot(linear.astype(np.float32), q, axes=1)
    log_field += np.einsum("ij,i...,j...->...", quadratic.astype(np.float32), q, q)
    limit = min(0.4 * max(scale, 1.0), 0.7)  # at most x2 / x0.5
    return np.exp(np.clip(log_field, -limit, limit))


def generate_phantom(
    seed: int,
    *,
    style: str | Style = CLASSIC,
    orientation: str | None = None,
    n_lesions: int | None = None,
    matrix: int | None = None,
    slices: int | None = None,
    pixel_spacing: float | None = None,
    slice_spacing: float | None = None,
    genotype: int | None = None,
) -> Phantom:
    """A deterministic synthetic T1-CE series for `seed`; keywords override the random draws.

    `style` ("classic", "randomised", "unseen" or a `Style`) says which appearances
    are drawn (`inference.synthetic.styles`). `matrix` is the in-plane size (square),
    `pixel_spacing` and `slice_spacing` in mm (with `slices` alone, the slice spacing
    is chosen to cover the brain). `genotype` forces the true genotype and then the
    stored label is not flipped. Use ``matrix=512, slices=176`` for benchmark-sized series.
    """
    style = get_style(style)
    rng = np.random.default_rng(seed)
    grid, orientation = _acquisition_grid(rng, style, orientation, matrix, slices, pixel_spacing, slice_spacing)
    drawn_genotype = int(rng.random() < 0.5)
    drawn_count = int(rng.integers(1, 5))
    flip_label = rng.random() < _LABEL_NOISE_P
    lesion_rng, bias_rng, noise_rng, look_rng, warp_rng = (np.random.default_rng([seed, k]) for k in range(1, 6))
    true_genotype = drawn_genotype if genotype is None else int(genotype)
    count = drawn_count if n_lesions is None else n_lesions
    lesions = _draw_lesions(lesion_rng, count, true_genotype, grid, style)
    look = draw_look(look_rng, style, orientation, float(noise_rng.uniform(*style.noise_sigma)))

    image, brain, intracranial = _resample_anatomy(look, grid, _deformation(warp_rng, look.deformation_mm))
    mask = np.zeros(image.shape, np.uint8)
    for label, lesion in enumerate(lesions, start=1):
        _paint_lesion(lesion, label, grid, image, mask, brain)
    image = _acquire(image, look, grid, bias_rng, noise_rng)
    inside = intracranial > 0.5
    if not look.skull:  # a skull-stripping tool's output: zero outside the brain, noise included
        image[~inside] = 0.0
    for array in (image, mask, inside):  # nothing outside the field of view is imaged, so none is truth
        _zero_margins(array, look.margins)

    stored_genotype = 1 - true_genotype if (flip_label and genotype is None) else true_genotype
    return Phantom(
        image=_on_grid(image.astype(np.float32), grid),
        mask=_on_grid(mask, grid),
        genotype=stored_genotype,
        lesion_diameters_mm=[round(2 * float(lesion.axes_mm.mean()), 2) for lesion in lesions],
        seed=seed,
        orientation=orientation,
        brain=_on_grid(inside.astype(np.uint8), grid),
        look=look,
        lesion_kinds=[lesion.kind for lesion in lesions],
    )


def _acquire(
    image: np.ndarray, look: Look, grid: sitk.Image, bias_rng: np.random.Generator, noise_rng: np.random.Generator
) -> np.ndarray:
    """The scanner's share: blur (resolution), bias field, N/2 ghost, then Gaussian or Rician noise."""
    if look.blur_mm > 0:
        spacing = np.array(grid.GetSpacing())[::-1]  # array axis order
        image = ndimage.gaussian_filter(image, sigma=look.blur_mm / spacing).astype(np.float32)
    image *= _bias_field(bias_rng, grid, look.bias_scale)
    if look.ghost_amplitude > 0:
        axis = look.ghost_axis
        image += look.ghost_amplitude * np.roll(image, image.shape[axis] // 2, axis=axis)
    sigma = look.noise_sigma * _WHITE_MATTER
    real = image + noise_rng.normal(0, sigma, image.shape).astype(np.float32)
    if not look.rician:
        return np.maximum(real, 0.0)  # magnitude data cannot be negative; stored as unsigned
    imag = noise_rng.normal(0, sigma, image.shape).astype(np.float32)
    return np.sqrt(real * real + imag * imag)


def _zero_margins(image: np.ndarray, margins: tuple[float, float, float, float]) -> None:
    """Zero-fill (or clear) the in-plane margins outside a rectangular field of view (every slice)."""
    rows, columns = image.shape[1], image.shape[2]
    top, bottom, left, right = (int(round(m * n)) for m, n in zip(margins, (rows, rows, columns, columns), strict=True))
    image[:, :top, :] = 0
    image[:, rows - bottom :, :] = 0
    image[:, :, :left] = 0
    image[:, :, columns - right :] = 0


def _on_grid(array: np.ndarray, grid: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(grid)
    return image


def _ds_number(value: float) -> str:
    """A DS value of at most 16 characters, as precise as that allows (oblique cosines need it)."""
    text = f"{value:.10f}".rstrip("0").rstrip(".")
    return text if len(text) <= 16 else f"{value:.10g}"


def _stored_values(image: np.ndarray) -> tuple[np.ndarray, float]:
    """uint16 pixel values and the RescaleSlope that maps them back (1 when they fit)."""
    peak = float(image.max()) if image.size else 0.0
    slope = 1.0 if peak <= 65535 else peak / 65535
    return np.clip(np.round(image / slope), 0, 65535).astype(np.uint16), slope


def write_phantom_series(
    phantom: Phantom,
    out_dir: Path,
    *,
    patient_name: str = "PHANTOM^DEMO",
    patient_id: str | None = None,
    series_description: str = "T1 MPRAGE +Gd",
    transfer_syntax: UID = ExplicitVRLittleEndian,
) -> list[Path]:
    """Write the phantom as MR Image Storage files, one per slice, in slice order.

    UIDs derive from the seed (reproducible); the files are `IM_0001.dcm`, ...
    A compressed `transfer_syntax` needs the matching pylibjpeg encoder.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    patient_id = patient_id or f"PH{phantom.seed:06d}"
    key = f"phantom:{phantom.seed}:{patient_id}"
    study_uid, series_uid, frame_uid = (new_uid(f"{key}:{part}") for part in ("study", "series", "frame"))
    stored, slope = _stored_values(sitk.GetArrayViewFromImage(phantom.image))
    direction = np.array(phantom.image.GetDirection()).reshape(3, 3)
    spacing = phantom.image.GetSpacing()
    paths = []
    for k in range(stored.shape[0]):
        position = np.array(phantom.image.TransformIndexToPhysicalPoint((0, 0, k)))
        ds = _slice_dataset(patient_name, patient_id, series_description, study_uid, series_uid, frame_uid)
        ds.SOPInstanceUID = new_uid(f"{key}:instance:{k}")
        ds.file_meta = _file_meta(ds.SOPInstanceUID)
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [_ds_number(v) for v in position]
        ds.ImageOrientationPatient = [_ds_number(v) for v in np.concatenate([direction[:, 0], direction[:, 1]])]
        ds.SliceLocation = _ds_number(float(position @ direction[:, 2]))
        ds.PixelSpacing = [_ds_number(spacing[1]), _ds_number(spacing[0])]
        ds.SliceThickness = _ds_number(spacing[2])
        ds.SpacingBetweenSlices = _ds_number(spacing[2])
        ds.Rows, ds.Columns = stored.shape[1], stored.shape[2]
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = _ds_number(slope), "0", "US"
        ds.SmallestImagePixelValue, ds.LargestImagePixelValue = int(stored[k].min()), int(stored[k].max())
        ds.PixelData = stored[k].tobytes()
        if transfer_syntax != ExplicitVRLittleEndian:
            ds.compress(transfer_syntax)
        if not patient_name.isascii():
            ds.SpecificCharacterSet = "ISO_IR 192"
        path = out_dir / f"IM_{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _file_meta(sop_instance_uid: UID) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return meta


def _slice_dataset(
    patient_name: str, patient_id: str, description: str, study_uid: UID, series_uid: UID, frame_uid: UID
) -> pydicom.Dataset:
    """The attributes shared by every slice (patient, study, series, equipment, MR image)."""
    ds = pydicom.Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["DERIVED", "SECONDARY", "OTHER"]
    ds.SOPClassUID = MRImageStorage
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20260101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.AccessionNumber = ""
    ds.Modality = "MR"
    ds.Manufacturer = "dicom-node synthetic phantom"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "Synthetic T1-CE brain phantom (no clinical meaning)"
    ds.SeriesDescription = description
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.BodyPartExamined = "HEAD"
    ds.ProtocolName = "t1_mprage_post_gd"
    # A post-contrast 3D MPRAGE at 3 T as a Siemens scanner labels it (the input screening reads these).
    ds.ScanningSequence = ["GR", "IR"]
    ds.SequenceVariant = ["SK", "SP", "MP"]
    ds.ScanOptions = "IR"
    ds.SequenceName = "*tfl3d1_16ns"
    ds.MRAcquisitionType = "3D"
    ds.RepetitionTime = "2300"
    ds.EchoTime = "2.32"
    ds.InversionTime = "900"
    ds.FlipAngle = "8"
    ds.EchoTrainLength = 1
    ds.NumberOfAverages = "1"
    ds.ImagingFrequency = "123.25"
    ds.ImagedNucleus = "1H"
    ds.MagneticFieldStrength = "3"
    ds.ContrastBolusAgent = "GADOBUTROL 0.1 mmol/kg"
    ds.ContrastBolusRoute = "IV"
    ds.ContrastBolusVolume = "7.5"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.AcquisitionDateTime = dt.datetime(2026, 1, 1, 12).strftime("%Y%m%d%H%M%S")
    return ds


def write_phantom_truth(phantom: Phantom, out_dir: Path) -> tuple[Path, Path, Path]:
    """Write `mask.nii.gz` (lesion label map), `brain.nii.gz` (brain truth), both on the image grid,
    and `truth.json` (genotype, diameters, kinds, the drawn look); return (mask, brain, json) paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mask_path, brain_path, json_path = out_dir / "mask.nii.gz", out_dir / "brain.nii.gz", out_dir / "truth.json"
    sitk.WriteImage(phantom.mask, str(mask_path), useCompression=True)
    sitk.WriteImage(phantom.brain, str(brain_path), useCompression=True)
    truth = {
        "seed": phantom.seed,
        "orientation": phantom.orientation,
        "genotype": phantom.genotype,
        "genotype_meaning": "synthetic label: 0 wild type, 1 mutant; no clinical meaning",
        "lesion_diameters_mm": phantom.lesion_diameters_mm,
        "lesion_kinds": phantom.lesion_kinds,
        "look": phantom.look.as_dict(),
    }
    json_path.write_text(json.dumps(truth, indent=2) + "\n")
    return mask_path, brain_path, json_path
