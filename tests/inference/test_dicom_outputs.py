"""write_dicom_outputs: Part 10 files named by SOP Instance UID; no RTSTRUCT without lesions."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import (
    Comprehensive3DSRStorage,
    ExplicitVRLittleEndian,
    RTStructureSetStorage,
    SegmentationStorage,
)

from inference.imaging.postprocess import extract_lesions
from inference.outputs import codes
from inference.outputs.dicom_outputs import write_dataset, write_dicom_outputs
from inference.outputs.rtstruct_raster import rasterise_roi
from inference.result import EgfrCall, EgfrPrediction, InferenceResult, ModelIdentity
from tests.helpers.dciodvfy import ACCEPTED_WARNING

# The one dciodvfy warning accepted for our SRs; see tests/inference/test_sr.py.


@pytest.fixture
def series(tmp_path: Path, geometry_series):
    series = geometry_series(
        shape=(4, 30, 30),
        row_spacing=1.0,
        col_spacing=1.0,
        slice_spacing=2.0,
        along_row=(1, 0, 0),
        along_col=(0, 1, 0),
    )
    return series


def test_writes_rtstruct_and_sr(series, tmp_path: Path, result_on) -> None:
    labels = np.zeros((4, 30, 30), np.uint16)
    labels[1:3, 5:15, 5:15] = 1
    paths = [o.path for o in write_dicom_outputs(result_on(series, labels), tmp_path / "out")]
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
    paths = [o.path for o in write_dicom_outputs(result_on(series, labels), tmp_path / "out", include_seg=True)]
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
    (path,) = [o.path for o in write_dicom_outputs(result, tmp_path / "out", include_seg=True)]
    assert path.name.startswith("SR_")


def test_phantom_through_postprocess_and_all_writers(tmp_path: Path, phantom_case, dciodvfy) -> None:
    """Production path: load_series, extract_lesions, then every writer; read back independently."""
    series, truth = phantom_case(
        41, orientation="oblique", matrix=80, slices=32, n_lesions=3, patient_name="Müller^Jörg"
    )
    probability = sitk.GetImageFromArray((truth > 0).astype(np.float32))
    probability.CopyInformation(series.image)
    everywhere = sitk.Cast(probability >= 0, sitk.sitkUInt8)
    label_map, lesions = extract_lesions(probability, brain_mask=everywhere, threshold=0.5, min_volume_mm3=0.0)
    assert lesions
    result = InferenceResult(
        series=series,
        label_map=label_map,
        probability_map=probability,
        lesions=lesions,
        egfr=EgfrPrediction(EgfrCall.WILD_TYPE, 0.25, 4),
        model=ModelIdentity("mtsa-demo", "0.1.0", True),
    )
    rtstruct_path, seg_path, sr_path = [o.path for o in write_dicom_outputs(result, tmp_path / "out", include_seg=True)]
    rtstruct = pydicom.dcmread(rtstruct_path)
    assert rtstruct.PatientName == "Müller^Jörg"
    for roi in rtstruct.StructureSetROISequence:
        lesion = next(lesion for lesion in lesions if lesion.name == roi.ROIName)
        raster = rasterise_roi(rtstruct, int(roi.ROINumber), series)
        mask = result.lesion_mask(lesion)
        assert 2.0 * (raster & mask).sum() / (raster.sum() + mask.sum()) >= 0.95
    report = hd.sr.MeasurementReport.from_sequence(hd.sr.srread(sr_path).content)
    volumes = {
        group.tracking_identifier: group.get_measurements(name=codes.VOLUME)[0].value
        for group in report.get_image_measurement_groups()
        if group.get_measurements(name=codes.VOLUME)
    }
    assert volumes == {lesion.name: lesion.volume_cm3 for lesion in lesions}
    for path in (rtstruct_path, seg_path, sr_path):
        errors, warnings = dciodvfy(path)
        assert errors == []
        assert all(ACCEPTED_WARNING in warning for warning in warnings), warnings


def test_invalid_uid_never_becomes_a_path(tmp_path: Path) -> None:
    ds = pydicom.Dataset()
    with pytest.warns(UserWarning, match="Invalid value for VR UI"):
        ds.SOPInstanceUID = "1.2/../../evil"
    with pytest.raises(ValueError, match="not a valid UID"):
        write_dataset(ds, tmp_path, "SR")
