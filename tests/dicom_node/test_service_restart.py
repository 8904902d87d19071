"""Start-up after a crash: unacknowledged files go, nothing is routed before a quiet period."""

from __future__ import annotations

import time

from dicom_node.series_watcher import SeriesWatcher
from tests.dicom_node.conftest import storescu


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
    time.sleep(0.5)
    # A watcher that has just started (as after a restart) waits a full quiet period,
    # even though the series' last instance is already older than that.
    fresh = SeriesWatcher(node.db, node.store, node.watcher.rules, quiet_period_s=0.3)
    assert fresh.check_once() == []
    time.sleep(0.4)
    assert len(fresh.check_once()) == 1
