"""Load: four concurrent senders (two DCMTK storescu processes, two pynetdicom threads)
plus a C-ECHO probe loop; then the association limit answered with A-ASSOCIATE-RJ.

What must hold: every instance that got Success is stored exactly once (rows ==
files == instances sent, hashes match), each series has exactly one job, the
probes keep succeeding, and an association over the limit is rejected promptly.
"""

from __future__ import annotations

import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pydicom
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from sqlalchemy import select

from dicom_node.peers import free_port
from storage.jobs import list_jobs, load_job
from storage.models import TERMINAL_STATES, Job, JobState, Series
from tests.dicom_node.conftest import start_storescp
from tests.reliability.conftest import (
    SUCCESS,
    audit_store,
    echo_ok,
    pynetdicom_statuses,
    require_tool,
    storescu_statuses,
    tps_rules,
    wait_for,
)

SENDERS = 4
SERIES_PER_SENDER = 3


def test_four_concurrent_senders_and_echo_probes_lose_nothing(start_node, with_tiny_model, phantom_factory, tmp_path):
    """Ingest under load while one worker runs the jobs (tiny model) and exports every
    result to a DCMTK storescp: every job must end done with its results delivered."""
    tps_port = free_port()
    tps = start_storescp(tps_port, tmp_path / "tps")
    config = tmp_path / "node.toml"
    config.write_text(tps_rules(tps_port))
    node = start_node(
        config,
        DICOM_NODE__NODE__MAX_ASSOCIATIONS="8",
        DICOM_NODE__WORKER__COUNT="1",
        DICOM_NODE__WORKER__POLL_INTERVAL_S="0.2",
        DICOM_NODE__EXPORT__RETRY_INITIAL_S="0.5",
        DICOM_NODE__SERIES__QUIET_PERIOD_S="2",
    )
    port = node.address[1]
    plan: list[list[list[Path]]] = []  # sender -> series -> files
    for sender in range(SENDERS):
        plan.append(
            [
                phantom_factory(7000 + 10 * sender + k, f"LOAD{sender}{k}", slices=10 + k)
                for k in range(SERIES_PER_SENDER)
            ]
        )
    sent = sum(len(files) for series in plan for files in series)

    stop = threading.Event()
    probes = {"ok": 0, "failed": 0, "max_s": 0.0}

    def probe_loop():
        while not stop.is_set():
            start = time.monotonic()
            ok = echo_ok(port)
            probes["max_s"] = max(probes["max_s"], time.monotonic() - start)
            probes["ok" if ok else "failed"] += 1
            stop.wait(0.05)

    def dcmtk_sender(index: int) -> dict[Path, bool]:
        results: dict[Path, bool] = {}
        for files in plan[index]:
            results.update(storescu_statuses(port, files, calling=f"DCMTK{index}"))
        return results

    def pynetdicom_sender(index: int) -> dict[Path, bool]:
        results: dict[Path, bool] = {}
        for files in plan[index]:
            statuses = pynetdicom_statuses(port, files, calling=f"PYSCU{index}")
            results.update({f: s == SUCCESS for f, s in statuses.items()})
        return results

    prober = threading.Thread(target=probe_loop)
    prober.start()
    started = time.monotonic()
    try:
        with ThreadPoolExecutor(SENDERS) as pool:
            futures = [
                pool.submit(dcmtk_sender, 0),
                pool.submit(dcmtk_sender, 1),
                pool.submit(pynetdicom_sender, 2),
                pool.submit(pynetdicom_sender, 3),
            ]
            outcomes = [f.result() for f in futures]
    finally:
        elapsed = time.monotonic() - started
        stop.set()
        prober.join()

    acknowledged = [f for outcome in outcomes for f, ok in outcome.items() if ok]
    assert len(acknowledged) == sent, f"{sent - len(acknowledged)} instance(s) not acknowledged"
    rows = audit_store(node.db, node.store.root)
    expected = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in acknowledged}
    assert set(rows) == expected
    lost = len(expected - set(rows))

    # One job per series, each with all its instances, each done with its results delivered.
    n_series = SENDERS * SERIES_PER_SENDER
    try:

        def all_done():
            jobs = [load_job(node.db, j.id) for j in list_jobs(node.db)]
            return jobs if len(jobs) == n_series and all(j.state in TERMINAL_STATES for j in jobs) else None

        jobs = wait_for(all_done, timeout=180, interval=0.5)
        jobs_s = time.monotonic() - started
    finally:
        tps.terminate()
        tps.wait(10)
    with node.db.session() as session:
        series_counts = {s.series_uid: s.instance_count for s in session.scalars(select(Series)).all()}
    assert len({j.series_uid for j in jobs}) == n_series
    assert sorted(series_counts.values()) == sorted(len(files) for series in plan for files in series)
    assert all(j.instance_count == series_counts[j.series_uid] for j in jobs)
    assert all(j.state == JobState.DONE for j in jobs), [(j.id, j.state.value, j.reason) for j in jobs]
    received = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in (tmp_path / "tps").iterdir()}
    exports = [e for j in jobs for e in j.exports]
    assert exports and all(e.sop_instance_uid in received for e in exports)
    assert probes["failed"] == 0 and probes["ok"] > 0
    print(
        f"\nLOAD: senders={SENDERS} series={n_series} sent={sent} acknowledged={len(acknowledged)} "
        f"stored={len(rows)} lost={lost} jobs={len(jobs)} echo_ok={probes['ok']} "
        f"echo_failed={probes['failed']} echo_max_s={probes['max_s']:.2f} elapsed_s={elapsed:.1f} "
        f"rate={sent / elapsed:.0f}/s jobs_done={len(jobs)} results_delivered={len(exports)} "
        f"all_jobs_done_after_s={jobs_s:.0f}"
    )


def test_association_over_the_limit_is_rejected_promptly(start_node):
    node = start_node(DICOM_NODE__NODE__MAX_ASSOCIATIONS="2")
    port = node.address[1]
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context(Verification)
    held = [ae.associate("127.0.0.1", port, ae_title="DICOMNODE") for _ in range(2)]
    try:
        assert all(a.is_established for a in held)
        third_ae = AE(ae_title="THIRD")
        third_ae.add_requested_context(Verification)
        third_ae.acse_timeout = 10
        start = time.monotonic()
        third = third_ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
        took = time.monotonic() - start
        assert third.is_rejected, "the third association was not rejected"
        assert took < 3, f"rejection took {took:.1f} s"
        # A real peer sees a proper A-ASSOCIATE-RJ (PS3.8 9.3.4): rejected-transient,
        # service-provider (presentation), local limit exceeded; and gets it at once.
        start = time.monotonic()
        dcmtk = subprocess.run(
            [require_tool("echoscu"), "-aet", "DCMTK", "-aec", "DICOMNODE", "127.0.0.1", str(port)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        dcmtk_took = time.monotonic() - start
        assert dcmtk.returncode != 0
        said = (dcmtk.stderr + dcmtk.stdout).lower()
        assert "association rejected" in said and "rejected transient" in said
        assert "local limit exceeded" in said
        assert dcmtk_took < 3
        # The held associations still work.
        assert all(int(a.send_c_echo().Status) == SUCCESS for a in held)
    finally:
        for assoc in held:
            assoc.release()
    # Once they are released a new association is admitted again.
    assert wait_for(lambda: echo_ok(port), timeout=5)
    print(
        f"\nASSOC LIMIT: third association rejected in {took * 1000:.0f} ms (pynetdicom), "
        f"{dcmtk_took * 1000:.0f} ms (echoscu)"
    )


def test_one_series_over_four_parallel_associations_is_counted_exactly(start_node, phantom_factory):
    """A PACS pushing one series over parallel associations: every instance stored and
    counted once (the series' and the job's instance count are what `jobs show` reports)."""
    node = start_node(DICOM_NODE__SERIES__QUIET_PERIOD_S="3")
    port = node.address[1]
    files = phantom_factory(7100, "LOADPAR", slices=60, matrix=32)
    with ThreadPoolExecutor(4) as pool:
        parts = list(pool.map(lambda k: storescu_statuses(port, files[k::4], calling=f"PACS{k}"), range(4)))
    assert all(ok for part in parts for ok in part.values())
    rows = audit_store(node.db, node.store.root)
    assert len(rows) == len(files)
    (job,) = wait_for(lambda: [j for j in _jobs(node) if j.state == JobState.QUEUED] or None, timeout=30)
    with node.db.session() as session:
        (series,) = session.scalars(select(Series)).all()
    assert series.instance_count == len(files), "instance count lost updates under concurrent stores"
    assert job.instance_count == len(files)


def _jobs(node) -> list[Job]:
    with node.db.session() as session:
        return list(session.scalars(select(Job)).all())
