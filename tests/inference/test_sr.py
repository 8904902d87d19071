"""SR writer: TID 1500 content read back with highdicom, dciodvfy, character set.

dciodvfy warnings accepted (anything else, and every "Error" line, fails):
``Unrecognized defined term <99DICOMNODE> ... <Coding Scheme Designator>`` --
our private coding scheme (`inference.outputs.codes`) is not in dciodvfy's list of
known designators; it is declared in the Coding Scheme Identification Sequence
as PS3.16 8.2 asks for private schemes.
"""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from inference.outputs import codes
from inference.outputs.codes import PrivateCode
from inference.outputs.notice import DEMO_DATA_WARNING, DEMO_WARNING, REVIEW_NOTICE
from inference.outputs.sr import EGFR_TRACKING_IDENTIFIER, build_sr
from inference.result import EgfrCall, EgfrPrediction, InferenceResult, ModelIdentity
from tests.helpers.dciodvfy import ACCEPTED_WARNING

CLINICAL_MODEL = ModelIdentity(name="mtsa-net", version="2.3.1", is_demo=False)


@pytest.fixture
def series(tmp_path: Path, geometry_series):
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


def two_lesions(shape: tuple[int, int, int]) -> np.ndarray:
    labels = np.zeros(shape, np.uint16)
    labels[1:4, 5:25, 5:25] = 1
    labels[2, 30:35, 30:35] = 2
    return labels


def write_and_read(sr: hd.sr.Comprehensive3DSR, path: Path) -> hd.sr.Comprehensive3DSR:
    sr.save_as(path, enforce_file_format=True)
    return hd.sr.srread(path)


def groups_by_identifier(
    sr: hd.sr.Comprehensive3DSR,
) -> dict[str, hd.sr.MeasurementsAndQualitativeEvaluations]:
    report = hd.sr.MeasurementReport.from_sequence(sr.content)
    return {group.tracking_identifier: group for group in report.get_image_measurement_groups()}


def assert_dciodvfy_clean(messages: tuple[list[str], list[str]]) -> None:
    errors, warnings = messages
    assert errors == []
    assert all(ACCEPTED_WARNING in warning for warning in warnings), warnings


def statement(sr: hd.sr.Comprehensive3DSR) -> str:
    """The TEXT of the TID 1500 Qualitative Evaluations container."""
    (container,) = [
        item
        for item in sr.ContentSequence
        if item.ConceptNameCodeSequence[0].CodeValue == codes.QUALITATIVE_EVALUATIONS.value
    ]
    (text,) = container.ContentSequence
    assert text.ConceptNameCodeSequence[0].CodeValue == PrivateCode.AI_STATEMENT.value[0]
    return text.TextValue


def test_lesion_measurements_and_egfr_read_back(series, tmp_path: Path, result_on, dciodvfy) -> None:
    result = result_on(series, two_lesions((6, 40, 50)))
    sr = write_and_read(build_sr(result), tmp_path / "sr.dcm")
    groups = groups_by_identifier(sr)
    assert set(groups) == {"GTV_1", "GTV_2", EGFR_TRACKING_IDENTIFIER}
    for lesion in result.lesions:
        group = groups[lesion.name]
        assert group.tracking_uid.startswith("2.25.")
        assert group.finding_type == codes.METASTATIC_NEOPLASM
        (volume,) = group.get_measurements(name=codes.VOLUME)
        assert volume.value == lesion.volume_cm3
        assert volume.unit == codes.CUBIC_CENTIMETRE
        (diameter,) = group.get_measurements(name=codes.DIAMETER)
        assert diameter.value == lesion.max_diameter_mm
        assert diameter.unit == codes.MILLIMETRE
        assert diameter.derivation == codes.MAXIMUM
    egfr = groups[EGFR_TRACKING_IDENTIFIER]
    (probability,) = egfr.get_measurements(name=PrivateCode.EGFR_MUTANT_PROBABILITY.code)
    assert probability.value == result.egfr.mutant_probability
    (call,) = egfr.get_qualitative_evaluations(name=PrivateCode.EGFR_STATUS.code)
    assert codes.egfr_call_from_code(call.value.value) == result.egfr.call
    assert_dciodvfy_clean(dciodvfy(tmp_path / "sr.dcm"))


def test_observer_is_the_algorithm(series, result_on) -> None:
    sr = build_sr(result_on(series, two_lesions((6, 40, 50))))
    report = hd.sr.MeasurementReport.from_sequence(sr.content)
    (device,) = report.get_observer_contexts(observer_type=codes.DEVICE)
    assert device.observer_identifying_attributes.name == "mtsa-demo"
    names = {
        (item.ConceptNameCodeSequence[0].CodeValue, item.TextValue)
        for group in report.get_image_measurement_groups()
        for item in group[0].ContentSequence
        if item.ValueType == "TEXT"
    }
    assert {("111001", "mtsa-demo"), ("111003", "0.1.0")} <= names


def test_source_images_are_the_evidence(series, result_on) -> None:
    sr = build_sr(result_on(series, two_lesions((6, 40, 50))))
    (study,) = sr.CurrentRequestedProcedureEvidenceSequence
    (referenced,) = study.ReferencedSeriesSequence
    assert referenced.SeriesInstanceUID == series.datasets[0].SeriesInstanceUID
    listed = {item.ReferencedSOPInstanceUID for item in referenced.ReferencedSOPSequence}
    assert listed == {ds.SOPInstanceUID for ds in series.datasets}
    assert sr.StudyInstanceUID == series.datasets[0].StudyInstanceUID
    assert sr.SeriesInstanceUID != series.datasets[0].SeriesInstanceUID
    assert sr.SOPInstanceUID.startswith("2.25.") and sr.SeriesInstanceUID.startswith("2.25.")


def test_demo_model_statement_and_series_description(series, tmp_path: Path, result_on) -> None:
    sr = write_and_read(build_sr(result_on(series, two_lesions((6, 40, 50)))), tmp_path / "sr.dcm")
    text = statement(sr)
    assert DEMO_DATA_WARNING in text and REVIEW_NOTICE in text and "mtsa-demo 0.1.0" in text
    assert DEMO_WARNING in sr.SeriesDescription
    assert (sr.CompletionFlag, sr.VerificationFlag, sr.PreliminaryFlag) == ("COMPLETE", "UNVERIFIED", "PRELIMINARY")
    assert sr.ContentDate and sr.ContentTime and sr.SeriesDate and sr.InstanceCreationDate
    (scheme,) = sr.CodingSchemeIdentificationSequence
    assert scheme.CodingSchemeDesignator == codes.PRIVATE_SCHEME


def test_clinical_model_statement(series, result_on) -> None:
    sr = build_sr(result_on(series, two_lesions((6, 40, 50)), model=CLINICAL_MODEL))
    assert "DEMO" not in statement(sr) + sr.SeriesDescription
    assert REVIEW_NOTICE in statement(sr)


def test_non_ascii_patient_name_survives(series, tmp_path: Path, result_on) -> None:
    assert series.datasets[0].SpecificCharacterSet == "ISO_IR 100"
    sr = write_and_read(build_sr(result_on(series, two_lesions((6, 40, 50)))), tmp_path / "sr.dcm")
    assert sr.SpecificCharacterSet == "ISO_IR 192"
    assert sr.PatientName == "Müller^Jörg"


def test_no_lesions_reports_egfr_not_assessable(series, tmp_path: Path, result_on, dciodvfy) -> None:
    result = result_on(series, np.zeros((6, 40, 50), np.uint16))
    sr = write_and_read(build_sr(result), tmp_path / "sr.dcm")
    groups = groups_by_identifier(sr)
    assert set(groups) == {EGFR_TRACKING_IDENTIFIER}
    egfr = groups[EGFR_TRACKING_IDENTIFIER]
    assert egfr.get_measurements() == []
    (call,) = egfr.get_qualitative_evaluations()
    assert call.value == PrivateCode.EGFR_NOT_ASSESSABLE.code
    assert_dciodvfy_clean(dciodvfy(tmp_path / "sr.dcm"))


def test_phantom_sr_with_japanese_name(tmp_path: Path, phantom_case, result_on, dciodvfy) -> None:
    series, labels = phantom_case(
        21, orientation="oblique", matrix=64, slices=24, n_lesions=2, patient_name="山田^太郎"
    )
    result = result_on(
        series,
        labels,
        egfr=EgfrPrediction(EgfrCall.WILD_TYPE, 0.125, 2),
        model=ModelIdentity("mtsa-net", "1.0.0", is_demo=False),
    )
    sr = write_and_read(build_sr(result), tmp_path / "sr.dcm")
    assert sr.PatientName == "山田^太郎"
    groups = groups_by_identifier(sr)
    for lesion in result.lesions:
        (volume,) = groups[lesion.name].get_measurements(name=codes.VOLUME)
        assert volume.value == lesion.volume_cm3
    (probability,) = groups[EGFR_TRACKING_IDENTIFIER].get_measurements()
    assert probability.value == 0.125
    assert_dciodvfy_clean(dciodvfy(tmp_path / "sr.dcm"))


@pytest.mark.parametrize(
    ("egfr", "match"),
    [
        (EgfrPrediction(EgfrCall.MUTANT, None, 0), "EGFR call"),
        (EgfrPrediction(EgfrCall.NOT_ASSESSABLE, 0.4, 0), "EGFR call"),
        (EgfrPrediction(EgfrCall.MUTANT, 1.5, 3), "outside"),
    ],
)
def test_inconsistent_egfr_is_rejected(series, egfr: EgfrPrediction, match: str, result_on) -> None:
    result = result_on(series, two_lesions((6, 40, 50)), egfr=egfr)
    with pytest.raises(ValueError, match=match):
        build_sr(result)


def test_series_number_is_validated(series, result_on) -> None:
    result: InferenceResult = result_on(series, two_lesions((6, 40, 50)))
    with pytest.raises(ValueError, match="series_number"):
        build_sr(result, series_number=0)


def test_egfr_call_codes_round_trip() -> None:
    for call in EgfrCall:
        assert codes.egfr_call_from_code(codes.egfr_call_code(call).value) == call
    with pytest.raises(ValueError, match="value"):
        codes.egfr_call_from_code("EGFR-XX")


@pytest.mark.parametrize(
    ("charset", "name"),
    [(["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎"), ("ISO_IR 192", "Müller^Jörg")],
    ids=["iso2022-japanese", "utf8"],
)
def test_any_source_character_set_and_a_missing_patient_id_still_build(
    series, tmp_path: Path, result_on, dciodvfy, charset, name
) -> None:
    """An outside tester's valid ISO 2022 series (and one without PatientID) failed every attempt in
    highdicom, which accepts only single defined terms and reads PatientID by name."""
    headers = []
    for number, ds in enumerate(series.datasets):  # as the node reads them: from files, text still encoded
        ds.SpecificCharacterSet, ds.PatientName = charset, name
        del ds.PatientID
        ds.save_as(tmp_path / f"{number}.dcm", enforce_file_format=True)
        headers.append(pydicom.dcmread(tmp_path / f"{number}.dcm"))
    series.datasets[:] = headers
    sr = write_and_read(build_sr(result_on(series, two_lesions((6, 40, 50)))), tmp_path / "sr.dcm")
    assert (sr.SpecificCharacterSet, sr.PatientName, sr.PatientID) == ("ISO_IR 192", name, "")
    assert "PatientID" not in series.datasets[0]  # the source headers are not changed
    errors, warnings = dciodvfy(tmp_path / "sr.dcm")
    empty_id = "Missing attribute or value that would be needed to build DICOMDIR - Patient ID"
    assert errors == [] and all(ACCEPTED_WARNING in w or empty_id in w for w in warnings), warnings
