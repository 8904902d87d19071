"""Start-up after a crash: unacknowledged files go, nothing is routed before a quiet period."""

from __future__ import annotations

from sqlalchemy import select

from dicom_node.series_watcher import SeriesWatcher
from storage.jobs import load_job
from storage.models import JobState, Series
from tests.dicom_node.conftest import storescu
from tests.helpers.clock import FakeClock


def test_start_up_removes_files_that_have_no_row_and_keeps_stored_ones(start_node, node_env, mr_series):
    node = start_node()
    assert storescu(node.address[1], mr_series[:3]).returncode == 0
    stored = sorted((node.store.root / "instances").rglob("*.dcm"))
    node.stop()
    # As if the process died between the rename into place and the row commit.
    stray = node.store.root / "instances" / "1.2.3" / "1.2.3.4" / "1.2.3.4.5.dcm"
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"never acknowledged")

    restarted = start_node()
    assert not stray.exists()
    assert sorted((restarted.store.root / "instances").rglob("*.dcm")) == stored


def test_nothing_is_routed_during_the_first_quiet_period_after_start(start_node, mr_series):
    node = start_node(DICOM_NODE__SERIES__QUIET_PERIOD_S="600")  # its own watcher never routes here
    assert storescu(node.address[1], mr_series).returncode == 0
    with node.db.session() as session:
        last_received = session.scalars(select(Series.last_received_at)).one()
    # A watcher that starts (as after a restart) an hour after the series' last instance:
    # the series is far older than the quiet period, yet waits a full quiet period from the start.
    clock = FakeClock(last_received)
    clock.advance(3600)
    fresh = SeriesWatcher(node.db, node.store, node.watcher.rules, quiet_period_s=5, clock=clock)
    assert fresh.check_once() == []
    clock.advance(4.9)
    assert fresh.check_once() == []
    clock.advance(0.1)
    [job_id] = fresh.check_once()  # routed (here the long period is the short one)
    assert load_job(node.db, job_id).state == JobState.QUEUED


def test_a_series_fed_before_the_restart_waits_like_an_aborted_one(start_node, mr_series):
    """Its association was cut by the stop: the sender may resume, so the short period is not enough
    (the phantom's headers carry no count that could show it whole). After the long period it is routed:
    this process cannot tell it from a series received whole just before the stop (module doc)."""
    node = start_node(DICOM_NODE__SERIES__QUIET_PERIOD_S="600")  # its own watcher never routes here
    assert storescu(node.address[1], mr_series).returncode == 0
    with node.db.session() as session:
        last_received = session.scalars(select(Series.last_received_at)).one()
    clock = FakeClock(last_received)
    clock.advance(3600)
    fresh = SeriesWatcher(
        node.db, node.store, node.watcher.rules, quiet_period_s=5, partial_quiet_period_s=120, clock=clock
    )
    clock.advance(5)
    assert fresh.check_once() == []  # the short period after the restart is not enough
    clock.advance(114.9)
    assert fresh.check_once() == []
    clock.advance(0.1)
    [job_id] = fresh.check_once()  # the long period, counted from the restart
    assert load_job(node.db, job_id).state == JobState.QUEUED
