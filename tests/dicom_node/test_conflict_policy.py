"""Re-sent instances over real associations: another transfer syntax is no conflict; corrections follow
`[storage] conflict_policy` and show up in `dicom-node jobs show`."""

from __future__ import annotations

import json
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless
from pynetdicom import AE
from pynetdicom.sop_class import MRImageStorage
from sqlalchemy import select

from dicom_node import status_codes
from dicom_node.settings import ConfigError, load_settings
from storage.ingest import ConflictPolicy
from storage.instance_store import sha256_file
from storage.models import Association, Instance, Job, JobState
from tests.dicom_node.conftest import EXAMPLE_CONFIG, cli, jobs_by_state, storescu, wait_for


def send_as(port: int, path: Path, transfer_syntax: str) -> int:
    """C-STORE `path` re-encoded in `transfer_syntax`, over an association that offers only that syntax."""
    ds = pydicom.dcmread(path)
    if transfer_syntax == RLELossless:
        ds.compress(RLELossless, generate_instance_uid=False)
    else:  # written and read back: the data set is then encoded in that syntax
        ds.file_meta.TransferSyntaxUID = transfer_syntax
        buffer = BytesIO()
        ds.save_as(buffer)
        ds = pydicom.dcmread(BytesIO(buffer.getvalue()))
    ae = AE(ae_title="PACS")
    ae.add_requested_context(MRImageStorage, [transfer_syntax])
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert assoc.is_established
    try:
        assert assoc.accepted_contexts[0].transfer_syntax[0] == transfer_syntax
        return int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()


def corrected_copies(files: list[Path], folder: Path, **changes: str) -> list[Path]:
    folder.mkdir()
    copies = []
    for path in files:
        ds = pydicom.dcmread(path)
        for keyword, value in changes.items():
            setattr(ds, keyword, value)
        ds.save_as(folder / path.name)
        copies.append(folder / path.name)
    return copies


def duplicates_per_association(node) -> list[int]:
    with node.db.session() as session:
        return [a.instances_duplicate for a in session.scalars(select(Association).order_by(Association.id))]


def instance_shas(node) -> dict[str, str]:
    with node.db.session() as session:
        return {row.sop_instance_uid: row.sha256 for row in session.scalars(select(Instance))}


@pytest.mark.slow
def test_resends_in_other_transfer_syntaxes_are_duplicates_and_a_correction_is_a_job_event(
    start_node, node_env, mr_series, tmp_path
):
    node = start_node()
    port = node.address[1]
    assert storescu(port, mr_series).returncode == 0
    (job,) = wait_for(lambda: jobs_by_state(node).get("queued"))
    before = instance_shas(node)
    assert pydicom.dcmread(mr_series[0]).file_meta.TransferSyntaxUID == ExplicitVRLittleEndian

    for syntax in (ImplicitVRLittleEndian, RLELossless):
        assert send_as(port, mr_series[0], syntax) == status_codes.SUCCESS
    assert instance_shas(node) == before
    assert not (node.store.root / "conflicts").exists()
    wait_for(lambda: duplicates_per_association(node)[-2:] == [1, 1])  # rows are settled as associations end

    (corrected,) = corrected_copies(mr_series[:1], tmp_path / "corrected", PatientName="Corrected^Name")
    assert send_as(port, corrected, ExplicitVRLittleEndian) == status_codes.SUCCESS
    assert instance_shas(node) == before  # keep-first (the default)
    sop_uid = str(pydicom.dcmread(corrected).SOPInstanceUID)
    (kept,) = node.store.conflicts(sop_uid).iterdir()  # the node writes its own file meta: its own sha256
    assert kept.name == f"{sha256_file(kept)}.dcm" and pydicom.dcmread(kept).PatientName == "Corrected^Name"
    assert len(jobs_by_state(node)["queued"]) == 1  # no new delivery

    shown = json.loads(cli(node_env, "jobs", "show", str(job.id), "--json").stdout)
    (event,) = [e for e in shown["events"] if e["kind"] == "conflict"]
    assert sop_uid in event["message"] and "PatientName" in event["message"] and "keep-first" in event["message"]
    human = cli(node_env, "jobs", "show", str(job.id))
    assert human.returncode == 0 and "conflict" in human.stdout and "PatientName" in human.stdout
    assert "Corrected" not in human.stdout


@pytest.mark.slow
def test_replace_policy_processes_a_corrected_series_again(start_node, node_env, mr_series, tmp_path):
    node = start_node(DICOM_NODE__STORAGE__CONFLICT_POLICY="replace")
    port = node.address[1]
    assert storescu(port, mr_series).returncode == 0
    (first,) = wait_for(lambda: jobs_by_state(node).get("queued"))

    corrected = corrected_copies(mr_series, tmp_path / "merged", PatientID="MERGED-7", PatientName="Merged^Name")
    assert storescu(port, corrected).returncode == 0
    (second,) = wait_for(lambda: jobs_by_state(node).get("cancelled") and jobs_by_state(node).get("queued"))

    assert second.id > first.id and second.patient_id == "MERGED-7"
    with node.db.session() as session:  # the corrected versions are the instances now ...
        rows = session.scalars(select(Instance)).all()
        assert len(rows) == len(mr_series)
        for row in rows:
            assert sha256_file(node.store.absolute(row.path)) == row.sha256
            assert pydicom.dcmread(node.store.absolute(row.path)).PatientID == "MERGED-7"
            (previous,) = node.store.conflicts(row.sop_instance_uid).iterdir()  # ... the first ones kept here
            assert pydicom.dcmread(previous).PatientID == pydicom.dcmread(mr_series[0]).PatientID
    with node.db.session() as session:  # still queued: cancelled, not run on a series being replaced
        cancelled = session.get(Job, first.id)
        assert cancelled.state == JobState.CANCELLED and f"superseded by job {second.id}" in cancelled.reason
    # One event per correction, not one per instance; the first job points at the new one.
    shown = json.loads(cli(node_env, "jobs", "show", str(second.id), "--json").stdout)
    (conflict,) = [e["message"] for e in shown["events"] if e["kind"] == "conflict"]
    assert conflict.startswith(f"{len(mr_series)} instances (latest ")
    assert "PatientID, PatientName; replace: the new version is the instance now" in conflict
    earlier = json.loads(cli(node_env, "jobs", "show", str(first.id), "--json").stdout)
    (pointer,) = [e["message"] for e in earlier["events"] if e["kind"] == "conflict"]
    assert pointer.endswith(f"evaluated again as a new delivery: job {second.id}")
    assert not any("MERGED-7" in m or "Merged" in m for m in (conflict, pointer))


def test_the_policy_is_a_documented_setting_keep_first_by_default(tmp_path) -> None:
    assert load_settings(EXAMPLE_CONFIG, env={}).storage.conflict_policy is ConflictPolicy.KEEP_FIRST
    assert 'conflict_policy = "keep-first"' in EXAMPLE_CONFIG.read_text()
    replace = load_settings(EXAMPLE_CONFIG, env={"DICOM_NODE__STORAGE__CONFLICT_POLICY": "replace"})
    assert replace.storage.conflict_policy is ConflictPolicy.REPLACE
    with pytest.raises(ConfigError, match="storage.conflict_policy: Input should be 'keep-first' or 'replace'"):
        load_settings(EXAMPLE_CONFIG, env={"DICOM_NODE__STORAGE__CONFLICT_POLICY": "newest"})
