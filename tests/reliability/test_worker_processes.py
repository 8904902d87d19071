"""Several processes on one host and one SQLite job store (issues #16 and #19).

`dicom-node serve` (SCP, watcher, exporter) and `dicom-node worker` processes as an
operator starts them, sharing a data dir; a DCMTK storescp (or pynetdicom) stands in
for the TPS. A job is taken from its holder only once the holder is dead (its lease
expired), never because another process on the same host started:

- a second worker started while the first runs a job: the job runs once;
- `serve` restarted while a worker runs a job: the job is not stolen;
- one of two workers SIGKILLed mid-job: the other completes it after the lease expires,
  and exactly one RTSTRUCT and one SR reach the TPS.

To hold a job in `running` for as long as a check needs, its worker is paused with
SIGSTOP (never inside a SQLite write transaction: see `freeze`) and resumed with SIGCONT.
Every wait is on the job store or a log line, never a fixed sleep.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from dicom_node.peers import ReceivingNode, free_port, send_series
from inference.model.package import MANIFEST_NAME
from inference.plausibility import PlausibilityBounds
from storage.database import Database
from storage.jobs import load_job
from storage.models import EventKind, Job, JobState
from tests.reliability.conftest import echo_ok, tps_rules, wait_for

pytestmark = pytest.mark.slow

CONFIG = """
[node]
ae_title = "DICOMNODE"
host = "127.0.0.1"
port = {port}
min_free_disk_mb = 1

[storage]
data_dir = "{data_dir}"

[series]
quiet_period_s = 0.5
check_interval_s = 0.2

[worker]
count = 0
device = "cpu"
poll_interval_s = 0.2
lease_s = {lease_s}

[export]
retry_initial_s = 0.5
retry_max_interval_s = 1.0

[logging]
format = "json"
level = "INFO"
"""


class Process:
    """One `dicom-node` command in its own process, its output in a log file."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str]) -> None:
        self.log = log
        executable = Path(sys.executable).parent / "dicom-node"
        with open(log, "ab") as out:
            self.popen = subprocess.Popen(
                [str(executable), *args], stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def logged(self, event: str) -> dict | None:
        """The first JSON log record of `event`, once written."""
        for line in self.log.read_text(errors="replace").splitlines():
            if f'"{event}"' in line:
                try:
                    return json.loads(line)
                except json.JSONDecodeError:
                    continue
        return None

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self) -> int:
        if self.alive():
            os.kill(self.pid, signal.SIGCONT)
            self.popen.send_signal(signal.SIGTERM)
            try:
                return self.popen.wait(60)
            except subprocess.TimeoutExpired:
                self.popen.kill()
        return self.popen.wait(10)


class Cluster:
    """A serve process, any number of worker processes, a TPS, all on one data dir."""

    def __init__(self, tmp_path: Path, model: Path, lease_s: float) -> None:
        self.tmp_path = tmp_path
        self.port, tps_port = free_port(), free_port()
        self.data_dir = tmp_path / "var"
        self.config = tmp_path / "node.toml"
        self.config.write_text(
            CONFIG.format(port=self.port, data_dir=self.data_dir, lease_s=lease_s) + tps_rules(tps_port)
        )
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_NODE")}
        self.env |= {"DICOM_NODE_MODEL": str(model), "OMP_NUM_THREADS": "1"}
        self.tps = ReceivingNode(tmp_path / "tps", tps_port)
        self.processes: list[Process] = []
        self.db = Database(f"sqlite:///{self.data_dir}/dicom-node.db")

    def serve(self, local_workers: int = 0) -> Process:
        env = self.env | {"DICOM_NODE__WORKER__COUNT": str(local_workers)}
        process = Process(["serve", "--config", str(self.config)], self.tmp_path / "serve.log", env)
        self.processes.append(process)
        wait_for(lambda: process.alive() and echo_ok(self.port), timeout=90, interval=0.2)
        return process

    def worker(self, name: str) -> Process:
        log = self.tmp_path / f"{name}.log"
        process = Process(["worker", "--config", str(self.config), "--device", "cpu"], log, self.env)
        self.processes.append(process)
        wait_for(lambda: process.logged("workers.started") or not process.alive(), timeout=90, interval=0.2)
        assert process.alive(), log.read_text()
        return process

    def jobs_show(self, job_id: int, *args: str) -> str:
        """`dicom-node jobs show` as a physicist runs it; its standard output."""
        executable = Path(sys.executable).parent / "dicom-node"
        command = [str(executable), "jobs", "show", str(job_id), "--config", str(self.config), *args]
        shown = subprocess.run(command, capture_output=True, text=True, env=self.env, timeout=120)
        assert shown.returncode == 0, shown.stderr
        return shown.stdout

    def job(self) -> Job | None:
        with self.db.session() as session:
            return session.scalar(select(Job).order_by(Job.id.desc()).limit(1))

    def running_job(self) -> Job | None:
        job = self.job()
        return job if job is not None and job.state == JobState.RUNNING else None

    def wait_done(self, timeout: float = 120) -> Job:
        def settled() -> Job | None:
            job = self.job()
            if job is not None and job.state in (JobState.DONE, JobState.FAILED):
                return job
            return None

        job = wait_for(settled, timeout=timeout, interval=0.2)
        assert job.state == JobState.DONE, f"job {job.id} {job.state.value}: {job.reason}"
        return load_job(self.db, job.id)

    def freeze(self, process: Process) -> None:
        """SIGSTOP `process`, retried until it is not stopped inside a write transaction
        (which would lock the SQLite job store for everyone)."""
        database = self.data_dir / "dicom-node.db"
        while True:
            os.kill(process.pid, signal.SIGSTOP)
            probe = sqlite3.connect(database, timeout=0.5)
            try:
                probe.execute("BEGIN IMMEDIATE")
                probe.rollback()
                return
            except sqlite3.OperationalError:  # "database is locked": it holds the write lock
                os.kill(process.pid, signal.SIGCONT)
                time.sleep(0.05)
            finally:
                probe.close()

    def received(self) -> Counter:
        """Modalities of the objects the TPS received (RTSTRUCT, SR)."""
        return Counter(str(pydicom.dcmread(p, stop_before_pixels=True).Modality) for p in self.tps.received())

    def close(self) -> None:
        for process in self.processes:
            process.stop()
        self.tps.stop()
        self.db.dispose()


@pytest.fixture(scope="module")
def contouring_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny package with its GTV threshold at 0 and no plausibility bounds: every voxel is a
    candidate, one component lying mostly outside the brain mask, so it is dropped and each job
    delivers exactly one SR (zero lesions): the unit counted to prove a job ran once."""
    folder = tmp_path_factory.mktemp("contouring-model")
    for item in tiny_model.iterdir():
        shutil.copy2(item, folder / item.name)
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    manifest["thresholds"]["gtv_probability"] = 0.0
    # Its one "lesion" is the whole brain: far outside the plausibility bounds, which are not what
    # these tests are about (tested in tests/inference/test_plausibility.py), so they are off here.
    bounds = PlausibilityBounds().to_manifest()
    manifest["plausibility"] = {key: None if key.startswith("max_") else value for key, value in bounds.items()}
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return folder


@pytest.fixture
def cluster(tmp_path: Path, contouring_model: Path) -> Iterator[Callable[[float], Cluster]]:
    """`make(lease_s) -> Cluster`; every process it started is stopped at teardown."""
    made: list[Cluster] = []

    def make(lease_s: float) -> Cluster:
        made.append(Cluster(tmp_path, contouring_model, lease_s))
        return made[-1]

    yield make
    for one in made:
        one.close()


def holder_pid(job: Job) -> int:
    """The pid in a worker id `host:pid:nonce:worker-N`."""
    return int(job.claimed_by.split(":")[1])


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
    wait_for(lambda: sum(nodes.received().values()) >= 1)
    time.sleep(2)  # exporter rounds pass: a second run's outputs would arrive now
    assert nodes.received() == Counter({"SR": 1})  # one set of outputs: one SR (this model reports no lesion)


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
    wait_for(lambda: sum(nodes.received().values()) >= 1)
    time.sleep(2)  # exporter rounds pass: a second run's outputs would arrive now
    assert nodes.received() == Counter({"SR": 1})  # one set of outputs: one SR (this model reports no lesion)


def test_after_sigkill_the_other_worker_completes_the_job_once_the_lease_expires(cluster, phantom_factory):
    lease_s = 3.0
    nodes = cluster(lease_s=lease_s)
    nodes.serve()
    workers = {w.pid: w for w in (nodes.worker("worker-1"), nodes.worker("worker-2"))}
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
    wait_for(lambda: sum(nodes.received().values()) >= 1)
    time.sleep(2)  # exporter rounds pass: a second run's outputs would arrive now
    assert nodes.received() == Counter({"SR": 1})  # one set of outputs: one SR (this model reports no lesion)
    print(f"\nLEASE: lease_s={lease_s}: job done {time.monotonic() - killed_at:.1f} s after the SIGKILL")
