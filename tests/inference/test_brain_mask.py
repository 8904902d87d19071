"""The brain mask against the phantoms' known brain, in every style an outside generator or scanner produces.

Small series (96-128 matrix, 3-5 mm slices) keep these fast; `bench/brain_mask.py`
measures the same on 176x512x512.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import SimpleITK as sitk

from inference.errors import SeriesError
from inference.imaging.brain_mask import _expand, brain_mask, shrink_factors
from inference.synthetic.foreign_styles import FOREIGN_STYLES, apply_style
from inference.synthetic.phantoms import Phantom, generate_phantom

GOAL_DICE = 0.90
PHANTOMS = {
    "axial": dict(seed=7, orientation="axial", matrix=112, slices=36),
    "oblique": dict(seed=8, orientation="oblique", matrix=96, slices=30, slice_spacing=5.0),
    "sagittal": dict(seed=9, orientation="sagittal", matrix=96, slices=40),
}


@functools.cache
def phantom(kind: str) -> Phantom:
    options = dict(PHANTOMS[kind])
    return generate_phantom(options.pop("seed"), n_lesions=3, **options)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def masks(kind: str, style: str) -> tuple[np.ndarray, np.ndarray]:
    """(computed brain mask, visible known brain) as bool arrays."""
    image, truth = apply_style(phantom(kind), style)
    return sitk.GetArrayFromImage(brain_mask(image)) > 0, sitk.GetArrayFromImage(truth) > 0


@pytest.mark.parametrize("style", FOREIGN_STYLES)
@pytest.mark.parametrize("kind", ["axial", "oblique"])
def test_brain_mask_dice_in_every_style(kind: str, style: str) -> None:
    computed, truth = masks(kind, style)
    assert dice(computed, truth) >= GOAL_DICE, (kind, style, dice(computed, truth))


@pytest.mark.slow
@pytest.mark.parametrize("style", FOREIGN_STYLES)
def test_brain_mask_dice_in_every_style_sagittal(style: str) -> None:
    computed, truth = masks("sagittal", style)
    assert dice(computed, truth) >= GOAL_DICE, (style, dice(computed, truth))


@pytest.mark.parametrize("style", ["full-head", "skull-stripped-zero", "tester"])
def test_every_true_lesion_lies_inside_the_brain_mask(style: str) -> None:
    """The mask must never hide a metastasis: the search region contains every true lesion voxel."""
    for kind in ("axial", "oblique"):
        image, visible = apply_style(phantom(kind), style)
        computed = sitk.GetArrayFromImage(brain_mask(image)) > 0
        lesions = (sitk.GetArrayFromImage(phantom(kind).mask) > 0) & (sitk.GetArrayFromImage(visible) > 0)
        assert lesions.any() and computed[lesions].mean() >= 0.99, (kind, computed[lesions].mean())


@pytest.mark.parametrize("style", ["full-head", "tester"])
def test_a_large_ring_lesion_at_the_brain_surface_stays_inside(style: str) -> None:
    """Phantom 60003's 28 mm ring lesion (dark core and oedema) hangs on to the brain by thin tissue."""
    surface_ring = generate_phantom(60003, matrix=160, n_lesions=3)
    assert surface_ring.lesion_kinds[2] == "ring" and surface_ring.lesion_diameters_mm[2] > 25
    image, visible = apply_style(surface_ring, style)
    computed = sitk.GetArrayFromImage(brain_mask(image)) > 0
    lesion = (sitk.GetArrayFromImage(surface_ring.mask) == 3) & (sitk.GetArrayFromImage(visible) > 0)
    assert computed[lesion].mean() >= 0.99, computed[lesion].mean()


def test_scalp_and_field_of_view_edge_are_outside_the_mask() -> None:
    image = phantom("axial").image
    computed = sitk.GetArrayFromImage(brain_mask(image)) > 0
    _, truth = apply_style(phantom("axial"), "full-head")
    truth = sitk.GetArrayFromImage(truth) > 0
    assert not computed[:, [0, -1], :].any() and not computed[:, :, [0, -1]].any()
    bright_outside = (sitk.GetArrayFromImage(image) > 600) & ~truth  # scalp fat
    assert bright_outside.sum() > 1000 and computed[bright_outside].mean() < 0.05


def test_integer_pixels_give_the_same_mask() -> None:
    image = phantom("axial").image
    as_uint16 = sitk.Cast(sitk.Round(image), sitk.sitkUInt16)
    same = sitk.GetArrayFromImage(brain_mask(as_uint16)) == sitk.GetArrayFromImage(brain_mask(image))
    assert same.mean() > 0.999


@pytest.mark.parametrize("value", [0.0, 250.0])
def test_an_image_without_foreground_is_an_unusable_series(value: float) -> None:
    image = sitk.GetImageFromArray(np.full((12, 40, 40), value, np.float32))
    with pytest.raises(SeriesError, match="no foreground"):
        brain_mask(image)


def test_an_image_without_a_brain_is_an_unusable_series() -> None:
    """A small bright object (a phantom bottle, a finger) in noise is not a brain."""
    rng = np.random.default_rng(2)
    array = np.abs(rng.normal(0, 20, (20, 64, 64))).astype(np.float32)
    array[8:12, 30:34, 30:34] = 1000.0  # 4 x 8 x 8 mm = 0.26 cm3
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((2.0, 2.0, 2.0))
    with pytest.raises(SeriesError, match=r"no brain found in the image \(\d\.\d cm3"):
        brain_mask(image)


def test_expanding_the_small_grid_is_nearest_neighbour_resampling() -> None:
    """The index arithmetic agrees with ITK's resampling wherever the small grid reaches."""
    rng = np.random.default_rng(3)
    image = sitk.GetImageFromArray(rng.random((23, 37, 41)).astype(np.float32))
    image.SetSpacing((0.5, 0.7, 1.1))
    image.SetOrigin((3.0, -4.0, 5.0))
    image.SetDirection(tuple(np.linalg.qr(rng.normal(size=(3, 3)))[0].flatten()))
    factors = shrink_factors(image)
    small = sitk.BinShrink(image, factors)
    binary = sitk.GetArrayFromImage(small) > 0.5
    small_mask = sitk.GetImageFromArray(binary.astype(np.uint8))
    small_mask.CopyInformation(small)
    expected = sitk.GetArrayFromImage(sitk.Resample(small_mask, image, sitk.Transform(), sitk.sitkNearestNeighbor))
    got = sitk.GetArrayFromImage(_expand(binary, factors, image))
    covered = tuple(slice(0, n * f) for n, f in zip(small.GetSize()[::-1], factors[::-1]))
    np.testing.assert_array_equal(got[covered], expected[covered])
