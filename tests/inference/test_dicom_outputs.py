"""write_dicom_outputs: Part 10 files named by SOP Instance UID; no RTSTRUCT without lesions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    Comprehensive3DSRStorage,
    ExplicitVRLittleEndian,
    RTStructureSetStorage,
    SegmentationStorage,
)

from inference.dicom_outputs import write_dataset, write_dicom_outputs

# The one dciodvfy warning accepted for our SRs; see tests/inference/test_sr.py.
ACCEPTED_WARNING = (
    "Unrecognized defined term <99DICOMNODE> for value 1 of attribute <Coding Scheme Designator>"
)


@pytest.fixture
def series(tmp_path: Path, mr_series):
    series = mr_series(
        shape=(4, 30, 30), row_spacing=1.0, col_spacing=1.0, slice_spacing=2.0,
        along_row=(1, 0, 0), along_col=(0, 1, 0),
    )
    return series


def test_writes_rtstruct_and_sr(series, tmp_path: Path, result_on) -> None:
    labels = np.zeros((4, 30, 30), np.uint16)
    labels[1:3, 5:15, 5:15] = 1
    paths = write_dicom_outputs(result_on(series, labels), tmp_path / "out")
    assert [p.name.split("_")[0] for p in paths] == ["RTSTRUCT", "SR"]
    for path, sop_class in zip(paths, (RTStructureSetStorage, Comprehensive3DSRStorage)):
        ds = pydicom.dcmread(path)
        assert path.name == f"{path.name.split('_')[0]}_{ds.SOPInstanceUID}.dcm"
        assert ds.SOPClassUID == sop_class == ds.file_meta.MediaStorageSOPClassUID
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.preamble is not None
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in paths)


def test_seg_is_opt_in(series, tmp_path: Path, result_on, dciodvfy) -> None:
    labels = np.zeros((4, 30, 30), np.uint16)
    labels[1:3, 5:15, 5:15] = 1
    paths = write_dicom_outputs(result_on(series, labels), tmp_path / "out", include_seg=True)
    assert [p.name.split("_")[0] for p in paths] == ["RTSTRUCT", "SEG", "SR"]
    rtstruct, seg, sr = (pydicom.dcmread(p) for p in paths)
    assert seg.SOPClassUID == SegmentationStorage
    (study,) = sr.PertinentOtherEvidenceSequence
    assert study.StudyInstanceUID == rtstruct.StudyInstanceUID == seg.StudyInstanceUID
    listed = {
        (item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID)
        for series_item in study.ReferencedSeriesSequence
        for item in series_item.ReferencedSOPSequence
    }
    assert listed == {(ds.SOPClassUID, ds.SOPInstanceUID) for ds in (rtstruct, seg)}
    errors, warnings = dciodvfy(paths[2])
    assert errors == []
    assert all(ACCEPTED_WARNING in warning for warning in warnings), warnings


def test_no_lesions_writes_only_the_sr(series, tmp_path: Path, result_on) -> None:
    result = result_on(series, np.zeros((4, 30, 30), np.uint16))
    (path,) = write_dicom_outputs(result, tmp_path / "out", include_seg=True)
    assert path.name.startswith("SR_")


def test_invalid_uid_never_becomes_a_path(tmp_path: Path) -> None:
    ds = pydicom.Dataset()
    with pytest.warns(UserWarning, match="Invalid value for VR UI"):
        ds.SOPInstanceUID = "1.2/../../evil"
    with pytest.raises(ValueError, match="not a valid UID"):
        write_dataset(ds, tmp_path, "SR")
