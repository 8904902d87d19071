"""Re-runs supersede: the same output series, new instances, and the replaced result named (issue 14).

Real files written by the node's writers, read back with pydicom and checked with dciodvfy.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pydicom
import pytest

from inference.outputs.dicom_outputs import output_series_uids, write_dicom_outputs
from inference.outputs.notice import structure_set_label
from inference.outputs.supersession import OUTPUT_KINDS, Predecessor, output_series_uid, unwithdrawn_rtstruct
from inference.result import ModelIdentity
from storage.instance_store import validate_uid
from tests.helpers.dciodvfy import ACCEPTED_WARNING

MODEL = ModelIdentity("mtsa-net", "1.2.0", False)


@pytest.fixture
def series(geometry_series):
    return geometry_series(
        shape=(4, 30, 30), row_spacing=1.0, col_spacing=1.0, slice_spacing=2.0, along_row=(1, 0, 0), along_col=(0, 1, 0)
    )


def lesion_labels() -> np.ndarray:
    labels = np.zeros((4, 30, 30), np.uint16)
    labels[1:3, 5:15, 5:15] = 1
    return labels


NODE = "3f0c9b1e5d2a4c7f8e6b1a2d3c4e5f60"  # a store id (`storage.store_identity`)


def test_the_output_series_uid_is_stable_per_installation_source_series_model_and_kind() -> None:
    uid = output_series_uid("1.2.3.4", MODEL, "SR", NODE)
    assert uid == output_series_uid("1.2.3.4", ModelIdentity("mtsa-net", "1.2.0", False), "SR", NODE)
    assert validate_uid(uid, "output series") == uid
    others = {
        output_series_uid("1.2.3.5", MODEL, "SR", NODE),
        output_series_uid("1.2.3.4", ModelIdentity("mtsa-net", "1.3.0", False), "SR", NODE),
        output_series_uid("1.2.3.4", ModelIdentity("other-net", "1.2.0", False), "SR", NODE),
        output_series_uid("1.2.3.4", MODEL, "SR", "another-node-store-id"),  # validation beside production
        *(output_series_uid("1.2.3.4", MODEL, kind, NODE) for kind in OUTPUT_KINDS),
    }
    assert len(others) == 4 + len(OUTPUT_KINDS) and uid in others
    with pytest.raises(ValueError, match="kind"):
        output_series_uid("1.2.3.4", MODEL, "PDF", NODE)
    with pytest.raises(ValueError, match="installation"):
        output_series_uid("1.2.3.4", MODEL, "SR", "")


def test_two_installations_write_the_same_series_into_different_output_series(
    series, tmp_path: Path, result_on
) -> None:
    result = result_on(series, lesion_labels(), model=MODEL)
    production = write_dicom_outputs(result, tmp_path / "production", installation=NODE)
    validation = write_dicom_outputs(result, tmp_path / "validation", installation="another-node-store-id")
    offline = [write_dicom_outputs(result, tmp_path / f"offline-{n}") for n in range(2)]  # `infer --dicom`
    by_writer = [{o.kind: o.series_instance_uid for o in written} for written in (production, validation, *offline)]
    for kind in ("RTSTRUCT", "SR"):
        assert len({series_uids[kind] for series_uids in by_writer}) == 4, kind
    assert by_writer[0] == {k: v for k, v in output_series_uids(result, NODE).items() if k != "SEG"}


def test_the_label_keeps_16_characters_with_the_revision() -> None:
    demo = ModelIdentity("mtsa-demo", "0.4.0", True)
    assert structure_set_label(MODEL) == "AI GTV PROPOSAL" and structure_set_label(MODEL, 2) == "AI GTV r2"
    assert structure_set_label(demo, 9999) == "DEMO-NONCL r9999"
    assert all(len(structure_set_label(m, r)) <= 16 for m in (MODEL, demo) for r in (1, 2, 99, 9999))
    with pytest.raises(ValueError, match="revision"):
        structure_set_label(MODEL, 0)


def test_a_rerun_goes_to_the_same_series_with_new_instances_and_names_what_it_replaces(
    series, tmp_path: Path, result_on, dciodvfy
) -> None:
    result = result_on(series, lesion_labels(), model=MODEL)
    first = write_dicom_outputs(result, tmp_path / "attempt-1", include_seg=True, installation=NODE)
    expected = output_series_uids(result, NODE)
    assert {o.kind: o.series_instance_uid for o in first} == expected
    written_at = datetime(2026, 11, 30, 14, 5, 6, tzinfo=UTC)
    predecessors = {
        o.kind: Predecessor(
            study_uid=str(series.datasets[0].StudyInstanceUID),
            series_uid=o.series_instance_uid,
            sop_class_uid=o.sop_class_uid,
            sop_instance_uid=o.sop_instance_uid,
            written_at=written_at,
            job_id=7,
            attempt=1,
            revision=1,
        )
        for o in first
    }
    second = write_dicom_outputs(
        result, tmp_path / "attempt-2", include_seg=True, predecessors=predecessors, installation=NODE
    )

    old = {o.kind: pydicom.dcmread(o.path) for o in first}
    new = {o.kind: pydicom.dcmread(o.path) for o in second}
    for kind in ("RTSTRUCT", "SEG", "SR"):
        assert new[kind].SeriesInstanceUID == old[kind].SeriesInstanceUID == expected[kind]
        assert new[kind].SeriesNumber == old[kind].SeriesNumber
        assert new[kind].SOPInstanceUID != old[kind].SOPInstanceUID
        assert (old[kind].InstanceNumber, new[kind].InstanceNumber) == (1, 2)
    assert "PredecessorDocumentsSequence" not in old["SR"]
    (study,) = new["SR"].PredecessorDocumentsSequence
    (series_item,) = study.ReferencedSeriesSequence
    (reference,) = series_item.ReferencedSOPSequence
    assert study.StudyInstanceUID == old["SR"].StudyInstanceUID
    assert series_item.SeriesInstanceUID == old["SR"].SeriesInstanceUID
    assert (reference.ReferencedSOPClassUID, reference.ReferencedSOPInstanceUID) == (
        old["SR"].SOPClassUID,
        old["SR"].SOPInstanceUID,
    )
    rtstruct = new["RTSTRUCT"]
    assert old["RTSTRUCT"].StructureSetLabel == "AI GTV PROPOSAL" and rtstruct.StructureSetLabel == "AI GTV r2"
    assert (
        f"Supersedes {old['RTSTRUCT'].SOPInstanceUID} of 2026-11-30 14:05:06 UTC (job 7, attempt 1)."
        in rtstruct.StructureSetDescription
    )
    (replaced,) = rtstruct.PredecessorStructureSetSequence
    assert replaced.ReferencedSOPInstanceUID == old["RTSTRUCT"].SOPInstanceUID
    for output in (*first, *second):
        errors, warnings = dciodvfy(output.path)
        assert errors == [], (output.kind, errors)
        assert all(ACCEPTED_WARNING in warning for warning in warnings), (output.kind, warnings)


def test_a_result_without_lesions_is_held_only_when_it_supersedes_one_that_sent_an_rtstruct() -> None:
    def before(kind: str, job_id: int, revision: int) -> Predecessor:
        when = datetime(2026, 11, 30, tzinfo=UTC)
        return Predecessor("1.2", f"2.25.{kind == 'SR'}", "1.2.3", f"2.25.9{job_id}", when, job_id, 1, revision)

    with_rtstruct = {"RTSTRUCT": before("RTSTRUCT", 4, 2), "SR": before("SR", 4, 2)}
    reason = unwithdrawn_rtstruct(0, with_rtstruct, 3)
    assert reason is not None and reason.startswith("re-run found no lesion where revision r2 had 3 ROI(s);")
    assert "(2.25.94) at the TPS is not withdrawn automatically" in reason
    assert "had an RTSTRUCT;" in (unwithdrawn_rtstruct(0, with_rtstruct, None) or "")  # its file purged
    assert unwithdrawn_rtstruct(2, with_rtstruct, 3) is None  # lesions: the new RTSTRUCT supersedes it
    assert unwithdrawn_rtstruct(0, {"SR": before("SR", 4, 1)}, None) is None  # never an RTSTRUCT
    after_held_empty = {"RTSTRUCT": before("RTSTRUCT", 4, 2), "SR": before("SR", 5, 3)}
    assert unwithdrawn_rtstruct(0, after_held_empty, 3) is None  # decided when that empty result was held
