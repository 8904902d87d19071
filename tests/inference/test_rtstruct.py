"""RTSTRUCT writer: contour maths, round trip through an independent rasteriser, dciodvfy.

dciodvfy warnings: none are expected for the RTSTRUCTs built here (checked
below); any "Error" line fails the test.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import skimage.draw

from inference.imaging.volume_loader import load_series
from inference.outputs.notice import DEMO_WARNING
from inference.outputs.rtstruct import (
    MAX_SIMPLIFY_TOLERANCE_PX,
    build_rtstruct,
    check_roi_name_prefix,
    pixel_to_patient,
    roi_display_colours,
    slice_contours,
)
from inference.outputs.rtstruct_raster import patient_to_continuous_index, rasterise_roi
from inference.result import ModelIdentity

DEMO_MODEL = ModelIdentity(name="mtsa-demo", version="0.1.0", is_demo=True)
CLINICAL_MODEL = ModelIdentity(name="mtsa-net", version="2.3.1", is_demo=False)

# Direction cosines (along a row, along a column) of the hand-built series.
_OBLIQUE_ROW = (np.cos(0.3) * np.cos(0.2), np.sin(0.3) * np.cos(0.2), np.sin(0.2))
_OBLIQUE_COL = tuple(np.cross((0.0, 0.0, 1.0), _OBLIQUE_ROW) / np.linalg.norm(np.cross((0.0, 0.0, 1.0), _OBLIQUE_ROW)))
ORIENTATIONS = {
    "axial": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
    "coronal": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
    "oblique": (_OBLIQUE_ROW, _OBLIQUE_COL),
}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient of two boolean arrays."""
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def tricky_labels(shape: tuple[int, int, int]) -> np.ndarray:
    """GTV with a hole holding an island (slice 2); a lesion with two islands on slice 2."""
    labels = np.zeros(shape, np.uint16)
    labels[1:4, 5:25, 5:25] = 1
    labels[2, 10:20, 10:20] = 0
    labels[2, 13:16, 13:16] = 1
    labels[2, 30:35, 30:35] = 2
    labels[2, 30:35, 40:45] = 2
    labels[3, 33, 38] = 2
    return labels


def write_and_read(ds: pydicom.Dataset, path: Path) -> pydicom.Dataset:
    """Save as a DICOM file and read it back."""
    ds.save_as(path, enforce_file_format=True)
    return pydicom.dcmread(path)


# --- contour maths -------------------------------------------------------------------


def test_single_pixel_gives_a_diamond_around_its_centre() -> None:
    mask = np.zeros((5, 5), bool)
    mask[2, 3] = True
    (contour,) = slice_contours(mask)
    assert len(contour) == 4
    assert np.allclose(sorted(map(tuple, contour)), [(1.5, 3), (2, 2.5), (2, 3.5), (2.5, 3)])


def test_straight_edges_lie_on_pixel_edges_and_collinear_points_are_dropped() -> None:
    mask = np.zeros((8, 8), bool)
    mask[2:6, 1:7] = True
    (contour,) = slice_contours(mask)
    assert len(contour) == 8  # four edges, four cut corners
    assert contour[:, 0].min() == pytest.approx(1.5) and contour[:, 0].max() == pytest.approx(5.5)
    assert contour[:, 1].min() == pytest.approx(0.5) and contour[:, 1].max() == pytest.approx(6.5)


def test_hole_and_islands_are_separate_contours() -> None:
    labels = tricky_labels((4, 40, 50))
    assert len(slice_contours(labels[2] == 1)) == 3  # outline, hole, island in the hole
    assert len(slice_contours(labels[2] == 2)) == 2
    assert len(slice_contours(labels[1] == 1)) == 1


def test_diagonal_neighbours_do_not_share_contour_points() -> None:
    mask = np.eye(4, dtype=bool)
    contours = slice_contours(mask)
    assert len(contours) == 4
    points = [tuple(p) for c in contours for p in c]
    assert len(points) == len(set(points))


@pytest.mark.parametrize("tolerance", [0.0, 0.25, 0.35])
def test_even_odd_fill_of_contours_reproduces_random_masks(tolerance: float) -> None:
    rng = np.random.default_rng(7)
    for _ in range(60):
        mask = rng.random((24, 24)) < rng.uniform(0.2, 0.8)
        filled = np.zeros_like(mask)
        for contour in slice_contours(mask, tolerance):
            inside = np.zeros_like(mask)
            inside[skimage.draw.polygon(contour[:, 0], contour[:, 1], mask.shape)] = True
            filled ^= inside
        assert np.array_equal(filled, mask)


@pytest.mark.parametrize("tolerance", [-0.1, MAX_SIMPLIFY_TOLERANCE_PX, 1.0])
def test_simplification_tolerance_is_validated(tolerance: float) -> None:
    with pytest.raises(ValueError, match="simplify_tolerance_px"):
        slice_contours(np.ones((3, 3), bool), tolerance)


def test_roi_display_colours_are_distinct() -> None:
    colours = roi_display_colours(200)
    assert len(set(colours)) == 200
    assert all(0 <= c <= 255 for colour in colours for c in colour)


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_pixel_to_patient_agrees_with_gdcm_geometry(orientation: str, tmp_path: Path, geometry_series) -> None:
    along_row, along_col = ORIENTATIONS[orientation]
    series = geometry_series(
        shape=(3, 7, 11),
        row_spacing=0.6,
        col_spacing=1.4,
        slice_spacing=3.0,
        along_row=along_row,
        along_col=along_col,
    )
    points_rc = np.array([[0.0, 0.0], [6.0, 0.0], [0.0, 10.0], [2.25, 7.5]])
    for k in range(3):
        mine = pixel_to_patient(points_rc, series.datasets[k])
        itk = [series.image.TransformContinuousIndexToPhysicalPoint((c, r, float(k))) for r, c in points_rc]
        assert np.allclose(mine, itk, atol=1e-4)
        back = patient_to_continuous_index(mine, series)
        assert np.allclose(back, [(c, r, k) for r, c in points_rc], atol=1e-4)


# --- round trip on hand-built series (anisotropic in-plane spacing) -----------------------


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_round_trip_reproduces_holes_and_islands_exactly(
    orientation: str, tmp_path: Path, geometry_series, result_on, dciodvfy
) -> None:
    along_row, along_col = ORIENTATIONS[orientation]
    series = geometry_series(
        shape=(6, 40, 50),
        row_spacing=0.7,
        col_spacing=1.3,
        slice_spacing=2.5,
        along_row=along_row,
        along_col=along_col,
    )
    result = result_on(series, tricky_labels((6, 40, 50)))
    rtstruct = write_and_read(build_rtstruct(result), tmp_path / "rs.dcm")
    for roi in rtstruct.StructureSetROISequence:
        lesion = next(lesion for lesion in result.lesions if lesion.name == roi.ROIName)
        raster = rasterise_roi(rtstruct, int(roi.ROINumber), series)
        assert np.array_equal(raster, result.lesion_mask(lesion)), roi.ROIName
    errors, warnings = dciodvfy(tmp_path / "rs.dcm")
    assert errors == []
    assert warnings == []


def test_jittered_slice_positions_loaded_by_the_node(tmp_path: Path, geometry_files, result_on, dciodvfy) -> None:
    along_row, along_col = ORIENTATIONS["oblique"]
    paths = geometry_files(
        shape=(10, 40, 50),
        row_spacing=0.7,
        col_spacing=1.3,
        slice_spacing=1.0,
        along_row=along_row,
        along_col=along_col,
        position_jitter_mm=0.045,
    )
    series = load_series(paths)
    labels = np.zeros((10, 40, 50), np.uint16)
    labels[2:8] = tricky_labels((6, 40, 50))[[1, 1, 2, 2, 3, 3]]
    result = result_on(series, labels)
    rtstruct = write_and_read(build_rtstruct(result), tmp_path / "rs.dcm")
    for number, lesion in enumerate(result.lesions, start=1):
        assert np.array_equal(rasterise_roi(rtstruct, number, series), result.lesion_mask(lesion))
    errors, _ = dciodvfy(tmp_path / "rs.dcm")
    assert errors == []


def test_contour_image_references_match_geometry(tmp_path: Path, geometry_series, result_on) -> None:
    along_row, along_col = ORIENTATIONS["oblique"]
    series = geometry_series(
        shape=(6, 40, 50),
        row_spacing=0.7,
        col_spacing=1.3,
        slice_spacing=2.5,
        along_row=along_row,
        along_col=along_col,
    )
    labels = tricky_labels((6, 40, 50))
    rtstruct = build_rtstruct(result_on(series, labels))
    uids = [ds.SOPInstanceUID for ds in series.datasets]
    for roi_contour in rtstruct.ROIContourSequence:
        for contour in roi_contour.ContourSequence:
            points = np.asarray(contour.ContourData, float).reshape(-1, 3)
            k = int(np.rint(patient_to_continuous_index(points, series)[0, 2]))
            (image,) = contour.ContourImageSequence
            assert image.ReferencedSOPInstanceUID == uids[k]
            assert image.ReferencedSOPClassUID == series.datasets[k].SOPClassUID
            assert int(contour.NumberOfContourPoints) == len(points) >= 3
    (frame,) = rtstruct.ReferencedFrameOfReferenceSequence
    assert frame.FrameOfReferenceUID == series.datasets[0].FrameOfReferenceUID
    (study,) = frame.RTReferencedStudySequence
    assert study.ReferencedSOPInstanceUID == series.datasets[0].StudyInstanceUID
    (referenced_series,) = study.RTReferencedSeriesSequence
    assert referenced_series.SeriesInstanceUID == series.datasets[0].SeriesInstanceUID
    listed = [item.ReferencedSOPInstanceUID for item in referenced_series.ContourImageSequence]
    assert listed == [uids[k] for k in np.flatnonzero(labels.any(axis=(1, 2)))]


# --- round trip on synthetic phantoms ------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("orientation", "seed"), [("axial", 11), ("sagittal", 12), ("oblique", 13)])
def test_phantom_round_trip_dice(
    orientation: str, seed: int, tmp_path: Path, phantom_case, result_on, dciodvfy
) -> None:
    series, labels = phantom_case(
        seed, orientation=orientation, matrix=96, slices=40, n_lesions=3, patient_name="山田^太郎"
    )
    assert series.image.GetSpacing()[2] != series.image.GetSpacing()[0]  # anisotropic voxels
    result = result_on(series, labels)
    assert result.lesions
    rtstruct = write_and_read(build_rtstruct(result), tmp_path / "rs.dcm")
    assert rtstruct.PatientName == "山田^太郎"
    for roi in rtstruct.StructureSetROISequence:
        lesion = next(lesion for lesion in result.lesions if lesion.name == roi.ROIName)
        raster = rasterise_roi(rtstruct, int(roi.ROINumber), series)
        assert dice(raster, result.lesion_mask(lesion)) >= 0.95, roi.ROIName
    errors, warnings = dciodvfy(tmp_path / "rs.dcm")
    assert errors == []
    assert warnings == []


# --- header content ---------------------------------------------------------------------


@pytest.fixture
def small_series(tmp_path: Path, geometry_series):
    series = geometry_series(
        shape=(6, 40, 50),
        row_spacing=0.7,
        col_spacing=1.3,
        slice_spacing=2.5,
        along_row=(1, 0, 0),
        along_col=(0, 1, 0),
        patient_name="Müller^Jörg",
    )
    return series


def test_demo_model_is_labelled_not_for_clinical_use(small_series, tmp_path: Path, result_on) -> None:
    result = result_on(small_series, tricky_labels((6, 40, 50)), model=DEMO_MODEL)
    ds = write_and_read(build_rtstruct(result), tmp_path / "rs.dcm")
    assert DEMO_WARNING in ds.SeriesDescription
    assert DEMO_WARNING in ds.StructureSetName and DEMO_WARNING in ds.StructureSetDescription
    assert ds.StructureSetLabel == "DEMO-NONCLINICAL"
    for roi in ds.StructureSetROISequence:
        assert DEMO_WARNING in roi.ROIDescription
        assert roi.ROIGenerationAlgorithm == "AUTOMATIC"
        assert roi.ROIGenerationDescription == "mtsa-demo 0.1.0"


def test_clinical_model_is_labelled_as_proposal(small_series, result_on) -> None:
    ds = build_rtstruct(result_on(small_series, tricky_labels((6, 40, 50)), model=CLINICAL_MODEL))
    assert "DEMO" not in ds.SeriesDescription + ds.StructureSetDescription
    assert "REVIEW" in ds.SeriesDescription.upper()
    assert all("review" in roi.ROIDescription for roi in ds.StructureSetROISequence)
    assert all(roi.ROIGenerationDescription == "mtsa-net 2.3.1" for roi in ds.StructureSetROISequence)


def test_study_patient_series_and_observations(small_series, tmp_path: Path, result_on) -> None:
    result = result_on(small_series, tricky_labels((6, 40, 50)))
    ds = write_and_read(build_rtstruct(result), tmp_path / "rs.dcm")
    source = small_series.datasets[0]
    assert source.SpecificCharacterSet == "ISO_IR 100"
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert ds.PatientName == "Müller^Jörg"
    assert (ds.PatientID, ds.StudyInstanceUID, ds.FrameOfReferenceUID) == (
        source.PatientID,
        source.StudyInstanceUID,
        source.FrameOfReferenceUID,
    )
    assert ds.SeriesInstanceUID != source.SeriesInstanceUID
    assert ds.SOPInstanceUID.startswith("2.25.") and ds.SeriesInstanceUID.startswith("2.25.")
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.Modality == "RTSTRUCT"
    assert ds.ApprovalStatus == "UNAPPROVED"
    assert len(ds.StructureSetDate) == 8 and ds.StructureSetTime and ds.SeriesDate
    assert [roi.ROIName for roi in ds.StructureSetROISequence] == ["GTV_1", "GTV_2"]
    assert [o.RTROIInterpretedType for o in ds.RTROIObservationsSequence] == ["GTV", "GTV"]
    colours = [tuple(item.ROIDisplayColor) for item in ds.ROIContourSequence]
    assert len(set(colours)) == len(colours)
    for item in ds.ROIContourSequence:
        assert all(c.ContourGeometricType == "CLOSED_PLANAR" for c in item.ContourSequence)


def test_roi_name_prefix_names_every_roi(small_series, tmp_path: Path, result_on) -> None:
    result = result_on(small_series, tricky_labels((6, 40, 50)))
    ds = write_and_read(build_rtstruct(result, roi_name_prefix="AI_"), tmp_path / "rs.dcm")
    assert [roi.ROIName for roi in ds.StructureSetROISequence] == ["AI_GTV_1", "AI_GTV_2"]


@pytest.mark.parametrize("prefix", ["", "AI_", "Brain_Mets_"[:10]])
def test_roi_name_prefix_that_fits_sixteen_characters_is_accepted(prefix: str) -> None:
    assert check_roi_name_prefix(prefix) == prefix
    assert len(prefix + "GTV_99") <= 16


@pytest.mark.parametrize(
    ("prefix", "reason"),
    [("HOSPITAL_AI_", "too long: .* 'HOSPITAL_AI_GTV_99' has 18; use at most 10"), ("AI\\", "backslash")],
)
def test_roi_name_prefix_that_cannot_make_a_valid_roi_name_is_refused(
    prefix: str, reason: str, small_series, result_on
) -> None:
    with pytest.raises(ValueError, match=reason):
        check_roi_name_prefix(prefix)
    with pytest.raises(ValueError, match=reason):
        build_rtstruct(result_on(small_series, tricky_labels((6, 40, 50))), roi_name_prefix=prefix)


def test_no_lesions_is_rejected(small_series, result_on) -> None:
    result = result_on(small_series, np.zeros((6, 40, 50), np.uint16))
    with pytest.raises(ValueError, match="no lesions"):
        build_rtstruct(result)


def test_lesion_without_voxels_is_an_error(small_series, result_on) -> None:
    result = result_on(small_series, tricky_labels((6, 40, 50)))
    result.label_map = sitk.GetImageFromArray((tricky_labels((6, 40, 50)) == 1).astype(np.uint16))
    result.label_map.CopyInformation(small_series.image)
    with pytest.raises(ValueError, match="GTV_2 .* no voxels"):
        build_rtstruct(result)


def test_label_map_must_match_the_source_grid(small_series, result_on) -> None:
    result = result_on(small_series, tricky_labels((6, 40, 50)))
    result.label_map = sitk.Image(50, 40, 5, sitk.sitkUInt16)
    with pytest.raises(ValueError, match="label map size"):
        build_rtstruct(result)


def test_headers_out_of_slice_order_are_rejected(small_series, result_on) -> None:
    result = result_on(small_series, tricky_labels((6, 40, 50)))
    datasets = result.series.datasets
    datasets[1], datasets[2] = datasets[2], datasets[1]
    with pytest.raises(ValueError, match="does not lie on slice 1"):
        build_rtstruct(result)


def test_series_number_is_validated(small_series, result_on) -> None:
    result = result_on(small_series, tricky_labels((6, 40, 50)))
    with pytest.raises(ValueError, match="series_number"):
        build_rtstruct(result, series_number=0)
