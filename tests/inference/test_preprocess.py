"""Pre-processing: geometry round trips to the model grid and back, N4, head mask, z-score, padding."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from inference.errors import SeriesError
from inference.imaging.brain_mask import brain_mask
from inference.imaging.preprocess import (
    NEAR_AXIAL_DEGREES,
    head_mask,
    is_near_axial,
    n4_correct,
    prepare_model_input,
    to_model_grid,
    to_source_grid,
    zscore,
)
from inference.synthetic.foreign_styles import apply_style
from inference.synthetic.phantoms import generate_phantom

SIZE = 128


def direction_of(image: sitk.Image) -> np.ndarray:
    return np.array(image.GetDirection()).reshape(3, 3)


def assert_within_one_voxel(original: np.ndarray, back: np.ndarray) -> None:
    """Every changed voxel lies within one voxel (26-neighbourhood) of the original boundary."""
    cube = np.ones((3, 3, 3), bool)
    assert np.all(back <= ndimage.binary_dilation(original, cube)), "voxels added beyond one voxel"
    assert np.all(ndimage.binary_erosion(original, cube) <= back), "voxels lost beyond one voxel"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("seed", "orientation", "kwargs", "aligned"),
    [
        (31, "axial", {"slice_spacing": 4.0, "slices": 30}, True),
        (31, "sagittal", {"slice_spacing": 3.0, "slices": 40}, False),
        (31, "coronal", {"slice_spacing": 2.0, "slices": 50}, False),
        (31, "oblique", {"slice_spacing": 1.5, "slices": 60}, True),  # tilted 9 degrees from axial
        (30, "oblique", {"slice_spacing": 3.5, "slices": 40}, False),  # tilted 30 degrees
        (37, "oblique", {"slice_spacing": 5.0, "slices": 30}, False),  # 81 degrees, near sagittal/coronal
    ],
    ids=["axial", "sagittal", "coronal", "oblique-9deg", "oblique-30deg", "oblique-81deg"],
)
def test_mask_round_trip_through_the_model_grid_is_within_one_voxel(phantom_series, seed, orientation, kwargs, aligned):
    series = phantom_series(seed, orientation=orientation, matrix=128, n_lesions=3, **kwargs)
    model_input = prepare_model_input(series.phantom.image, size=SIZE, n4=False)
    assert model_input.slice_aligned is aligned
    original = sitk.GetArrayFromImage(series.phantom.mask) > 0
    assert original.sum() > 100
    on_model = to_model_grid(series.phantom.mask, model_input, nearest=True) > 0
    back_image = to_source_grid(on_model.astype(np.float32), model_input, series.phantom.image)
    for get in (sitk.Image.GetOrigin, sitk.Image.GetSpacing, sitk.Image.GetDirection, sitk.Image.GetSize):
        assert get(back_image) == get(series.phantom.image)
    back = sitk.GetArrayFromImage(back_image) >= 0.5
    assert_within_one_voxel(original, back)
    dice = 2 * (back & original).sum() / (back.sum() + original.sum())
    assert dice > 0.9


def test_axial_series_keeps_one_model_slice_per_source_slice(phantom_series):
    series = phantom_series(32, orientation="axial", matrix=128, slices=30, slice_spacing=4.0, n_lesions=1)
    image = series.phantom.image
    model_input = prepare_model_input(image, size=SIZE, n4=False)
    assert model_input.slice_aligned
    assert model_input.slices.shape == (30, SIZE, SIZE) and model_input.slices.dtype == np.float32
    assert model_input.grid.GetSpacing()[2] == pytest.approx(4.0)
    for j in (0, 17, 29):  # the model slice plane is the source slice plane
        centre = model_input.grid.TransformContinuousIndexToPhysicalPoint(((SIZE - 1) / 2, (SIZE - 1) / 2, j))
        assert image.TransformPhysicalPointToContinuousIndex(centre)[2] == pytest.approx(j, abs=1e-6)


def test_slices_stored_head_to_feet_become_feet_to_head_model_slices(phantom_series):
    image = sitk.Image(phantom_series(33, orientation="axial", matrix=96, slices=24, n_lesions=1).phantom.image)
    flipped = sitk.Flip(image, [False, False, True])  # same voxels, slice index now runs superior -> inferior
    assert direction_of(flipped)[2, 2] == pytest.approx(-1)
    model_input = prepare_model_input(flipped, size=96, n4=False)
    assert model_input.slice_aligned
    np.testing.assert_allclose(direction_of(model_input.grid), np.eye(3), atol=1e-9)
    top = model_input.grid.TransformIndexToPhysicalPoint((0, 0, 23))
    source_slice = flipped.TransformPhysicalPointToContinuousIndex(top)[2]
    assert source_slice == pytest.approx(0, abs=1e-6)  # last model slice (superior) = first stored slice


def test_near_axial_threshold():
    image = sitk.Image(8, 8, 8, sitk.sitkUInt8)
    for degrees, expected in ((NEAR_AXIAL_DEGREES - 1, True), (NEAR_AXIAL_DEGREES + 1, False)):
        angle = np.deg2rad(degrees)
        rotation = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
        image.SetDirection(rotation.flatten().tolist())
        assert is_near_axial(image) is expected


def test_model_grid_is_axial_in_patient_axes_for_sagittal_series(phantom_series):
    series = phantom_series(34, orientation="sagittal", matrix=128, slices=40, slice_spacing=3.0, n_lesions=1)
    model_input = prepare_model_input(series.phantom.image, size=SIZE, n4=False)
    assert not model_input.slice_aligned
    np.testing.assert_allclose(direction_of(model_input.grid), np.eye(3), atol=1e-12)
    assert 1.0 <= model_input.grid.GetSpacing()[2] <= 2.0
    spacing = model_input.grid.GetSpacing()
    assert spacing[0] == spacing[1] and model_input.pixel_area_mm2 == pytest.approx(spacing[0] ** 2)


@pytest.mark.parametrize("orientation", ["axial", "oblique"])
def test_field_of_view_covers_the_head(phantom_series, orientation):
    series = phantom_series(35, orientation=orientation, matrix=128, slices=40, n_lesions=1)
    image = series.phantom.image
    model_input = prepare_model_input(image, size=SIZE, n4=False)
    mask = head_mask(image)
    on_model = to_model_grid(mask, model_input, nearest=True)
    assert on_model.any()
    assert not on_model[:, [0, -1], :].any() and not on_model[:, :, [0, -1]].any()  # margin left and right


@pytest.mark.slow
@pytest.mark.parametrize("normalisation", ["zscore-brain", "zscore-foreground"])
def test_model_slices_are_z_scored_over_the_declared_region(phantom_series, normalisation):
    series = phantom_series(36, orientation="axial", matrix=96, slices=24, n_lesions=1)
    image = series.phantom.image
    model_input = prepare_model_input(image, size=96, n4=True, normalisation=normalisation)
    region = brain_mask(image) if normalisation == "zscore-brain" else head_mask(image)
    values = model_input.slices[to_model_grid(region, model_input, nearest=True) > 0]
    assert abs(values.mean()) < 0.1 and abs(values.std() - 1) < 0.1
    assert np.isfinite(model_input.slices).all()


def test_an_unknown_normalisation_is_refused(small_axial_series):
    with pytest.raises(ValueError, match="unknown normalisation 'minmax'"):
        prepare_model_input(small_axial_series.phantom.image, size=64, normalisation="minmax")


def brain_median(style: str, normalisation: str) -> float:
    """Median model-input value over the known brain of phantom 36 in `style`."""
    phantom = generate_phantom(36, orientation="axial", matrix=96, slices=24, n_lesions=1)
    image, truth = apply_style(phantom, style)
    model_input = prepare_model_input(image, size=96, n4=False, normalisation=normalisation)
    return float(np.median(model_input.slices[to_model_grid(truth, model_input) > 0]))


def test_brain_normalisation_is_the_same_for_full_head_and_skull_stripped_input():
    """Over the head mask, scalp and bone shift the scale of a full-head series; over the brain they do not."""
    brain = [brain_median(style, "zscore-brain") for style in ("full-head", "skull-stripped")]
    head = [brain_median(style, "zscore-foreground") for style in ("full-head", "skull-stripped")]
    assert abs(brain[0] - brain[1]) < 0.05, brain
    assert abs(head[0] - head[1]) > 0.2, head  # what the brain normalisation removes


def steps_where_the_field_of_view_cuts_the_head(normalisation: str) -> np.ndarray:
    """|model input just outside the source volume - nearest pixel inside|, next to the head, for a cut head."""
    phantom = generate_phantom(38, orientation="axial", matrix=96, slices=24, n_lesions=1)
    image = phantom.image[22:-22, :, :]  # the field of view cuts through both sides of the head
    model_input = prepare_model_input(image, size=96, n4=False, normalisation=normalisation)
    ones = sitk.Image(image.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(image)
    volume = to_model_grid(ones, model_input) > 0
    head = to_model_grid(head_mask(image), model_input) > 0
    in_plane = np.ones((1, 3, 3), bool)
    ring = ndimage.binary_dilation(volume, in_plane) & ~volume
    nearest = ndimage.distance_transform_edt(~volume, return_distances=False, return_indices=True)
    k, j, i = np.nonzero(ring)
    source = tuple(index[k, j, i] for index in nearest)
    next_to_head = head[source]
    assert next_to_head.sum() > 50  # the cut really goes through the head
    return np.abs(model_input.slices[k, j, i] - model_input.slices[source])[next_to_head]


def test_padding_creates_no_step_where_the_field_of_view_cuts_the_head():
    steps = steps_where_the_field_of_view_cuts_the_head("zscore-brain")
    legacy = steps_where_the_field_of_view_cuts_the_head("zscore-foreground")
    assert np.median(steps) < 0.2, np.median(steps)
    assert np.median(legacy) > 1.0, np.median(legacy)  # the step a padding value makes


def test_to_source_grid_rejects_a_volume_of_the_wrong_shape(small_axial_series):
    model_input = prepare_model_input(small_axial_series.phantom.image, size=64, n4=False)
    with pytest.raises(ValueError, match="model grid"):
        to_source_grid(np.zeros((3, 64, 64), np.float32), model_input, small_axial_series.phantom.image)


def ball(shape: tuple[int, int, int], radius: float) -> np.ndarray:
    k, j, i = np.indices(shape)
    centre = (np.array(shape) - 1) / 2
    return (k - centre[0]) ** 2 + (j - centre[1]) ** 2 + (i - centre[2]) ** 2 <= radius**2


def test_n4_removes_most_of_a_synthetic_bias_field():
    rng = np.random.default_rng(0)
    shape = (48, 64, 64)
    inside = ball(shape, 22)
    k, j, i = np.indices(shape) / 64.0
    bias = np.exp(0.35 * (i - 0.5) + 0.25 * (j - 0.5) ** 2 - 0.2 * (k - 0.4))
    truth = np.where(inside, 1000.0, 0.0)
    array = truth * bias + np.abs(rng.normal(0, 10, shape))
    image = sitk.GetImageFromArray(array.astype(np.float32))
    image.SetSpacing((2.0, 2.0, 2.0))
    corrected = sitk.GetArrayFromImage(n4_correct(image))
    before = array[inside].std() / array[inside].mean()
    after = corrected[inside].std() / corrected[inside].mean()
    assert after < 0.35 * before, (before, after)


def test_head_mask_fills_holes_and_ignores_noise():
    rng = np.random.default_rng(1)
    shape = (32, 48, 48)
    head = ball(shape, 18)
    array = np.where(head, 800.0, 0.0) + np.abs(rng.normal(0, 20, shape))
    array[ball(shape, 6)] = 30.0  # a dark cavity (ventricles, necrosis) inside the head
    array[0, 0, 0] = 900.0  # a bright speck in the air
    image = sitk.GetImageFromArray(array.astype(np.float32))
    mask = sitk.GetArrayFromImage(head_mask(image)) > 0
    assert mask[ball(shape, 6)].all()
    assert not mask[0, 0, 0]
    two_voxels = ndimage.generate_binary_structure(3, 3)  # the mask is computed on 2 mm voxels
    assert np.all(mask <= ndimage.binary_dilation(head, two_voxels, iterations=2))
    assert np.all(ndimage.binary_erosion(head, two_voxels, iterations=2) <= mask)


@pytest.mark.parametrize("value", [0.0, 100.0])
def test_a_blank_image_is_an_unusable_series(value):
    image = sitk.GetImageFromArray(np.full((10, 32, 32), value, np.float32))
    with pytest.raises(SeriesError, match="no foreground"):
        prepare_model_input(image, size=64)


def test_zscore_uses_the_mask_only():
    array = np.zeros((4, 8, 8), np.float32)
    array[:, 2:6, 2:6] = np.arange(64, dtype=np.float32).reshape(4, 4, 4)
    image = sitk.GetImageFromArray(array)
    mask = sitk.GetImageFromArray((array > 0).astype(np.uint8))
    out = sitk.GetArrayFromImage(zscore(image, mask))
    inside = array > 0
    assert out[inside].mean() == pytest.approx(0, abs=1e-5) and out[inside].std() == pytest.approx(1, abs=1e-5)
