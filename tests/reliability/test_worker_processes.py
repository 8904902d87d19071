"""Several processes on one host sharing one job store, on SQLite and on a real PostgreSQL server
(issues #16 and #19).

`dicom-node serve` (SCP, watcher, exporter) and `dicom-node worker` processes as an
operator starts them, sharing a data dir; a DCMTK storescp (or pynetdicom) stands in
for the TPS (tests/helpers/node_processes.py). A job is taken from its holder only once
the holder is dead (its lease expired), never because another process on the same host
started:

- a second worker started while the first runs a job: the job runs once;
- `serve` restarted while a worker runs a job: the job is not stolen;
- one of two workers SIGKILLed mid-job: the other completes it after the lease expires,
  and exactly one RTSTRUCT and one SR reach the TPS;
- 20 series sent at once to `serve` and two workers (two `worker` processes on
  PostgreSQL, two local workers in `serve` on SQLite): each job runs exactly once and
  both workers take some.

To hold a job in `running` for as long as a check needs, its worker is paused with
SIGSTOP (never inside a transaction: see `Cluster.freeze`) and resumed with SIGCONT.
Every wait is on the job store or a log line, never a fixed sleep.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest

from dicom_node.peers import send_series
from storage.models import EventKind, Job, JobState
from tests.helpers.node_processes import Cluster, holder_pid, make_contouring_model
from tests.reliability.conftest import wait_for

pytestmark = pytest.mark.slow

ONE_SET = Counter({"RTSTRUCT": 1, "SR": 1})  # one job's outputs: this model contours one lesion per series


@pytest.fixture(scope="module")
def contouring_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_contouring_model(tmp_path_factory.mktemp("contouring-model"))


@pytest.fixture
def cluster(tmp_path: Path, contouring_model: Path, job_store_url: str) -> Iterator[Callable[[float], Cluster]]:
    """`make(lease_s) -> Cluster` on `job_store_url` (each test runs on SQLite and on PostgreSQL);
    every process it started is stopped at teardown."""
    made: list[Cluster] = []

    def make(lease_s: float) -> Cluster:
        made.append(Cluster(tmp_path, contouring_model, lease_s, job_store_url))
        return made[-1]

    yield make
    for one in made:
        one.close()


def state_messages(job: Job) -> list[str]:
    return [e.message for e in job.events if e.kind == EventKind.STATE]


def test_a_second_worker_started_during_a_job_does_not_run_it_again(cluster, phantom_factory):
    nodes = cluster(lease_s=60)
    nodes.serve()
    first = nodes.worker("worker-1")
    send_series(phantom_factory(7101, "LEASE01", slices=12, matrix=64), nodes.port)
    job = wait_for(nodes.running_job, timeout=60, interval=0.05)
    assert holder_pid(job) == first.pid and job.claimed_by in first.logged("workers.started")["workers"]

    nodes.freeze(first)  # the job stays `running` while the second worker starts
    second = nodes.worker("worker-2")
    assert second.logged("workers.started")["jobs_resumed"] == []
    still = nodes.running_job()
    assert still is not None and still.claimed_by == job.claimed_by and still.attempts == 1
    shown = " ".join(nodes.jobs_show(job.id).split())
    assert f"running on host {socket.gethostname()}: {job.claimed_by} (lease until" in shown
    os.kill(first.pid, signal.SIGCONT)

    done = nodes.wait_done()
    assert done.attempts == 1 and done.claimed_by == job.claimed_by
    assert not any("re-queued" in m for m in state_messages(done))
    shown = json.loads(nodes.jobs_show(job.id, "--json"))
    assert (shown["claimed_by"], shown["host"], shown["lease_expires_at"]) == (
        job.claimed_by,
        socket.gethostname(),
        None,
    )
    assert len(nodes.wait_exports_settled()) == 2  # one RTSTRUCT and one SR row: the job's outputs, once
    assert nodes.received() == ONE_SET


def test_restarting_serve_does_not_steal_a_job_a_worker_process_is_running(cluster, phantom_factory):
    nodes = cluster(lease_s=60)
    serve = nodes.serve()
    worker = nodes.worker("worker")
    send_series(phantom_factory(7102, "LEASE02", slices=12, matrix=64), nodes.port)
    job = wait_for(nodes.running_job, timeout=60, interval=0.05)
    assert holder_pid(job) == worker.pid

    nodes.freeze(worker)
    assert serve.stop() == 0
    restarted = nodes.serve(local_workers=1)  # its own worker would run a re-queued job at once
    assert restarted.logged("service.starting")["jobs_resumed"] == []
    still = nodes.running_job()
    assert still is not None and still.claimed_by == job.claimed_by and still.attempts == 1
    os.kill(worker.pid, signal.SIGCONT)

    done = nodes.wait_done()
    assert done.attempts == 1 and done.claimed_by == job.claimed_by
    assert len(nodes.wait_exports_settled()) == 2  # one RTSTRUCT and one SR row: the job's outputs, once
    assert nodes.received() == ONE_SET


def test_after_sigkill_the_other_worker_completes_the_job_once_the_lease_expires(cluster, phantom_factory):
    lease_s = 3.0
    nodes = cluster(lease_s=lease_s)
    nodes.serve()
    workers = {w.pid: w for w in nodes.workers("worker-1", "worker-2")}
    send_series(phantom_factory(7103, "LEASE03", slices=12, matrix=64), nodes.port)
    job = wait_for(nodes.running_job, timeout=60, interval=0.05)
    victim = workers[holder_pid(job)]
    os.kill(victim.pid, signal.SIGSTOP)  # stopped first, so that it is surely killed mid-job
    at_kill = nodes.running_job()
    assert at_kill is not None and at_kill.claimed_by == job.claimed_by, "the job ended before the kill"
    os.kill(victim.pid, signal.SIGKILL)
    victim.popen.wait(10)
    killed_at = time.monotonic()

    done = nodes.wait_done()
    survivor = next(pid for pid in workers if pid != victim.pid)
    assert holder_pid(done) == survivor
    assert done.attempts == 2
    assert any(f"the lease of {job.claimed_by} expired" in m for m in state_messages(done))
    requeued_at = next(e.at for e in done.events if e.kind == EventKind.STATE and "re-queued" in e.message)
    assert requeued_at >= at_kill.lease_expires_at, "re-queued while the lease was still valid"
    assert all("/attempt-2/" in e.path for e in done.exports)
    assert len(nodes.wait_exports_settled()) == 2  # one RTSTRUCT and one SR row: the job's outputs, once
    assert nodes.received() == ONE_SET
    print(f"\nLEASE: lease_s={lease_s}: job done {time.monotonic() - killed_at:.1f} s after the SIGKILL")


SERIES = 20


def test_twenty_series_two_workers_each_job_runs_exactly_once(cluster, phantom_factory, job_store_url):
    """Scale-out (#16): on PostgreSQL `serve` (SCP, watcher, exporter, no workers) and two `worker` processes;
    on SQLite `serve` with two local workers. Every job runs once, each series gets one RTSTRUCT and one SR
    at the TPS (matched by the series they reference), and both workers did some of the jobs."""
    nodes = cluster(lease_s=60)
    started = time.monotonic()
    if nodes.postgresql:
        nodes.serve(local_workers=0)
        workers = nodes.workers("worker-1", "worker-2")
    else:
        workers = [nodes.serve(local_workers=2)]
    series = [phantom_factory(7200 + k, f"SCALE{k:02d}", slices=12, matrix=64) for k in range(SERIES)]
    sent_at = time.monotonic()
    for files in series:  # one association (storescu run) per series, as a scanner sends them
        send_series(files, nodes.port)

    all_sent = time.monotonic()
    jobs = nodes.wait_all_done(SERIES, timeout=120)
    done_at = time.monotonic()
    assert len(jobs) == SERIES, [(j.id, j.series_uid, j.instance_count) for j in jobs]  # one job per series
    assert [(j.state, j.attempts) for j in jobs] == [(JobState.DONE, 1)] * SERIES, [
        (j.id, j.state.value, j.attempts, j.reason) for j in jobs
    ]
    assert not any("re-queued" in m for j in jobs for m in state_messages(j))
    by_worker = Counter(j.claimed_by for j in jobs)
    if nodes.postgresql:
        assert {holder_pid(j) for j in jobs} == {w.pid for w in workers}, by_worker
    else:
        assert len(by_worker) == 2 and {holder_pid(j) for j in jobs} == {workers[0].pid}, by_worker

    expected = {j.series_uid for j in jobs}
    assert len(nodes.wait_exports_settled(timeout=60)) == 2 * SERIES
    assert nodes.received_by_series(expected) == {uid: ONE_SET for uid in expected}
    delivered = {e.sop_instance_uid for j in jobs for e in j.exports}
    received = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in nodes.tps.received()]
    assert len(delivered) == 2 * SERIES and sorted(received) == sorted(delivered)  # each export row's object, once
    print(
        f"\nSCALE-OUT {job_store_url.split(':')[0]}: {SERIES} jobs by {dict(Counter(by_worker.values()))} "
        f"(jobs per worker: count), {done_at - sent_at:.1f} s from the first C-STORE to the last job done, "
        f"{sent_at - started:.1f} s start-up, {all_sent - sent_at:.1f} s sending"
    )
