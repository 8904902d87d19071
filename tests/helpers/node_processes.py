"""`dicom-node serve` and `dicom-node worker` processes as an operator starts them, sharing one data
dir and one job store (SQLite or PostgreSQL), with a DCMTK storescp (or pynetdicom) as the TPS.

Used by tests/reliability/test_worker_processes.py (issues #16, #19), test_crash_safety.py,
test_receive_memory.py, tests/e2e and bench/workers.py: the one place a test starts a node process.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import pydicom
from sqlalchemy import select, text

from dicom_node.peers import ReceivingNode, free_port, wait_listening
from inference.model.package import MANIFEST_NAME
from inference.plausibility import PlausibilityBounds
from storage.database import Database, application_name
from storage.jobs import load_job
from storage.models import DELIVERED_EXPORT_STATES, SETTLED_STATES, UNSETTLED_EXPORT_STATES, Export, Job, JobState
from tests.dicom_node.conftest import wait_for
from tests.helpers.models import make_tiny_package

CONFIG = """
[node]
ae_title = "DICOMNODE"
host = "127.0.0.1"
port = {port}
min_free_disk_mb = 1

[storage]
data_dir = "{data_dir}"
database_url = "{database_url}"

[series]
quiet_period_s = 2.0  # a series sent on a loaded 2-core machine must not be cut in two
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

[[destinations]]
name = "tps"
ae_title = "TPS"
host = "127.0.0.1"
port = {tps_port}

[[rules]]
name = "mr"
destinations = ["tps"]
[rules.match]
Modality = "MR"
"""


def make_contouring_model(folder: Path) -> Path:
    """A tiny package (64 px input, no N4) that contours one "lesion" per phantom series: the output layer
    amplified (a speckle following the image's texture) and only components of at least 500 mm3 kept, so
    each job delivers one RTSTRUCT and one SR, the unit counted to prove a job ran once. Its plausibility
    bounds are off: they are not what these runs are about (tests/inference/test_plausibility.py)."""
    make_tiny_package(
        folder,
        name="contouring-test",
        gtv_gain=200.0,
        thresholds={"gtv_probability": 0.5, "min_lesion_volume_mm3": 500.0},
    )
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    bounds = PlausibilityBounds().to_manifest()
    manifest["plausibility"] = {key: None if key.startswith("max_") else value for key, value in bounds.items()}
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return folder


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any `DICOM_NODE*` setting (the config file decides), plus `extra`."""
    return {k: v for k, v in os.environ.items() if not k.startswith("DICOM_NODE")} | extra


class NodeProcess:
    """One `dicom-node` command in its own process (session), its output appended to a log file.

    Started at construction unless `start=False`; `start` again after `kill` or `stop` runs the same
    command anew (a restart on the same port and data dir)."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str], *, start: bool = True) -> None:
        self.args, self.log, self.env = args, log, env
        self._popen: subprocess.Popen[bytes] | None = None
        self.starts = 0
        if start:
            self.start()

    def start(self) -> None:
        assert not self.alive(), "already running"
        executable = Path(sys.executable).parent / "dicom-node"
        with open(self.log, "ab") as out:
            self._popen = subprocess.Popen(
                [str(executable), *self.args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )
        self.starts += 1

    @property
    def popen(self) -> subprocess.Popen[bytes]:
        assert self._popen is not None, "never started"
        return self._popen

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
        return self._popen is not None and self._popen.poll() is None

    def terminate(self) -> None:
        """Ask it to stop (resumed first if paused); `stop` waits for it."""
        if self.alive():
            os.kill(self.pid, signal.SIGCONT)
            self.popen.send_signal(signal.SIGTERM)

    def stop(self) -> int:
        """SIGTERM, then its exit status (SIGKILLed if it has not stopped within 60 s)."""
        if self.alive():
            self.terminate()
            try:
                return self.popen.wait(60)
            except subprocess.TimeoutExpired:
                self.popen.kill()
        return self.popen.wait(10)

    def kill(self) -> None:
        """SIGKILL (a crash: nothing of it runs any more) and reap it."""
        if self.alive():
            self.popen.kill()
        self.popen.wait(10)


class Cluster:
    """A serve process, any number of worker processes and a TPS, on one data dir and one job store."""

    def __init__(self, tmp_path: Path, model: Path, lease_s: float, database_url: str) -> None:
        self.tmp_path = tmp_path
        self.port, tps_port = free_port(), free_port()
        self.data_dir = tmp_path / "var"
        self.database_url = database_url
        self.config = tmp_path / "node.toml"
        self.config.write_text(
            CONFIG.format(
                port=self.port, data_dir=self.data_dir, database_url=database_url, lease_s=lease_s, tps_port=tps_port
            )
        )
        self.env = clean_env(DICOM_NODE_MODEL=str(model), OMP_NUM_THREADS="1")
        self.tps = ReceivingNode(tmp_path / "tps", tps_port)
        self.processes: list[NodeProcess] = []
        self.db = Database(database_url)  # creates the schema before any node process starts

    @property
    def postgresql(self) -> bool:
        return self.database_url.startswith("postgresql")

    def serve(self, local_workers: int = 0) -> NodeProcess:
        env = self.env | {"DICOM_NODE__WORKER__COUNT": str(local_workers)}
        process = NodeProcess(["serve", "--config", str(self.config)], self.tmp_path / "serve.log", env)
        self.processes.append(process)
        wait_for(lambda: not process.alive() or process.logged("scp.listening"), timeout=90, interval=0.2)
        assert process.alive(), process.log.read_text()
        wait_listening(self.port)
        return process

    def worker(self, name: str) -> NodeProcess:
        (process,) = self.workers(name)
        return process

    def workers(self, *names: str) -> list[NodeProcess]:
        """Start one `dicom-node worker --device cpu` per name, all at once; return them once each has started."""
        started = [
            NodeProcess(
                ["worker", "--config", str(self.config), "--device", "cpu"], self.tmp_path / f"{name}.log", self.env
            )
            for name in names
        ]
        self.processes.extend(started)
        for process in started:
            wait_for(lambda p=process: p.logged("workers.started") or not p.alive(), timeout=90, interval=0.2)
            assert process.alive(), process.log.read_text()
        return started

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

    def jobs(self) -> list[Job]:
        with self.db.session() as session:
            return list(session.scalars(select(Job).order_by(Job.id)))

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

    def wait_all_done(self, count: int, timeout: float = 120) -> list[Job]:
        """Wait until `count` jobs exist and none is unfinished; return them (with events and exports)."""
        unfinished = {JobState.RECEIVED, JobState.QUEUED, JobState.RUNNING, JobState.EXPORTING}

        def settled() -> list[Job] | None:
            jobs = self.jobs()
            return jobs if len(jobs) >= count and not any(j.state in unfinished for j in jobs) else None

        return [load_job(self.db, j.id) for j in wait_for(settled, timeout=timeout, interval=0.3)]

    def exports(self) -> list[Export]:
        with self.db.session() as session:
            return list(session.scalars(select(Export).order_by(Export.id)))

    def wait_exports_settled(self, timeout: float = 60) -> list[Export]:
        """Wait until nothing is left to send, then return every export row.

        Settled: no job unfinished (none can still write outputs), no export row pending or
        committing (the exporter has nothing left to send), and the TPS holds one object per
        delivered row. A job runs again only after a claim, which a `done` job never gets, so
        once this holds no further output of these jobs can reach the TPS: the count the TPS
        holds is final, not a snapshot taken before a late duplicate arrives.
        """

        def settled() -> list[Export] | None:
            if any(job.state not in SETTLED_STATES for job in self.jobs()):
                return None
            exports = self.exports()
            if any(export.state in UNSETTLED_EXPORT_STATES for export in exports):
                return None
            delivered = sum(export.state in DELIVERED_EXPORT_STATES for export in exports)
            return exports if len(self.tps.received()) >= delivered else None

        return wait_for(settled, timeout=timeout, interval=0.1)

    def freeze(self, process: NodeProcess) -> None:
        """SIGSTOP `process` at a moment it holds no transaction open; resume it with SIGCONT.

        A process stopped inside a transaction would block the others: on SQLite by holding the
        file's write lock (everyone's writes wait), on PostgreSQL by holding row locks (a job row
        locked by a stopped claim or lease renewal is skipped or waited on, so the check under
        test would measure the lock, not the lease). So it is stopped, then probed from outside,
        and let run a little and stopped again until the probe finds it between transactions:
        SQLite: a `BEGIN IMMEDIATE` of our own succeeds; PostgreSQL: none of its connections
        (`application_name` `dicom-node <host>:<pid>`, see storage.database) has a transaction
        open in `pg_stat_activity`. The probe is exact for every thread of the process (the
        lease heartbeat too), unlike waiting for a log line that only says where one thread is.
        """
        while True:
            os.kill(process.pid, signal.SIGSTOP)
            if not self._in_transaction(process.pid):
                return
            os.kill(process.pid, signal.SIGCONT)
            time.sleep(0.05)

    def _in_transaction(self, pid: int) -> bool:
        if self.postgresql:
            name = application_name(pid)
            with self.db.engine.connect() as connection:
                open_transactions = connection.execute(
                    text(
                        "SELECT count(*) FROM pg_stat_activity"
                        " WHERE application_name = :name AND xact_start IS NOT NULL"
                    ),
                    {"name": name},
                ).scalar_one()
            return bool(open_transactions)
        probe = sqlite3.connect(self.database_url.split("///", 1)[1], timeout=0.5)
        try:
            probe.execute("BEGIN IMMEDIATE")
            probe.rollback()
            return False
        except sqlite3.OperationalError:  # "database is locked": it holds the write lock
            return True
        finally:
            probe.close()

    def received(self) -> Counter:
        """Modalities of the objects the TPS received (RTSTRUCT, SR)."""
        return Counter(str(pydicom.dcmread(p, stop_before_pixels=True).Modality) for p in self.tps.received())

    def received_by_series(self, series_uids: Iterable[str]) -> dict[str, Counter]:
        """Modalities of the objects the TPS received, by which of `series_uids` (the MR series sent)
        each references; an object referencing none of them is counted under "none"."""
        wanted = set(series_uids)
        found: dict[str, Counter] = {}
        for path in self.tps.received():
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            for series_uid in referenced_series(ds) & wanted or {"none"}:
                found.setdefault(series_uid, Counter())[str(ds.Modality)] += 1
        return found

    def close(self) -> None:
        for process in self.processes:  # all at once: each takes a few seconds to wind down
            process.terminate()
        for process in self.processes:
            process.stop()
        self.tps.stop()
        self.db.dispose()


def referenced_series(ds: pydicom.Dataset) -> set[str]:
    """The Series Instance UIDs an RTSTRUCT or SR references (inside its sequences, not its own)."""
    own = str(ds.SeriesInstanceUID)
    found = {str(e.value) for e in ds.iterall() if e.keyword == "SeriesInstanceUID"}
    return found - {own}


def holder_pid(job: Job) -> int:
    """The pid in a worker id `host:pid:nonce:worker-N`."""
    return int(job.claimed_by.split(":")[1])
