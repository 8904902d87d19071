"""Structured Report writer: TID 1500 Measurement Report of lesions and EGFR, with highdicom.

DICOM PS3.3 A.35.13 (Comprehensive 3D SR IOD); PS3.16 TID 1500 (Measurement
Report), TID 1501 (Measurement and Qualitative Evaluation Group), TID 1002
(Observer Context), TID 4019 (Algorithm Identification).

Decisions
---------
- Comprehensive 3D SR built by `highdicom.sr.Comprehensive3DSR`; the source
  images are the evidence (Current Requested Procedure Evidence Sequence) and the
  patient and study attributes come from them.
- The observer is the algorithm: a Device observer (TID 1004) named after the
  model, with a UID derived from model name and version (the same model version
  always has the same device UID).
- One TID 1501 group per lesion, tracking identifier ``GTV_n`` with a new UID,
  finding "Neoplasm, metastatic" in the brain, Volume (cm3) and maximum Diameter
  (mm), with the algorithm identification. TID 1501 rather than TID 1411:
  TID 1411 can reference a SEG segment but not an RTSTRUCT ROI.
- Cost linear and small per lesion: `Comprehensive3DSR` deep-copies, re-parses
  and searches its whole content tree (about 0.1 s per lesion group), so it is
  built with the EGFR group only and the lesion groups, each built and
  validated by highdicom, are put in front of it in the Imaging Measurements
  container afterwards. The document is the same; the order of groups is
  lesions, then EGFR.
- One TID 1501 group for the patient-level EGFR prediction: the call as a coded
  qualitative evaluation and, when assessable, the mutant probability (UCUM "1").
  The codes are private (`inference.outputs.codes`): no standard code exists.
- The AI-review statement (and the demo-model warning) is a TEXT item in the
  TID 1500 "Qualitative Evaluations" container, and the Series Description says
  the same in short.
- The RTSTRUCT / SEG written from the same result can be listed in the
  Pertinent Other Evidence Sequence (PS3.3 C.17.2); lesion groups and ROIs /
  segments share the names ``GTV_n``.
- A re-run (`inference.outputs.supersession`) writes into the same output
  series and lists the SR it replaces in the Predecessor Documents Sequence
  (PS3.3 C.17.2.1: "SR SOP Instances whose content has been wholly or partially
  included in this document").
- Completion Flag COMPLETE, Verification Flag UNVERIFIED and Preliminary Flag
  PRELIMINARY: nobody has reviewed the AI result yet.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from copy import deepcopy
from datetime import datetime

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from inference.outputs import codes
from inference.outputs.codes import PrivateCode
from inference.outputs.notice import full_statement, short_label
from inference.outputs.patient_study import TYPE2_COPIED
from inference.outputs.supersession import Predecessor
from inference.result import EgfrCall, EgfrPrediction, InferenceResult, Lesion, ModelIdentity
from inference.uids import new_uid

EGFR_TRACKING_IDENTIFIER = "EGFR (patient level)"


def build_sr(
    result: InferenceResult,
    *,
    series_number: int = 902,
    manufacturer: str = "dicom-node",
    timestamp: datetime | None = None,
    related: Sequence[Dataset] = (),
    series_instance_uid: str | None = None,
    supersedes: Predecessor | None = None,
) -> hd.sr.Comprehensive3DSR:
    """Build the Measurement Report (TID 1500) of an inference result.

    Parameters
    ----------
    result : inference.result.InferenceResult
        Lesions with their measurements, the EGFR prediction, the model and the
        source headers (the evidence).
    series_number : int
        Series Number (0020,0011) of the new SR series, positive.
    manufacturer : str
        Manufacturer (0008,0070) of the General Equipment module.
    timestamp : datetime.datetime or None
        Content, Series and Instance Creation date and time; now when None.
    related : sequence of pydicom.dataset.Dataset
        Other results of the same study (the RTSTRUCT, the SEG) to list as
        pertinent other evidence.
    series_instance_uid : str or None
        The output series (`inference.outputs.supersession.output_series_uid`); a new UID when None.
    supersedes : inference.outputs.supersession.Predecessor or None
        The SR this one replaces (a re-run): listed in the Predecessor Documents
        Sequence; the Instance Number is its revision.

    Returns
    -------
    highdicom.sr.Comprehensive3DSR
        The SR document (a `pydicom.Dataset` with file meta).

    Raises
    ------
    ValueError
        No source headers, non-positive series number, a negative or non-finite
        measurement, an EGFR probability inconsistent with its call, or a
        related instance of another study.
    """
    if not result.series.datasets:
        raise ValueError("result: the source series has no headers (no evidence)")
    if series_number < 1:
        raise ValueError(f"series_number: must be positive, got {series_number}")
    _validate_measurements(result)
    study_uid = result.series.datasets[0].StudyInstanceUID
    if any(ds.StudyInstanceUID != study_uid for ds in related):
        raise ValueError("related: every related instance must belong to the source study")
    when = timestamp or datetime.now().astimezone()
    algorithm = hd.sr.AlgorithmIdentification(name=result.model.name, version=result.model.version)
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(result.model, manufacturer),
        procedure_reported=codes.MR_BRAIN,
        imaging_measurements=[_egfr_group(result.egfr, algorithm)],
    )
    report[0].ContentSequence.append(_statement_container(result.model))
    sr = hd.sr.Comprehensive3DSR(
        evidence=readable_evidence(result.series.datasets),
        content=report,
        series_instance_uid=series_instance_uid or new_uid(),
        series_number=series_number,
        sop_instance_uid=new_uid(),
        instance_number=supersedes.next_revision if supersedes else 1,
        manufacturer=manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
        previous_versions=[supersedes.reference()] if supersedes else None,
    )
    measurements = _imaging_measurements(sr)
    lesion_items = [item for lesion in result.lesions for item in _lesion_group(lesion, algorithm)]
    measurements.ContentSequence = hd.sr.ContentSequence(
        [*lesion_items, *measurements.ContentSequence], is_root=False, is_sr=True
    )
    _finish_header(sr, result.model, when)
    if related:
        sr.PertinentOtherEvidenceSequence = DicomSequence([_evidence(study_uid, related)])
    return sr


def readable_evidence(datasets: Sequence[Dataset]) -> list[Dataset]:
    """Copies of the source headers highdicom builds the report from.

    Why: highdicom accepts only the standard's defined terms of Specific
    Character Set, one by one, so a valid ISO 2022 value such as
    `['', 'ISO 2022 IR 87']` (or a sender's unknown term) failed every attempt
    of the job, and it reads the patient attributes by name, so a source
    without PatientID failed too. The copies carry the text decoded with the
    source's own character set (pydicom; an unknown term falls back to its
    default with a warning) and declared UTF-8, which the report is written in
    anyway, and the Type 2 patient and study attributes, empty where the source
    left them out (Type 2: present, may be empty)."""
    copies = []
    for ds in datasets:
        copy = deepcopy(ds)
        copy.decode()
        copy.SpecificCharacterSet = "ISO_IR 192"
        for keyword in TYPE2_COPIED:
            if keyword not in copy:
                setattr(copy, keyword, "")
        copies.append(copy)
    return copies


def _imaging_measurements(sr: Dataset) -> Dataset:
    """The TID 1500 "Imaging Measurements" container (126010, DCM) of a built report."""
    for item in sr.ContentSequence:
        concept = item.ConceptNameCodeSequence[0]
        if item.ValueType == "CONTAINER" and concept.CodeValue == codes.IMAGING_MEASUREMENTS.value:
            return item
    raise ValueError("the measurement report has no Imaging Measurements container")


def _evidence(study_uid: str, instances: Sequence[Dataset]) -> Dataset:
    """A Hierarchical SOP Instance Reference Macro item (PS3.3 C.17.2.1) for one study."""
    series_items = {}
    for ds in instances:
        if ds.SeriesInstanceUID not in series_items:
            item = Dataset()
            item.SeriesInstanceUID = ds.SeriesInstanceUID
            item.ReferencedSOPSequence = DicomSequence()
            series_items[ds.SeriesInstanceUID] = item
        reference = Dataset()
        reference.ReferencedSOPClassUID = ds.SOPClassUID
        reference.ReferencedSOPInstanceUID = ds.SOPInstanceUID
        series_items[ds.SeriesInstanceUID].ReferencedSOPSequence.append(reference)
    study = Dataset()
    study.StudyInstanceUID = study_uid
    study.ReferencedSeriesSequence = DicomSequence(list(series_items.values()))
    return study


def _validate_measurements(result: InferenceResult) -> None:
    """Raise `ValueError` naming `result` for values the report cannot carry."""
    for lesion in result.lesions:
        values = (lesion.volume_cm3, lesion.max_diameter_mm)
        if not all(math.isfinite(v) and v >= 0.0 for v in values):
            raise ValueError(
                f"result: lesion {lesion.name} has volume {lesion.volume_cm3} cm3 and "
                f"diameter {lesion.max_diameter_mm} mm; both must be finite and >= 0"
            )
    probability = result.egfr.mutant_probability
    assessable = result.egfr.call != EgfrCall.NOT_ASSESSABLE
    if assessable != (probability is not None):
        raise ValueError(f"result: EGFR call '{result.egfr.call.value}' with probability {probability}")
    if probability is not None and not 0.0 <= probability <= 1.0:
        raise ValueError(f"result: EGFR mutant probability {probability} is outside [0, 1]")


def _observation_context(model: ModelIdentity, manufacturer: str) -> hd.sr.ObservationContext:
    """TID 1002 with the algorithm as Device observer (TID 1004)."""
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=new_uid(f"device:{model.name}:{model.version}"),
        name=model.name,
        manufacturer_name=manufacturer,
        model_name=f"{model.name} {model.version}",
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DEVICE, observer_identifying_attributes=device
        )
    )


def _lesion_group(
    lesion: Lesion, algorithm: hd.sr.AlgorithmIdentification
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group of one lesion: volume (cm3) and maximum diameter (mm)."""
    volume = hd.sr.Measurement(
        name=codes.VOLUME,
        value=lesion.volume_cm3,
        unit=codes.CUBIC_CENTIMETRE,
        algorithm_id=algorithm,
    )
    diameter = hd.sr.Measurement(
        name=codes.DIAMETER,
        value=lesion.max_diameter_mm,
        unit=codes.MILLIMETRE,
        derivation=codes.MAXIMUM,
        algorithm_id=algorithm,
    )
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=new_uid(), identifier=lesion.name),
        finding_type=codes.METASTATIC_NEOPLASM,
        finding_sites=[hd.sr.FindingSite(anatomic_location=codes.BRAIN)],
        algorithm_id=algorithm,
        measurements=[volume, diameter],
    )


def _egfr_group(
    egfr: EgfrPrediction, algorithm: hd.sr.AlgorithmIdentification
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group of the patient-level EGFR call and mutant probability."""
    measurements = []
    if egfr.mutant_probability is not None:
        measurements.append(
            hd.sr.Measurement(
                name=PrivateCode.EGFR_MUTANT_PROBABILITY.code,
                value=egfr.mutant_probability,
                unit=codes.NO_UNITS,
                algorithm_id=algorithm,
            )
        )
    call = hd.sr.QualitativeEvaluation(name=PrivateCode.EGFR_STATUS.code, value=codes.egfr_call_code(egfr.call))
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=new_uid(), identifier=EGFR_TRACKING_IDENTIFIER),
        finding_type=PrivateCode.EGFR_STATUS.code,
        algorithm_id=algorithm,
        measurements=measurements or None,
        qualitative_evaluations=[call],
    )


def _statement_container(model: ModelIdentity) -> hd.sr.ContainerContentItem:
    """TID 1500 "Qualitative Evaluations" container holding the AI-review statement."""
    container = hd.sr.ContainerContentItem(
        name=codes.QUALITATIVE_EVALUATIONS,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    container.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.TextContentItem(
                name=PrivateCode.AI_STATEMENT.code,
                value=full_statement(model),
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        ]
    )
    return container


def _finish_header(sr: Dataset, model: ModelIdentity, when: datetime) -> None:
    """Series Description, dates and times, the private coding scheme, UTF-8."""
    date, time = when.strftime("%Y%m%d"), when.strftime("%H%M%S.%f")
    sr.SpecificCharacterSet = "ISO_IR 192"
    sr.SeriesDescription = short_label(model)
    sr.SeriesDate, sr.SeriesTime = date, time
    sr.ContentDate, sr.ContentTime = date, time
    sr.InstanceCreationDate, sr.InstanceCreationTime = date, time
    sr.CodingSchemeIdentificationSequence = DicomSequence([codes.coding_scheme_identification()])
