"""Lesion extraction (components, order, volumes, diameters) and the patient EGFR rule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk

from inference.imaging.postprocess import aggregate_egfr, extract_lesions
from inference.result import EgfrCall


def probability_image(array: np.ndarray, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=None):
    image = sitk.GetImageFromArray(array.astype(np.float32))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(direction)
    return image


def extract_anywhere(probability: sitk.Image, *, threshold: float = 0.5, min_volume_mm3: float = 20.0):
    """extract_lesions with a brain mask that covers the whole volume (tests of everything but the mask)."""
    everywhere = sitk.Cast(probability >= -1, sitk.sitkUInt8)
    return extract_lesions(probability, brain_mask=everywhere, threshold=threshold, min_volume_mm3=min_volume_mm3)


def test_components_are_numbered_by_size_and_small_ones_dropped():
    array = np.zeros((20, 40, 40))
    array[2:4, 2:4, 2:4] = 0.9  # 8 voxels
    array[10:15, 10:20, 10:20] = 0.8  # 500 voxels
    array[10:14, 30:35, 30:35] = 0.7  # 100 voxels
    array[18, 38, 38] = 0.99  # 1 voxel: below the minimum volume
    label_map, lesions = extract_anywhere(probability_image(array), threshold=0.5, min_volume_mm3=5)
    assert [lesion.name for lesion in lesions] == ["GTV_1", "GTV_2", "GTV_3"]
    assert [lesion.voxel_count for lesion in lesions] == [500, 100, 8]
    labels = sitk.GetArrayFromImage(label_map)
    assert label_map.GetPixelID() == sitk.sitkUInt16
    assert (labels[10:15, 10:20, 10:20] == 1).all() and (labels[2:4, 2:4, 2:4] == 3).all()
    assert labels[18, 38, 38] == 0
    assert [lesion.label for lesion in lesions] == [1, 2, 3]


def test_threshold_is_strict():
    array = np.zeros((10, 10, 10))
    array[2:6, 2:6, 2:6] = 0.5
    _, lesions = extract_anywhere(probability_image(array), threshold=0.5, min_volume_mm3=0)
    assert lesions == []


def test_diagonal_neighbours_are_one_lesion():
    array = np.zeros((10, 10, 10))
    for k in range(6):
        array[k + 2, k + 2, k + 2] = 1.0  # a chain touching only at corners
    _, lesions = extract_anywhere(probability_image(array), min_volume_mm3=0)
    assert len(lesions) == 1 and lesions[0].voxel_count == 6


def test_equal_sizes_are_ordered_by_position():
    array = np.zeros((10, 20, 20))
    array[5:7, 12:14, 2:4] = 1.0
    array[5:7, 2:4, 12:14] = 1.0  # same size, earlier in array order
    label_map, lesions = extract_anywhere(probability_image(array), min_volume_mm3=0)
    labels = sitk.GetArrayFromImage(label_map)
    assert labels[5, 2, 12] == 1 and labels[5, 12, 2] == 2


def test_volume_diameter_and_centroid_of_a_box_use_real_spacing_and_geometry():
    array = np.zeros((12, 30, 30))
    array[2:5, 5:15, 10:30] = 1.0  # 3 slices x 10 rows x 20 columns
    spacing = (0.5, 0.8, 4.0)  # column, row, slice spacing
    rotation = sitk.VersorTransform((1.0, 1.0, 0.3), 0.7).GetMatrix()
    image = probability_image(array, spacing, origin=(-50.0, 20.0, 7.0), direction=rotation)
    _, (lesion,) = extract_anywhere(image, min_volume_mm3=0)
    assert lesion.voxel_count == 600
    assert lesion.volume_cm3 == pytest.approx(600 * 0.5 * 0.8 * 4.0 / 1000)
    extent = np.array([20 * 0.5, 10 * 0.8, 3 * 4.0])
    assert lesion.max_diameter_mm == pytest.approx(float(np.linalg.norm(extent)))
    centre_index = (np.array([10 + 29, 5 + 14, 2 + 4]) / 2).tolist()  # (i, j, k) mean of voxel centres
    assert lesion.centroid_mm == pytest.approx(image.TransformContinuousIndexToPhysicalPoint(centre_index))


def test_diameter_of_a_sphere_is_within_one_voxel_diagonal():
    radius_mm, spacing = 10.0, (0.7, 0.7, 1.5)
    shape = (30, 50, 50)
    k, j, i = np.indices(shape)
    centre = np.array([15, 25, 25])
    distance = np.sqrt(
        ((i - centre[2]) * spacing[0]) ** 2 + ((j - centre[1]) * spacing[1]) ** 2 + ((k - centre[0]) * spacing[2]) ** 2
    )
    array = (distance <= radius_mm).astype(float)
    _, (lesion,) = extract_anywhere(probability_image(array, spacing), min_volume_mm3=0)
    diagonal = math.dist((0, 0, 0), spacing)
    assert 2 * radius_mm <= lesion.max_diameter_mm <= 2 * radius_mm + diagonal
    assert lesion.volume_cm3 == pytest.approx(4 / 3 * math.pi * radius_mm**3 / 1000, rel=0.05)


def test_single_voxel_diameter_is_its_diagonal():
    array = np.zeros((5, 5, 5))
    array[2, 2, 2] = 1.0
    _, (lesion,) = extract_anywhere(probability_image(array, (1.0, 2.0, 3.0)), min_volume_mm3=0)
    assert lesion.max_diameter_mm == pytest.approx(math.sqrt(1 + 4 + 9))


def test_no_tumour_gives_an_empty_label_map():
    label_map, lesions = extract_anywhere(probability_image(np.zeros((6, 6, 6))))
    assert lesions == [] and not sitk.GetArrayViewFromImage(label_map).any()


# --- patient EGFR ------------------------------------------------------------------------


def test_egfr_upper_half_of_tumour_slices_by_area():
    area = np.array([0, 50, 10, 40, 0, 30])
    prob = np.array([0.99, 0.9, 0.1, 0.7, 0.99, 0.2])
    prediction = aggregate_egfr(area, prob)  # 4 tumour slices -> the 2 largest: 50 and 40
    assert prediction.call is EgfrCall.MUTANT
    assert prediction.mutant_probability == pytest.approx(0.8)
    assert prediction.slices_used == 2


def test_egfr_odd_count_rounds_up():
    area = np.array([5, 4, 3, 2, 1])
    prob = np.array([0.2, 0.2, 0.2, 0.9, 0.9])
    prediction = aggregate_egfr(area, prob)  # ceil(5 / 2) = 3 slices
    assert prediction.slices_used == 3
    assert prediction.mutant_probability == pytest.approx(0.2)
    assert prediction.call is EgfrCall.WILD_TYPE


def test_egfr_one_tumour_slice_is_used():
    prediction = aggregate_egfr(np.array([0, 7, 0]), np.array([0.1, 0.6, 0.1]))
    assert prediction.slices_used == 1 and prediction.call is EgfrCall.MUTANT


def test_egfr_exactly_half_is_wild_type():
    prediction = aggregate_egfr(np.array([2.0, 2.0, 1.0, 1.0]), np.array([0.4, 0.6, 0.9, 0.9]))
    assert prediction.mutant_probability == pytest.approx(0.5) and prediction.call is EgfrCall.WILD_TYPE


def test_egfr_ties_in_area_are_broken_by_slice_index():
    prediction = aggregate_egfr(np.array([3, 3, 3, 3]), np.array([0.9, 0.8, 0.1, 0.1]))
    assert prediction.mutant_probability == pytest.approx(0.85)


def test_egfr_without_tumour_is_not_assessable():
    prediction = aggregate_egfr(np.zeros(12), np.full(12, 0.99))
    assert prediction.call is EgfrCall.NOT_ASSESSABLE
    assert prediction.mutant_probability is None and prediction.slices_used == 0


def test_egfr_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="equal 1-D arrays"):
        aggregate_egfr(np.ones(3), np.ones(4))


def test_diameter_of_a_flat_lesion_on_one_slice():
    array = np.zeros((5, 20, 20))
    array[2, 5:10, 5:15] = 1.0  # 5 rows x 10 columns on one 3 mm slice
    _, (lesion,) = extract_anywhere(probability_image(array, (0.5, 0.5, 3.0)), min_volume_mm3=0)
    assert lesion.max_diameter_mm == pytest.approx(math.sqrt(5.0**2 + 2.5**2 + 3.0**2))


def brain_box(probability: sitk.Image, box: tuple[slice, slice, slice]) -> sitk.Image:
    """A brain mask that is 1 inside `box` (k, j, i) on `probability`'s grid."""
    array = np.zeros(sitk.GetArrayViewFromImage(probability).shape, np.uint8)
    array[box] = 1
    mask = sitk.GetImageFromArray(array)
    mask.CopyInformation(probability)
    return mask


def test_detections_outside_the_brain_are_never_reported():
    array = np.zeros((20, 40, 40))
    array[5:10, 5:10, 5:10] = 0.9  # inside the brain
    array[5:10, 30:36, 30:36] = 0.95  # outside: scalp
    array[12:18, 2:12, 18:20] = 0.9  # a rim along the brain's edge: 2 of its 10 rows inside
    array[:, :, 39] = 0.99  # the field-of-view edge
    probability = probability_image(array)
    brain = brain_box(probability, (slice(0, 20), slice(0, 25), slice(0, 25)))
    brain_array = sitk.GetArrayFromImage(brain) > 0
    brain_array[12:18, 2:4, 18:20] = True
    brain_array[12:18, 4:12, 18:20] = False
    brain = sitk.GetImageFromArray(brain_array.astype(np.uint8))
    brain.CopyInformation(probability)
    label_map, lesions = extract_lesions(probability, brain_mask=brain, threshold=0.5, min_volume_mm3=0)
    labels = sitk.GetArrayFromImage(label_map)
    assert [lesion.voxel_count for lesion in lesions] == [125]
    assert not labels[~brain_array].any()
    assert (labels[5:10, 5:10, 5:10] == 1).all()


def test_a_detection_mostly_inside_the_brain_is_cut_to_the_brain():
    array = np.zeros((10, 20, 20))
    array[2:8, 5:15, 5:15] = 0.9  # 600 voxels, 480 inside
    probability = probability_image(array)
    brain = brain_box(probability, (slice(0, 10), slice(0, 13), slice(0, 20)))
    label_map, (lesion,) = extract_lesions(probability, brain_mask=brain, threshold=0.5, min_volume_mm3=0)
    assert lesion.voxel_count == 6 * 8 * 10
    assert not sitk.GetArrayFromImage(label_map)[:, 13:, :].any()


def test_a_brain_mask_on_another_grid_is_refused():
    probability = probability_image(np.zeros((6, 6, 6)))
    with pytest.raises(ValueError, match="brain mask"):
        other_grid = brain_box(probability_image(np.zeros((6, 6, 7))), np.s_[:, :, :])
        extract_lesions(probability, brain_mask=other_grid, threshold=0.5, min_volume_mm3=20.0)
