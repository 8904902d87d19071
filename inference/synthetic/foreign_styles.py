"""Other generators' and scanners' looks, applied to a finished phantom: for measuring, not training.

(`styles.py` holds the generator's own, drawn while a phantom is made: training and the
held-out evaluation style; these are transforms of a finished one, for the brain mask.)

Why: the brain mask (and the model) must hold on images unlike our phantoms. An
outside tester's generator produced skull-stripped brains, noise that stops at a
rectangular field of view and strong bias fields (issue 12); real scanners and
PACS add zero-filled matrix margins. These transforms turn one phantom (with its
known brain, `Phantom.brain`) into each of those styles, so the brain
mask's Dice is measured per style by the tests and `bench/brain_mask.py`.

Decisions:

- "skull-stripped" keeps the known brain dilated by 1 mm (a brain extraction
  tool's margin) and replaces everything else by Rician noise of the phantom's
  own level, estimated from its air (voxels over 25 mm from the brain; the
  added scalp ends 12 mm out). "skull-stripped-zero" sets it to 0 instead.
- "zero-margins": the full head with zero-filled bands (12 % of the columns,
  8 % of the rows on each side), as a reconstruction that zero-fills outside
  its field of view.
- "fov-masked": skull-stripped, with noise only inside an in-plane rectangle
  (84 % x 90 % of the matrix) and exact zeros outside, as the tester's images.
- "bias": the full head times exp(a linear field), about 0.6 to 1.6 across the
  volume (stronger than the phantoms' own +-25 %).
- "tester": fov-masked plus bias, the tester's combination (use it on an
  oblique phantom).
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from inference.synthetic.phantoms import Phantom

FOREIGN_STYLES = ("full-head", "skull-stripped", "skull-stripped-zero", "zero-margins", "fov-masked", "bias", "tester")
_RAYLEIGH_MEDIAN = float(np.sqrt(2 * np.log(2)))


def _outside_distance(brain: np.ndarray, grid: sitk.Image) -> np.ndarray:
    """mm from each voxel to the brain (<= 0 inside), ITK's Maurer map."""
    mask = sitk.GetImageFromArray(brain.astype(np.uint8))
    mask.CopyInformation(grid)
    distance = sitk.SignedMaurerDistanceMap(mask, insideIsPositive=False, squaredDistance=False, useImageSpacing=True)
    return sitk.GetArrayFromImage(distance)


def _noise_sigma(image: np.ndarray, outside_mm: np.ndarray) -> float:
    """The phantom's Rician noise sigma, from the median of its air (Rayleigh distributed)."""
    air = image[outside_mm > 25.0]
    return float(np.median(air)) / _RAYLEIGH_MEDIAN if air.size > 100 else 30.0


def _stripped(image: np.ndarray, outside_mm: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    sigma = _noise_sigma(image, outside_mm)
    noise = np.hypot(rng.normal(0, sigma, image.shape), rng.normal(0, sigma, image.shape))
    return np.where(outside_mm <= 1.0, image, noise)


def _in_plane_box(shape: tuple[int, ...], columns: float, rows: float) -> np.ndarray:
    """True inside a centred in-plane rectangle covering `columns` x `rows` of the matrix."""
    _, j, i = np.indices(shape, sparse=True)
    return (np.abs(i - (shape[2] - 1) / 2) < columns * shape[2] / 2) & (
        np.abs(j - (shape[1] - 1) / 2) < rows * shape[1] / 2
    )


def _bias(shape: tuple[int, ...]) -> np.ndarray:
    k, j, i = (
        np.linspace(-0.5, 0.5, n).reshape([-1 if a == axis else 1 for a in range(3)]) for axis, n in enumerate(shape)
    )
    return np.exp(0.9 * i - 0.6 * j + 0.4 * k)


def apply_style(phantom: Phantom, style: str, *, seed: int = 0) -> tuple[sitk.Image, sitk.Image]:
    """`phantom.image` in `style` (one of `FOREIGN_STYLES`, float32, same grid) and the brain one can see in it.

    The visible brain is `Phantom.brain` where the style left data (a field-of-view
    rectangle that cuts the brain hides what lies outside it).
    """
    if style not in FOREIGN_STYLES:
        raise ValueError(f"unknown style {style!r}; known: {', '.join(FOREIGN_STYLES)}")
    rng = np.random.default_rng(seed)
    image = sitk.GetArrayFromImage(phantom.image).astype(np.float32)
    brain = sitk.GetArrayFromImage(phantom.brain) > 0
    outside_mm = _outside_distance(brain, phantom.image)
    visible = np.ones(image.shape, bool)
    if style == "skull-stripped":
        image = _stripped(image, outside_mm, rng)
    elif style == "skull-stripped-zero":
        image = np.where(outside_mm <= 1.0, image, 0)
    elif style == "zero-margins":
        visible = _in_plane_box(image.shape, 0.76, 0.84)
        image = np.where(visible, image, 0)
    elif style in ("fov-masked", "tester"):
        visible = _in_plane_box(image.shape, 0.84, 0.90)
        image = np.where(visible, _stripped(image, outside_mm, rng), 0)
    if style in ("bias", "tester"):
        image = image * _bias(image.shape)
    out = sitk.GetImageFromArray(image.astype(np.float32))
    out.CopyInformation(phantom.image)
    seen = sitk.GetImageFromArray((brain & visible).astype(np.uint8))
    seen.CopyInformation(phantom.image)
    return out, seen
