"""SEG writer: segments read back voxel-exact with highdicom, dciodvfy clean (no warnings)."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pytest

from inference.outputs.codes import METASTATIC_NEOPLASM
from inference.outputs.notice import DEMO_WARNING
from inference.outputs.seg import build_seg
from inference.result import LoadedSeries


def read_back(seg: hd.seg.Segmentation, path: Path, series: LoadedSeries) -> tuple[hd.seg.Segmentation, np.ndarray]:
    """Write, read back and return the combined segment numbers on the source slices."""
    uids = [ds.SOPInstanceUID for ds in series.datasets]
    seg.save_as(path, enforce_file_format=True)
    back = hd.seg.segread(path)
    labels = back.get_pixels_by_source_instance(
        uids, combine_segments=True, ignore_spatial_locations=True, assert_missing_frames_are_empty=True
    )
    return back, labels


def test_sagittal_segments_are_voxel_exact(tmp_path: Path, geometry_series, result_on, dciodvfy) -> None:
    series = geometry_series(
        shape=(6, 40, 50),
        row_spacing=0.7,
        col_spacing=1.3,
        slice_spacing=2.5,
        along_row=(0, 1, 0),
        along_col=(0, 0, -1),
        patient_name="Müller^Jörg",
    )
    labels = np.zeros((6, 40, 50), np.uint16)
    labels[1:4, 5:25, 5:25] = 7
    labels[2, 30:35, 30:35] = 3
    result = result_on(series, labels)
    back, segments = read_back(build_seg(result), tmp_path / "seg.dcm", series)
    assert back.PatientName == "Müller^Jörg"
    assert DEMO_WARNING in back.SeriesDescription
    assert back.number_of_segments == len(result.lesions) == 2
    for number, lesion in enumerate(result.lesions, start=1):
        assert np.array_equal(segments == number, result.lesion_mask(lesion))
        description = back.get_segment_description(number)
        assert description.segment_label == lesion.name
        assert description.segmented_property_type == METASTATIC_NEOPLASM
    errors, warnings = dciodvfy(tmp_path / "seg.dcm")
    assert errors == [] and warnings == []


def test_oblique_phantom_seg(tmp_path: Path, phantom_case, result_on, dciodvfy) -> None:
    series, labels = phantom_case(
        31, orientation="oblique", matrix=64, slices=24, n_lesions=2, patient_name="山田^太郎"
    )
    result = result_on(series, labels)
    back, segments = read_back(build_seg(result), tmp_path / "seg.dcm", series)
    assert back.PatientName == "山田^太郎"
    for number, lesion in enumerate(result.lesions, start=1):
        assert np.array_equal(segments == number, result.lesion_mask(lesion))
    errors, warnings = dciodvfy(tmp_path / "seg.dcm")
    assert errors == [] and warnings == []


def test_no_lesions_is_rejected(tmp_path: Path, geometry_series, result_on) -> None:
    series = geometry_series(
        shape=(2, 8, 8),
        row_spacing=1.0,
        col_spacing=1.0,
        slice_spacing=1.0,
        along_row=(1, 0, 0),
        along_col=(0, 1, 0),
    )
    with pytest.raises(ValueError, match="no lesions"):
        build_seg(result_on(series, np.zeros((2, 8, 8), np.uint16)))
