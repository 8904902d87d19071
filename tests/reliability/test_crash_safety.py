"""Crash safety: `dicom-node serve` as a real process, SIGKILLed at seeded random moments
while two senders (DCMTK storescu and pynetdicom) store small series and jobs run and
export to a DCMTK storescp standing in for the TPS; restarted after every kill.

After every kill (the node is dead, so the state is still): every instance that got a
Success status is in the job store and on disk with its recorded sha256; nothing but
`*.dcm` lies under instances/. After every restart: no `*.partial` is left in tmp/.
At the end: every job is `done` or `failed` with a reason, every series' last job is
done with all its instances, every export of a done job reached storescp, and the
store holds exactly the acknowledged instances (files == rows).

A file renamed into instances/ whose row was not yet committed when the process died
(never acknowledged, so nothing is lost) is counted as an orphan; the sender re-sends
that instance, which replaces the file and commits the row, so none is left at the end.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections import Counter
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from dicom_node.peers import free_port
from storage.database import Database
from storage.instance_store import sha256_file
from storage.models import TERMINAL_STATES, EventKind, Export, ExportState, Instance, Job, JobEvent, JobState
from tests.dicom_node.conftest import start_storescp
from tests.helpers.node_processes import NodeProcess, clean_env
from tests.reliability.conftest import (
    SUCCESS,
    audit_store,
    echo_ok,
    pynetdicom_statuses,
    require_tool,
    sop_uid,
    storescu_statuses,
    tps_rules,
    wait_for,
)

KILLS = int(os.environ.get("RELIABILITY_KILLS", "20"))  # >= 20 in CI; fewer only to debug
SEED = 20261123
SERIES_PER_SENDER = 14  # a pool: senders take new series until the kills are over

CONFIG = """
[node]
ae_title = "DICOMNODE"
host = "127.0.0.1"
port = {port}
min_free_disk_mb = 1
acse_timeout_s = 10

[storage]
data_dir = "{data_dir}"

[series]
quiet_period_s = 2.0
check_interval_s = 0.2

[worker]
count = 1
device = "cpu"
poll_interval_s = 0.2
# 20 kills at random: one job may be hit several times; the attempt cap is tested elsewhere
# (tests/dicom_node/test_held_jobs.py), here every job must end done.
max_attempts = 100

[export]
retry_initial_s = 0.5
retry_max_interval_s = 1.0
give_up_after_s = 3600

[logging]
format = "json"
level = "INFO"
"""


def start_serving(node: NodeProcess, port: int) -> float:
    """(Re)start `dicom-node serve`; the seconds until it answers a C-ECHO on `port`."""
    begin = time.monotonic()
    node.start()
    wait_for(lambda: node.alive() and echo_ok(port), timeout=60, interval=0.1)
    return time.monotonic() - begin


class Sender(threading.Thread):
    """Sends its series one after another; re-sends what was not acknowledged (as a PACS
    does) whenever the node is up. `acknowledged` holds only files answered Success."""

    def __init__(
        self,
        kind: str,
        series: list[list[Path]],
        port: int,
        node_up: threading.Event,
        stop: threading.Event,
        no_more: threading.Event,
        pause_s: float,
    ):
        super().__init__(name=f"sender-{kind}", daemon=True)
        self.kind, self.series, self.port = kind, series, port
        self.node_up, self.stop_event, self.no_more, self.pause_s = node_up, stop, no_more, pause_s
        self.acknowledged: set[Path] = set()
        self.started: list[list[Path]] = []
        self.idle = threading.Event()
        self.idle.set()
        self.attempts = 0
        self.error: BaseException | None = None

    def send(self, files: list[Path]) -> set[Path]:
        if self.kind == "dcmtk":
            return {f for f, ok in storescu_statuses(self.port, files, calling="DCMTK", timeout=60).items() if ok}
        try:
            return {
                f for f, s in pynetdicom_statuses(self.port, files, calling="PYSCU", timeout=5).items() if s == SUCCESS
            }
        # pynetdicom notices a peer killed mid C-STORE only at its DIMSE timeout, hence 5 s.
        except Exception:  # the association died under us: nothing more was acknowledged
            return set()

    def run(self) -> None:
        try:
            for files in self.series:
                if self.no_more.is_set():
                    break
                self.started.append(files)
                while not self.stop_event.is_set():
                    self.node_up.wait()
                    pending = [f for f in files if f not in self.acknowledged]
                    if not pending:
                        break
                    self.idle.clear()
                    try:
                        self.attempts += 1
                        self.acknowledged |= self.send(pending)
                    finally:
                        self.idle.set()
                    if not pending or any(f not in self.acknowledged for f in pending):
                        time.sleep(0.2)
                time.sleep(self.pause_s)
        except BaseException as exc:  # reported by the test
            self.error = exc


def inferring_job_id(db: Database) -> int | None:
    """A running job whose current attempt has its model loaded: it is inside run_series
    (or writing outputs). Before that event the worker is importing torch / the package."""
    with db.session() as session:
        for job in session.scalars(select(Job).where(Job.state == JobState.RUNNING)).all():
            events = session.scalars(
                select(JobEvent).where(JobEvent.job_id == job.id).order_by(JobEvent.id.desc())
            ).all()
            for event in events:  # newest first, back to this attempt's "running on" event
                if event.kind == EventKind.STAGE and event.message.startswith("model package"):
                    return job.id
                if event.kind == EventKind.STATE:
                    break
    return None


def exporting_job_id(db: Database) -> int | None:
    with db.session() as session:
        return session.scalar(select(Job.id).where(Job.state == JobState.EXPORTING).limit(1))


def snapshot(db_url: str) -> dict:
    """Job store state with the node dead: rows, job states, pending exports."""
    db = Database(db_url)
    try:
        with db.session() as session:
            rows = {r.sop_instance_uid: (r.path, r.sha256) for r in session.scalars(select(Instance)).all()}
            states = Counter(j.state.value for j in session.scalars(select(Job)).all())
            pending = len(session.scalars(select(Export).where(Export.state == ExportState.PENDING)).all())
        inferring = inferring_job_id(db) is not None
        loading = states["running"] > 0 and not inferring
        return {"rows": rows, "states": states, "pending_exports": pending, "inferring": inferring, "loading": loading}
    finally:
        db.dispose()


def check_after_kill(root: Path, db_url: str, acknowledged: dict[str, Path]) -> dict:
    state = snapshot(db_url)
    rows = state["rows"]
    lost = sorted(set(acknowledged) - set(rows))
    assert not lost, f"{len(lost)} acknowledged instance(s) missing from the job store: {lost[:3]}"
    for uid, (path, digest) in rows.items():
        file = root / path
        assert file.is_file(), f"row {uid} has no file {path}"
        assert sha256_file(file) == digest, f"{path} does not match its sha256"
    under = [p for p in (root / "instances").rglob("*") if p.is_file()]
    stray = [p for p in under if p.suffix != ".dcm"]
    assert not stray, f"stray files under instances/: {stray}"
    state["orphans"] = len({p.relative_to(root).as_posix() for p in under} - {p for p, _ in rows.values()})
    return state


@pytest.mark.slow
def test_sigkill_while_storing_running_and_exporting_loses_nothing(phantom_factory, tiny_model, tmp_path):
    require_tool("storescu")
    rng = random.Random(SEED)
    port, tps_port = free_port(), free_port()
    data_dir = tmp_path / "var"
    config = tmp_path / "node.toml"
    config.write_text(CONFIG.format(port=port, data_dir=data_dir) + tps_rules(tps_port))
    db_url = f"sqlite:///{data_dir}/dicom-node.db"
    env = clean_env(DICOM_NODE_MODEL=str(tiny_model), OMP_NUM_THREADS="1")
    series = [
        [
            phantom_factory(9000 + 50 * s + k, f"CRASH{s}{k:02d}", slices=8 + k % 3, matrix=32)
            for k in range(SERIES_PER_SENDER)
        ]
        for s in range(2)
    ]
    sop_of = {f: sop_uid(f) for group in series for files in group for f in files}

    tps_folder = tmp_path / "tps"
    tps = start_storescp(tps_port, tps_folder)
    node = NodeProcess(["serve", "--config", str(config)], tmp_path / "node.log", env, start=False)
    node_up, stop, no_more = threading.Event(), threading.Event(), threading.Event()
    senders = [
        Sender("dcmtk", series[0], port, node_up, stop, no_more, pause_s=3.5),
        Sender("pynetdicom", series[1], port, node_up, stop, no_more, pause_s=3.5),
    ]
    kills: list[dict] = []
    orphans_seen = 0
    restart_s: list[float] = []
    try:
        restart_s.append(start_serving(node, port))
        node_up.set()
        began = time.monotonic()
        for sender in senders:
            sender.start()
        for index in range(KILLS):
            # Aim a quarter of the kills each at a send in progress, at inference (a job
            # past loading its model), at exports, and anywhere.
            aim = ("storing", "inference", "exporting", "random")[index % 4]
            if aim == "storing":
                try:
                    wait_for(lambda: any(not s.idle.is_set() for s in senders), timeout=6, interval=0.02)
                except AssertionError:
                    aim = "random"  # the senders are done
                time.sleep(rng.uniform(0.0, 0.2))
            elif aim != "random":
                db = Database(db_url)
                try:

                    def hit(aim: str = aim, db: Database = db) -> int | None:
                        if aim == "exporting":
                            return exporting_job_id(db)
                        return inferring_job_id(db)

                    try:
                        wait_for(hit, timeout=10, interval=0.05)
                    except AssertionError:
                        aim = "random"  # nothing of that kind to hit right now
                finally:
                    db.dispose()
                time.sleep(rng.uniform(0.0, 0.3))
            else:
                time.sleep(rng.uniform(0.3, 2.0))
            storing = [s.kind for s in senders if not s.idle.is_set()]
            node_up.clear()
            node.kill()
            killed_at = time.monotonic()
            for sender in senders:  # let an interrupted send report what was acknowledged
                assert sender.idle.wait(90), f"{sender.name} hangs after the kill"
            settle_s = time.monotonic() - killed_at
            acknowledged = {sop_of[f] for s in senders for f in s.acknowledged}
            state = check_after_kill(data_dir, db_url, acknowledged)
            orphans_seen += state["orphans"]
            stages = [
                name
                for name, on in (
                    ("storing", storing),
                    ("loading model", state["loading"]),
                    ("inference", state["inferring"]),
                    ("exporting", state["states"]["exporting"]),
                )
                if on
            ]
            kills.append(
                {
                    "kill": index + 1,
                    "aimed": aim,
                    "stages": stages or ["idle"],
                    "acknowledged": len(acknowledged),
                    "rows": len(state["rows"]),
                    "orphans": state["orphans"],
                    "states": dict(state["states"]),
                    "sender_settle_s": settle_s,
                }
            )
            restart_s.append(start_serving(node, port))
            assert not list((data_dir / "tmp").glob("*.partial")), "partial files survived the restart"
            node_up.set()

        # Let the senders finish the series they started, then every job and export settle.
        loop_s = time.monotonic() - began
        no_more.set()
        for sender in senders:
            sender.join(timeout=180)
            assert not sender.is_alive(), f"{sender.name} did not finish"
            assert sender.error is None, sender.error
        expected = {sop_of[f] for s in senders for files in s.started for f in files}
        assert {sop_of[f] for s in senders for f in s.acknowledged} == expected

        def settled():
            state = snapshot(db_url)
            busy = sum(n for k, n in state["states"].items() if JobState(k) not in TERMINAL_STATES)
            return state if not busy and not state["pending_exports"] else None

        wait_for(settled, timeout=240, interval=0.5)
        drain_s = time.monotonic() - began - loop_s
        assert node.stop() == 0, "the node did not stop cleanly on SIGTERM"
    finally:
        stop.set()
        node_up.set()
        if node.alive():
            node.kill()
        tps.terminate()
        tps.wait(10)

    # Store: exactly the acknowledged instances, intact, nothing stray, nothing partial.
    db = Database(db_url)
    try:
        rows = audit_store(db, data_dir)
        assert set(rows) == expected
        assert not list((data_dir / "tmp").glob("*.partial"))
        with db.session() as session:
            jobs = session.scalars(select(Job)).all()
            exports = session.scalars(select(Export)).all()
            series_sizes = {r.series.series_uid: r.series.instance_count for r in session.scalars(select(Instance))}
    finally:
        db.dispose()
    assert all(j.state in (JobState.DONE, JobState.FAILED) for j in jobs), Counter(j.state for j in jobs)
    assert all(j.reason for j in jobs if j.state == JobState.FAILED)
    last_job = {}
    for job in sorted(jobs, key=lambda j: j.id):
        last_job[job.series_uid] = job
    assert set(last_job) == set(series_sizes), "a series without a job"
    for uid, job in last_job.items():
        assert job.state == JobState.DONE, f"series {uid}: last job {job.id} {job.state.value}: {job.reason}"
        assert job.instance_count == series_sizes[uid]

    # Destination: every export of a done job arrived at storescp.
    received = {}
    for path in tps_folder.iterdir():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        received.setdefault(str(ds.SOPInstanceUID), []).append(str(ds.Modality))
    done_ids = {j.id for j in jobs if j.state == JobState.DONE}
    per_job: dict[int, Counter] = {}
    for export in exports:
        if export.job_id in done_ids:
            assert export.state == ExportState.DONE
            assert export.sop_instance_uid in received, f"job {export.job_id}: {export.sop_instance_uid} never arrived"
            per_job.setdefault(export.job_id, Counter()).update(received[export.sop_instance_uid][:1])
    assert set(per_job) == done_ids, "a done job with nothing delivered"
    duplicates = sum(len(v) - 1 for v in received.values())
    stage_counts = Counter(stage for k in kills for stage in k["stages"])
    for k in kills:
        print(
            f"KILL {k['kill']:2d} aimed={k['aimed']:<9} stages={'+'.join(k['stages']):<40} "
            f"acknowledged={k['acknowledged']:3d} rows={k['rows']:3d} orphans={k['orphans']} "
            f"settle_s={k['sender_settle_s']:.1f} jobs={k['states']}"
        )
    objects = Counter(m for c in per_job.values() for m in c.elements())
    print(
        f"\nCRASH: kills={len(kills)} stages={dict(stage_counts)} instances sent={len(expected)} "
        f"acknowledged={len(expected)} stored={len(rows)} lost=0 orphans_seen={orphans_seen} "
        f"series={len(last_job)} jobs={len(jobs)} done={len(done_ids)} "
        f"failed={sum(j.state == JobState.FAILED for j in jobs)} delivered={dict(objects)} "
        f"duplicate_deliveries={duplicates} restart_s_max={max(restart_s):.1f} "
        f"sender_attempts={[s.attempts for s in senders]} kill_loop_s={loop_s:.0f} drain_s={drain_s:.0f}"
    )
    assert len(kills) >= KILLS
    assert stage_counts["inference"] >= 3, f"too few kills during inference: {stage_counts}"
    assert stage_counts["storing"] >= 3 and stage_counts["exporting"] >= 3, stage_counts
