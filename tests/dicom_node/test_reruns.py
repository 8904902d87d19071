"""Re-runs at the TPS: a retry or a later job of the same series supersedes, it never duplicates (issue 14).

A real node (its exporter running) on a real job store, the worker's `run_job` with a tiny
real model, DCMTK storescp (or a pynetdicom SCP) as the TPS, `dicom-node jobs retry/export`
as separate processes, and dciodvfy on every object the TPS received.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from dicom_node.export_targets import ExportTargets
from dicom_node.peers import ReceivingNode, free_port
from dicom_node.worker import ModelRegistry, run_job
from inference.model.package import MANIFEST_NAME
from inference.plausibility import PlausibilityBounds
from storage.jobs import (
    RoutingOutcome,
    cancel_job,
    claim_next_job,
    complete_series,
    hold_outputs,
    load_job,
    record_outputs,
    retry_job,
)
from storage.models import JobState
from storage.outputs import WrittenObject, newer_revisions_of
from tests.dicom_node.conftest import EXAMPLE_CONFIG, jobs_by_state, storescu, wait_for
from tests.helpers.dciodvfy import ACCEPTED_WARNING, dciodvfy_messages
from tests.helpers.models import make_tiny_package

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"


@pytest.fixture(scope="module")
def delivering_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny untrained package that finds a few "lesions" on `mr_series` (3 when written) and
    delivers them: its plausibility bounds are off (the gate is tested elsewhere)."""
    folder = make_tiny_package(
        tmp_path_factory.mktemp("rerun-model"),
        name="rerun-test",
        gtv_gain=50.0,
        thresholds={"gtv_probability": 0.5, "min_lesion_volume_mm3": 0.0},
    )
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    bounds = PlausibilityBounds().to_manifest()
    manifest["plausibility"] = {key: None if key.startswith("max_") else value for key, value in bounds.items()}
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return folder


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dicom_node.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env, "DICOM_NODE_CONFIG": str(EXAMPLE_CONFIG)},
        timeout=120,
    )


def received(tps: ReceivingNode) -> dict[str, pydicom.Dataset]:
    """What the TPS holds, by SOP Instance UID; then its folder is emptied for the next step."""
    found = {}
    for path in tps.received():
        ds = pydicom.dcmread(path)
        found[str(ds.SOPInstanceUID)] = ds
        errors, warnings = dciodvfy_messages(path)
        assert errors == [], (ds.Modality, errors)
        assert all(ACCEPTED_WARNING in w for w in warnings), (ds.Modality, warnings)
    for path in tps.received():
        path.unlink()
    return found


@pytest.mark.slow
def test_retry_and_a_later_job_supersede_and_export_sends_only_the_latest_attempt(
    start_node, node_env, mr_series, delivering_model, tmp_path, monkeypatch
) -> None:
    monkeypatch.setenv("DICOM_NODE_MODEL", str(delivering_model))
    tps = ReceivingNode(tmp_path / "tps", free_port())
    overrides = {"DICOM_NODE__DESTINATIONS__0__PORT": str(tps.port), "DICOM_NODE__EXPORT__RETRY_INITIAL_S": "0.5"}
    env = {**node_env, **overrides, "DICOM_NODE_MODEL": str(delivering_model)}
    try:
        node = start_node(**overrides)  # no workers: this test runs the worker's run_job itself
        registry = ModelRegistry()

        def run(job_id: int) -> dict[str, pydicom.Dataset]:
            assert claim_next_job(node.db, "test:1:aa:worker-0") == job_id
            run_job(job_id, node.db, node.store, registry, "cpu", "test:1:aa:worker-0", ExportTargets([]), 3)
            job = wait_for(lambda: (j := load_job(node.db, job_id)).state == JobState.DONE and j, timeout=60)
            got = received(tps)
            assert {str(ds.Modality) for ds in got.values()} == {"RTSTRUCT", "SR"}, job.reason
            return {str(ds.Modality): ds for ds in got.values()}

        assert storescu(node.address[1], mr_series).returncode == 0
        [job] = wait_for(lambda: jobs_by_state(node).get("queued"))
        first = run(job.id)
        assert first["RTSTRUCT"].StructureSetLabel == "DEMO-NONCLINICAL" and first["SR"].InstanceNumber == 1
        assert "PredecessorDocumentsSequence" not in first["SR"]

        assert cli(env, "jobs", "retry", str(job.id)).returncode == 0
        second = run(job.id)
        for kind in ("RTSTRUCT", "SR"):
            assert second[kind].SeriesInstanceUID == first[kind].SeriesInstanceUID
            assert second[kind].SeriesNumber == first[kind].SeriesNumber
            assert second[kind].SOPInstanceUID != first[kind].SOPInstanceUID
            assert second[kind].InstanceNumber == 2
        (study,) = second["SR"].PredecessorDocumentsSequence
        (series_item,) = study.ReferencedSeriesSequence
        (reference,) = series_item.ReferencedSOPSequence
        assert (study.StudyInstanceUID, series_item.SeriesInstanceUID, reference.ReferencedSOPInstanceUID) == (
            first["SR"].StudyInstanceUID,
            first["SR"].SeriesInstanceUID,
            first["SR"].SOPInstanceUID,
        )
        assert reference.ReferencedSOPClassUID == first["SR"].SOPClassUID
        rtstruct = second["RTSTRUCT"]
        assert rtstruct.StructureSetLabel == "DEMO-NONCL r2"  # a demo package: the label still says so
        assert f"Supersedes {first['RTSTRUCT'].SOPInstanceUID} of " in rtstruct.StructureSetDescription
        assert f"(job {job.id}, attempt 1)." in rtstruct.StructureSetDescription
        assert rtstruct.PredecessorStructureSetSequence[0].ReferencedSOPInstanceUID == first["RTSTRUCT"].SOPInstanceUID

        # `jobs export` after the retry: only the latest attempt's two objects reach the TPS again.
        exported = cli(env, "jobs", "export", str(job.id))
        assert exported.returncode == 0 and "pending (attempt 2, the latest)" in exported.stdout, exported.stderr
        wait_for(lambda: load_job(node.db, job.id).state == JobState.DONE and len(tps.received()) == 2, timeout=60)
        assert set(received(tps)) == {second["RTSTRUCT"].SOPInstanceUID, second["SR"].SOPInstanceUID}
        # `--attempt 1`: the first attempt's two, on purpose.
        exported = cli(env, "jobs", "export", str(job.id), "--attempt", "1")
        assert exported.returncode == 0 and "pending (attempt 1)" in exported.stdout, exported.stderr
        wait_for(lambda: load_job(node.db, job.id).state == JobState.DONE and len(tps.received()) == 2, timeout=60)
        assert set(received(tps)) == {first["RTSTRUCT"].SOPInstanceUID, first["SR"].SOPInstanceUID}
        shown = json.loads(cli(env, "jobs", "show", str(job.id), "--json").stdout)
        assert sorted((e["attempt"], e["object"], e["state"]) for e in shown["exports"]) == [
            (1, "RTSTRUCT", "done"),
            (1, "SR", "done"),
            (2, "RTSTRUCT", "done"),
            (2, "SR", "done"),
        ]
        refused = cli(env, "jobs", "export", str(job.id), "--attempt", "3")
        assert refused.returncode == 2 and "has no attempt 3" in refused.stderr and "Traceback" not in refused.stderr

        # A later job of the same series (a late delivery, a re-send): the same series again, revision 3.
        later = complete_series(node.db, job.series_id, RoutingOutcome("brain-mr", "default", ["tps"], "test"))
        third = run(later)
        for kind in ("RTSTRUCT", "SR"):
            assert third[kind].SeriesInstanceUID == first[kind].SeriesInstanceUID
            assert third[kind].InstanceNumber == 3
        assert third["SR"].PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[
            0
        ].ReferencedSOPInstanceUID == (second["SR"].SOPInstanceUID)
        assert third["RTSTRUCT"].StructureSetLabel == "DEMO-NONCL r3"
        assert f"(job {job.id}, attempt 2)." in third["RTSTRUCT"].StructureSetDescription
    finally:
        tps.stop()
        shutil.rmtree(tmp_path / "tps", ignore_errors=True)


def package_without_bounds(folder: Path, **tiny: object) -> Path:
    """A tiny package named like `delivering_model` (its re-runs share its output series), plausibility off."""
    make_tiny_package(folder, name="rerun-test", **tiny)  # type: ignore[arg-type]
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    bounds = PlausibilityBounds().to_manifest()
    manifest["plausibility"] = {key: None if key.startswith("max_") else value for key, value in bounds.items()}
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return folder


@pytest.mark.slow
def test_a_rerun_without_lesions_is_held_while_the_earlier_rtstruct_stands(
    start_node, mr_series, delivering_model, tmp_path
) -> None:
    """No RTSTRUCT can say "no lesion": the result is held for a physicist, who withdraws the old one at the TPS."""
    empty = package_without_bounds(tmp_path / "empty", gtv_bias=-50.0)  # finds nothing
    node = start_node()  # no workers: this test runs the worker's run_job itself
    registry = ModelRegistry()
    assert storescu(node.address[1], mr_series).returncode == 0
    [job] = wait_for(lambda: jobs_by_state(node).get("queued"))

    def run(job_id: int) -> JobState:
        assert claim_next_job(node.db, "test:1:aa:worker-0") == job_id
        run_job(job_id, node.db, node.store, registry, "cpu", "test:1:aa:worker-0", ExportTargets([]), 3)
        return load_job(node.db, job_id).state

    def later(model: Path) -> int:
        return complete_series(node.db, job.series_id, RoutingOutcome("brain-mr", str(model), [], "test"))

    cancel_job(node.db, job.id, "test")  # the node's own routing sends to a TPS: these jobs send nowhere
    first = later(delivering_model)
    assert run(first) == JobState.DONE  # r1: an RTSTRUCT with lesions
    rois = len(pydicom.dcmread(next(node.store.root.glob(f"outputs/job-{first}/*/RTSTRUCT_*.dcm"))).ROIContourSequence)

    second = later(empty)
    assert run(second) == JobState.HELD
    held = load_job(node.db, second)
    assert held.reason is not None and held.reason.startswith(
        f"held: re-run found no lesion where revision r1 had {rois} ROI(s); the earlier RTSTRUCT ("
    )
    assert "is not withdrawn automatically" in held.reason
    assert [o[1] for o in held.summary["outputs"]] == ["1.2.840.10008.5.1.4.1.1.88.34"]  # the SR only

    # Held once: the next re-run that finds nothing supersedes a result without an RTSTRUCT, so it is not held.
    assert run(later(empty)) == JobState.DONE
    # A lesion found again, then none: held again, naming the new revision.
    assert run(later(delivering_model)) == JobState.DONE
    fourth_empty = later(empty)
    assert run(fourth_empty) == JobState.HELD
    assert "where revision r2 had" in (load_job(node.db, fourth_empty).reason or "")


@pytest.mark.slow
def test_sending_a_superseded_result_warns_and_records_it(start_node, node_env, mr_series) -> None:
    """`jobs release` of a held job overtaken by a later job, and `jobs export --attempt` of an older attempt,
    send a lower revision after a higher one: allowed, but said on stderr and in the job's events."""
    node = start_node()
    assert storescu(node.address[1], mr_series).returncode == 0
    [held_job] = wait_for(lambda: jobs_by_state(node).get("queued"))

    def attempt_writes(job_id: int) -> tuple[list[WrittenObject], dict]:
        assert claim_next_job(node.db, "test:1:aa:worker-0") == job_id
        attempt = load_job(node.db, job_id).attempts
        objects = [WrittenObject("SR", "2.25.4242", f"2.25.42{job_id}{attempt}", SR_CLASS, f"o/{job_id}/{attempt}")]
        return objects, {"outputs": [(o.sop_instance_uid, o.sop_class_uid, o.path) for o in objects]}

    objects, summary = attempt_writes(held_job.id)
    hold_outputs(node.db, held_job.id, "o", summary, ["too many lesions"], objects=objects)  # r1, held
    later = complete_series(node.db, held_job.series_id, RoutingOutcome("brain-mr", "default", [], "test"))
    objects, summary = attempt_writes(later)
    record_outputs(node.db, later, "o", summary, [], objects=objects)  # r2, done (sends nowhere)

    released = cli(node_env, "jobs", "release", str(held_job.id), "--user", "physicist")
    assert released.returncode == 0, released.stderr
    warning = f"job {held_job.id} attempt 1 is not the newest result of its output series: SR r1 < r2 (job {later},"
    assert warning in " ".join(released.stderr.split()) and "lower revision after a higher one" in released.stderr
    assert any(e.message.startswith(f"warning: {warning}") for e in load_job(node.db, held_job.id).events)

    retry_job(node.db, later)
    objects, summary = attempt_writes(later)
    record_outputs(node.db, later, "o", summary, [], objects=objects)  # r3 by attempt 2
    assert newer_revisions_of(node.db, later, 2) is None  # the newest: sending it warns about nothing
    older = cli(node_env, "jobs", "export", str(later), "--attempt", "1", "--to", "tps")
    assert older.returncode == 0, older.stderr
    assert (
        f"job {later} attempt 1 is not the newest result of its output series: SR r2 < r3 (job {later}, attempt 2)"
        in (" ".join(older.stderr.split()))
    )
    assert sum(e.message.startswith("warning: ") for e in load_job(node.db, later).events) == 1
