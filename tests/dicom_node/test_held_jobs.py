"""A running node holds implausible results: nothing reaches the TPS until a person releases the job.

Real associations on loopback: the node (one worker, a deliberately weak model
that reports hundreds of lesions) and a receiving Store SCP standing in for the
TPS; `dicom-node jobs show/release/cancel` run as real processes on the same
job store. Also the attempt cap through real service restarts.
"""

from __future__ import annotations

import getpass
import json
import os
import subprocess
import sys

import pydicom
import pytest

from dicom_node.peers import ReceivingNode, free_port, send_series
from storage.exports import due_exports
from storage.jobs import claim_next_job, list_jobs, load_job
from storage.models import JobState
from tests.dicom_node.conftest import EXAMPLE_CONFIG, wait_for


def cli(node_env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """`dicom-node ARGS` as a separate process on the test node's configuration."""
    env = {**os.environ, **node_env, "DICOM_NODE_CONFIG": str(EXAMPLE_CONFIG)}
    return subprocess.run(
        [sys.executable, "-m", "dicom_node.cli", *args], capture_output=True, text=True, env=env, timeout=300
    )


def jobs_in(node, state: JobState) -> list:
    return [j for j in list_jobs(node.db) if j.state == state]


@pytest.fixture
def tps(tmp_path):
    receiver = ReceivingNode(tmp_path / "tps", free_port())
    yield receiver
    receiver.stop()


@pytest.mark.slow
def test_held_result_reaches_no_tps_until_released_and_cancel_ends_another(
    start_node, node_env, tps, phantom_series, small_axial_series, firing_model, monkeypatch
):
    monkeypatch.setenv("DICOM_NODE_MODEL", str(firing_model))
    overrides = {
        "DICOM_NODE__WORKER__COUNT": "1",
        "DICOM_NODE__DESTINATIONS__0__PORT": str(tps.port),
        "DICOM_NODE__EXPORT__RETRY_INITIAL_S": "0.5",
        "DICOM_NODE__SERIES__QUIET_PERIOD_S": "3",  # each series whole, even on a busy machine
    }
    node = start_node(**overrides)
    node_env = {**node_env, **overrides, "DICOM_NODE_MODEL": str(firing_model)}
    other = phantom_series(8, orientation="axial", matrix=96, slices=20, slice_spacing=4.0, n_lesions=2)
    send_series(small_axial_series.files, node.address[1])
    send_series(other.files, node.address[1])

    held = wait_for(lambda: len(jobs_in(node, JobState.HELD)) == 2 and jobs_in(node, JobState.HELD), timeout=300)
    first, second = sorted(held, key=lambda j: j.id)
    job = load_job(node.db, first.id)
    # The firing model's speckle: inside the brain mask it is still far outside every bound (lesion count,
    # total volume, share of the brain, uncertainty); the reason names what was exceeded.
    assert job.reason.startswith("held: ") and "limit" in job.reason, job.reason
    assert job.summary["plausibility"]["held"] is True
    count = len(job.summary["lesions"])
    assert job.exports == [] and load_job(node.db, second.id).exports == []
    # An exporter round now (not a wait for the scheduled ones): nothing of the held jobs is due.
    assert node.exporter.run_once() == 0 and due_exports(node.db) == []
    assert tps.received() == []

    shown = cli(node_env, "jobs", "show", str(first.id))
    assert shown.returncode == 0, shown.stderr
    assert f"{count} lesion(s)" in shown.stdout and "GTV_1 " in shown.stdout and "Nothing was sent" in shown.stdout
    overlay = node.store.root / job.output_dir / "overlay.png"
    assert overlay.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    as_json = json.loads(cli(node_env, "jobs", "show", str(first.id), "--json").stdout)
    assert as_json["state"] == "held" and as_json["overlay"] == str(overlay)

    released = cli(node_env, "jobs", "release", str(first.id), "--user", "dr.physicist", "--note", "reviewed")
    assert released.returncode == 0, released.stderr
    wait_for(lambda: load_job(node.db, first.id).state == JobState.DONE, timeout=60)
    received = sorted(pydicom.dcmread(p, stop_before_pixels=True).Modality for p in tps.received())
    assert received == ["RTSTRUCT", "SR"]
    messages = [e.message for e in load_job(node.db, first.id).events]
    assert any(m.startswith("released by dr.physicist: reviewed; exporting 2 object(s) to tps") for m in messages)

    cancelled = cli(node_env, "jobs", "cancel", str(second.id))
    assert cancelled.returncode == 0, cancelled.stderr
    job = load_job(node.db, second.id)
    assert job.state == JobState.CANCELLED and job.reason == f"cancelled by {getpass.getuser()}"
    again = cli(node_env, "jobs", "release", str(second.id))
    assert again.returncode == 2 and "only a held job can be released" in again.stderr
    assert "Traceback" not in again.stderr
    assert job.exports == [] and node.exporter.run_once() == 0 and due_exports(node.db) == []
    assert len(tps.received()) == 2  # the cancelled job sent nothing


DEAD_WORKER = "gone-host:4242:deadbeef:worker-0"


@pytest.mark.slow
def test_a_job_whose_worker_keeps_dying_gives_up_after_max_attempts(start_node, mr_series):
    """Each service start finds the job `running` with an expired lease (its worker died mid-job) and counts it."""
    node = start_node(DICOM_NODE__WORKER__MAX_ATTEMPTS="2")
    send_series(mr_series, node.address[1])
    (job,) = wait_for(lambda: jobs_in(node, JobState.QUEUED))
    for _ in range(2):
        assert claim_next_job(node.db, DEAD_WORKER, 0.01) == job.id  # a worker starts the job ...
        node.stop()  # ... and dies with it: its lease is never renewed
        node = start_node(DICOM_NODE__WORKER__MAX_ATTEMPTS="2")
    job = load_job(node.db, job.id)
    assert job.state == JobState.FAILED and job.attempts == 2
    assert job.reason.startswith(f"gave up after 2 attempts: interrupted run: the lease of {DEAD_WORKER} expired")
    assert claim_next_job(node.db, DEAD_WORKER) is None
