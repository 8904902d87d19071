"""Phantom styles: which appearances a set of synthetic phantoms draws from (domain randomisation).

Why: demo model 0.3.0 learnt one look (full head, Rician noise, mild bias, one
grey/white contrast) and found 824 "lesions" on a skull-stripped, field-of-view
masked, oblique series from another generator (issue 12). After SynthSeg
(Billot et al., Medical Image Analysis 2023), the training phantoms now draw their
appearance from wide distributions, and the evaluation keeps one region of that
space for itself, so "generalises" is measured on looks no training phantom had.

Decisions:

- A `Style` is a set of distributions (ranges and probabilities); a `Look` is one
  draw from it, made per phantom from its own random stream
  (``numpy.random.default_rng([seed, 4])``) after the acquisition grid, so a
  seed gives the same phantom, and the geometry and lesions of the classic style
  are drawn exactly as before styles existed.
- Three styles (`STYLES`):
  ``classic`` is the generator up to demo model 0.3.0 (full head, Rician noise
  2-5 %, bias about +-25 %, the template's own contrast, lesion kind from the
  genotype); it is `generate_phantom`'s default, so the tests' and the model
  card's seeds keep their phantoms. ``randomised`` is the training style ("own
  style"): skull and scalp present or absent, zero-filled field-of-view margins,
  Gaussian or Rician noise of 1-8 %, bias fields up to +-60 %, grey/white and
  CSF/white contrast, lesion enhancement and core, pixel size and slice
  thickness, blur, smooth deformation, ghosting, and lesion appearance by size.
  ``unseen`` is for evaluation only.
- The held-out region (`is_held_out`), the one definition used by the draw and
  the tests: skull-stripped AND zero-filled margins AND oblique slices, OR a
  grey/white ratio above `TRAINING_GM_MAX` (training draws 0.60-0.82; the
  template's own is 0.75; unseen draws 0.84-0.92, a flatter contrast as at 1.5 T
  spin echo). A style with ``hold_out=True`` never draws a look in that region:
  its three flags are redrawn from the same stream until they are not all set
  (deterministic), and its contrast range ends below the limit (checked when the
  style is built). Every unseen look lies in the region.
- Intensities are relative to white matter (1000 before bias and noise); the
  contrast is a monotonic piecewise-linear remap of the template (texture kept).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

ORIENTATIONS = ("axial", "sagittal", "coronal", "oblique")
TRAINING_GM_MAX = 0.82  # grey/white intensity ratios above this are held out from training
TEMPLATE_GM_RATIO = 0.75  # the MNI template's own grey/white ratio (median GM 747, WM 1000)
TEMPLATE_CSF_RATIO = 0.30  # its CSF inside the brain (median 311)

Range = tuple[float, float]


@dataclass(frozen=True)
class Style:
    """Distributions a phantom's look is drawn from; `Look` is one draw."""

    name: str
    orientation_p: tuple[float, float, float, float]  # axial, sagittal, coronal, oblique
    matrices: tuple[int, ...]  # in-plane matrix choices
    fov_mm: Range
    slice_spacing_mm: Range
    skull_p: float  # P(skull and scalp present); else skull-stripped, zero outside the brain
    margin_p: float  # P(zero-filled field-of-view margins: the noise stops at a rectangle)
    margin_max: float  # largest margin, as a fraction of the matrix, per side
    gm_ratio: Range | None  # grey/white intensity ratio; None = the template's own
    csf_ratio: Range | None
    rician_p: float  # P(Rician noise), else Gaussian (zero-clipped)
    noise_sigma: Range  # fraction of white matter
    bias_scale: Range  # scale of the classic bias field's coefficients (1 = about +-25 %)
    blur_p: float
    blur_mm: Range  # Gaussian sigma, mm
    deformation_p: float
    deformation_mm: Range  # std of the B-spline control-point displacements, mm
    ghost_p: float
    ghost_amplitude: Range  # N/2 ghost along the phase-encoding axis, fraction of the image
    enhancement: Range  # lesion rim/solid intensity / white matter
    core: Range | None  # necrotic core / white matter; None = classic 0.35
    skull_layers: tuple[Range, Range, Range]  # CSF rim, bone, scalp / white matter
    lesion_appearance: str  # "genotype" (classic) or "size"
    hold_out: bool  # never draw a look in the held-out region (training styles)

    def __post_init__(self) -> None:
        if self.lesion_appearance not in ("genotype", "size"):
            raise ValueError(f"style {self.name}: lesion_appearance must be 'genotype' or 'size'")
        if not np.isclose(sum(self.orientation_p), 1.0):
            raise ValueError(f"style {self.name}: orientation probabilities must sum to 1")
        if self.hold_out and self.gm_ratio is not None and self.gm_ratio[1] > TRAINING_GM_MAX:
            raise ValueError(f"style {self.name}: a held-out style draws grey/white ratios <= {TRAINING_GM_MAX}")


@dataclass(frozen=True)
class Look:
    """One phantom's drawn appearance (recorded in `Phantom.look` and truth.json)."""

    style: str
    skull: bool
    margins: tuple[float, float, float, float]  # zero-filled fraction: first/last rows, first/last columns
    gm_ratio: float
    csf_ratio: float
    skull_layers: tuple[float, float, float]  # CSF rim, bone, scalp / white matter
    rician: bool
    noise_sigma: float
    bias_scale: float
    blur_mm: float
    deformation_mm: float
    ghost_amplitude: float
    ghost_axis: int  # array axis of the phase-encoding direction (1 rows, 2 columns)

    @property
    def zero_margins(self) -> bool:
        return any(m > 0 for m in self.margins)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


CLASSIC = Style(
    name="classic",
    orientation_p=(0.4, 0.2, 0.2, 0.2),
    matrices=(160, 192, 224, 256),
    fov_mm=(200.0, 250.0),
    slice_spacing_mm=(1.0, 5.0),
    skull_p=1.0,
    margin_p=0.0,
    margin_max=0.0,
    gm_ratio=None,
    csf_ratio=None,
    rician_p=1.0,
    noise_sigma=(0.02, 0.05),
    bias_scale=(1.0, 1.0),
    blur_p=0.0,
    blur_mm=(0.0, 0.0),
    deformation_p=0.0,
    deformation_mm=(0.0, 0.0),
    ghost_p=0.0,
    ghost_amplitude=(0.0, 0.0),
    enhancement=(1.35, 1.8),
    core=None,
    skull_layers=((0.25, 0.25), (0.08, 0.08), (0.95, 0.95)),
    lesion_appearance="genotype",
    hold_out=True,
)

RANDOMISED = Style(
    name="randomised",
    orientation_p=(0.4, 0.2, 0.2, 0.2),
    matrices=(160, 192, 224, 256),
    fov_mm=(190.0, 260.0),
    slice_spacing_mm=(0.9, 6.0),
    skull_p=0.6,
    margin_p=0.4,
    margin_max=0.15,
    gm_ratio=(0.60, TRAINING_GM_MAX),
    csf_ratio=(0.12, 0.40),
    rician_p=0.5,
    noise_sigma=(0.01, 0.08),
    bias_scale=(0.0, 2.5),
    blur_p=0.5,
    blur_mm=(0.3, 1.5),
    deformation_p=0.5,
    deformation_mm=(1.0, 3.0),
    ghost_p=0.3,
    ghost_amplitude=(0.02, 0.12),
    enhancement=(1.3, 2.2),
    core=(0.2, 0.6),
    skull_layers=((0.1, 0.4), (0.02, 0.15), (0.6, 1.3)),
    lesion_appearance="size",
    hold_out=True,
)

UNSEEN = Style(
    name="unseen",
    orientation_p=(0.0, 0.0, 0.0, 1.0),
    matrices=(176, 208, 240),
    fov_mm=(210.0, 250.0),
    slice_spacing_mm=(1.0, 4.0),
    skull_p=0.0,
    margin_p=1.0,
    margin_max=0.15,
    gm_ratio=(0.84, 0.92),
    csf_ratio=(0.35, 0.45),
    rician_p=0.0,
    noise_sigma=(0.02, 0.06),
    bias_scale=(1.0, 2.0),
    blur_p=0.5,
    blur_mm=(0.3, 1.0),
    deformation_p=0.5,
    deformation_mm=(1.0, 2.5),
    ghost_p=0.3,
    ghost_amplitude=(0.02, 0.08),
    enhancement=(1.35, 2.0),
    core=(0.2, 0.6),
    skull_layers=((0.1, 0.4), (0.02, 0.15), (0.6, 1.3)),
    lesion_appearance="size",
    hold_out=False,
)

STYLES = {style.name: style for style in (CLASSIC, RANDOMISED, UNSEEN)}
TRAINING_STYLES = tuple(name for name, style in STYLES.items() if style.hold_out)  # never the unseen looks


def get_style(style: str | Style) -> Style:
    """A `Style` by name (or itself); ValueError naming the known styles otherwise."""
    if isinstance(style, Style):
        return style
    if style not in STYLES:
        raise ValueError(f"unknown phantom style {style!r}; known: {', '.join(STYLES)}")
    return STYLES[style]


def is_held_out(look: Look, orientation: str) -> bool:
    """True if the look lies in the region kept for the unseen evaluation set."""
    stripped_masked_oblique = not look.skull and look.zero_margins and orientation == "oblique"
    return stripped_masked_oblique or look.gm_ratio > TRAINING_GM_MAX


def _uniform(rng: np.random.Generator, bounds: Range) -> float:
    return float(rng.uniform(*bounds)) if bounds[1] > bounds[0] else float(bounds[0])


def draw_look(rng: np.random.Generator, style: Style, orientation: str, noise_sigma: float) -> Look:
    """One look from `style` for a phantom of `orientation` (deterministic in `rng`).

    `noise_sigma` is drawn by the caller from the phantom's noise stream (as before styles).
    """
    skull, margins = _draw_skull_and_margins(rng, style)
    if style.hold_out:
        for _ in range(1000):  # redraw the combination; P(all three) <= 0.4 * 0.4, so this ends
            if skull or not any(margins) or orientation != "oblique":
                break
            skull, margins = _draw_skull_and_margins(rng, style)
        else:
            skull = True
    gm = _uniform(rng, style.gm_ratio) if style.gm_ratio else TEMPLATE_GM_RATIO
    csf = _uniform(rng, style.csf_ratio) if style.csf_ratio else TEMPLATE_CSF_RATIO
    csf_rim, bone, scalp = (_uniform(rng, bounds) for bounds in style.skull_layers)
    blur = _uniform(rng, style.blur_mm) if rng.random() < style.blur_p else 0.0
    ghost = _uniform(rng, style.ghost_amplitude) if rng.random() < style.ghost_p else 0.0
    return Look(
        style=style.name,
        skull=skull,
        margins=margins,
        gm_ratio=round(gm, 4),
        csf_ratio=round(csf, 4),
        skull_layers=(csf_rim, bone, scalp),
        rician=bool(rng.random() < style.rician_p),
        noise_sigma=noise_sigma,
        bias_scale=_uniform(rng, style.bias_scale),
        blur_mm=blur,
        deformation_mm=_uniform(rng, style.deformation_mm) if rng.random() < style.deformation_p else 0.0,
        ghost_amplitude=ghost,
        ghost_axis=int(rng.integers(1, 3)),
    )


def _draw_skull_and_margins(rng: np.random.Generator, style: Style) -> tuple[bool, tuple[float, float, float, float]]:
    skull = bool(rng.random() < style.skull_p)
    if rng.random() < style.margin_p:
        sides = rng.uniform(0.0, style.margin_max, size=4)
        sides[rng.integers(4)] = max(sides.max(), 0.05)  # at least one side visibly cut
        left, right, top, bottom = (round(float(s), 4) for s in sides)
        return skull, (left, right, top, bottom)
    return skull, (0.0, 0.0, 0.0, 0.0)
