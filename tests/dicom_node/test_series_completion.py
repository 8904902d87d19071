"""When a received series is routed: real associations on 127.0.0.1, decisions at instants of a fake clock.

Each test starts a node whose own watcher never routes (quiet periods of 600 s) and
drives a second watcher that shares the node's view of its associations but reads
time from a `FakeClock`, so every assertion is about an exact number of seconds after
the last instance or the end of the association, however slow the machine is.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import MRImageStorage
from sqlalchemy import select

from dicom_node.series_watcher import SeriesWatcher
from storage.jobs import list_jobs, load_job, retry_job
from storage.models import Job, JobState, Series
from tests.dicom_node.conftest import storescu, wait_for
from tests.helpers.clock import FakeClock

SHORT_S, LONG_S = 5.0, 120.0


@pytest.fixture
def node(start_node):
    return start_node(DICOM_NODE__SERIES__QUIET_PERIOD_S="600")  # its own watcher stays out of the way


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()  # the real time before anything is sent: the watcher below starts listening then


@pytest.fixture
def watcher(node, clock) -> SeriesWatcher:
    return SeriesWatcher(
        node.db, node.store, node.watcher.rules, SHORT_S, LONG_S, node.scp.tracker.deliveries, clock=clock
    )


def with_count(files: list[Path], out: Path, images_in_acquisition: int) -> list[Path]:
    """Copies of `files` as a scanner's original images whose headers say ImagesInAcquisition = `images_in_acquisition`."""
    out.mkdir(parents=True, exist_ok=True)
    copies = []
    for source in files:
        ds = pydicom.dcmread(source)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]  # the phantoms are DERIVED: their counts would not count
        ds.ImagesInAcquisition = images_in_acquisition
        copies.append(out / source.name)
        ds.save_as(copies[-1], enforce_file_format=True)
    return copies


def delivered(node, series_uid: str) -> datetime:
    """Once the association that delivered `series_uid` has closed: the later of its end and the last instance."""
    state = wait_for(lambda: (s := node.scp.tracker.deliveries.state(series_uid)) and not s.open_associations and s)
    assert state.ended_at >= last_instance(node, series_uid)
    return state.ended_at


def last_instance(node, series_uid: str) -> datetime:
    with node.db.session() as session:
        return session.scalars(select(Series.last_received_at).where(Series.series_uid == series_uid)).one()


def series_uid(files: list[Path]) -> str:
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)


def jobs(node) -> list[Job]:
    with node.db.session() as session:
        return list(session.scalars(select(Job).order_by(Job.id)).all())


def test_a_released_complete_series_is_routed_the_short_quiet_period_after_release(node, watcher, clock, mr_series):
    assert storescu(node.address[1], mr_series).returncode == 0
    ended = delivered(node, series_uid(mr_series))

    clock.set(ended, SHORT_S - 0.1)
    assert watcher.check_once() == []
    clock.set(ended, SHORT_S)
    [job_id] = watcher.check_once()
    job = load_job(node.db, job_id)
    assert job.state == JobState.QUEUED and job.instance_count == len(mr_series)
    [completeness] = [e.message for e in job.events if e.message.startswith("completeness:")]
    assert completeness.startswith("completeness: 12 instances: 12 slice positions, spacing ")
    assert completeness.endswith(" mm, no gap")


def test_a_series_sent_in_two_associations_with_a_long_pause_gets_one_job_when_whole(
    node, watcher, clock, mr_series, tmp_path
):
    files = with_count(mr_series, tmp_path / "counted", len(mr_series))
    uid = series_uid(files)
    assert storescu(node.address[1], files[:7]).returncode == 0
    first_ended = delivered(node, uid)

    # Far past the short quiet period: the count says 7 of 12, so the series waits.
    for after in (SHORT_S, 60.0):
        clock.set(first_ended, after)
        assert watcher.check_once() == []
    clock.set(last_instance(node, uid), LONG_S - 0.1)
    assert watcher.check_once() == []
    [received] = jobs(node)
    assert received.state == JobState.RECEIVED
    waiting = [e.message for e in load_job(node.db, received.id).events if e.message.startswith("waiting")]
    assert waiting == [  # once, not at every check
        "waiting for the rest: 7 of 12 images (ImagesInAcquisition 12), InstanceNumber 8-12 missing (up to 120 s)"
    ]

    assert storescu(node.address[1], files[7:]).returncode == 0
    second_ended = delivered(node, uid)
    clock.set(second_ended, SHORT_S - 0.1)
    assert watcher.check_once() == []
    clock.set(second_ended, SHORT_S)
    [job_id] = watcher.check_once()

    [job] = jobs(node)
    assert job.id == job_id == received.id and job.state == JobState.QUEUED and job.instance_count == 12
    messages = [e.message for e in load_job(node.db, job_id).events]
    assert "completeness: 12 instances: 12 of 12 images (ImagesInAcquisition); 12 slice positions" in " ".join(messages)


def test_missing_trailing_slices_wait_the_long_period_then_fail_with_the_reason(
    node, watcher, clock, mr_series, tmp_path
):
    files = with_count(mr_series, tmp_path / "counted", len(mr_series))
    uid = series_uid(files)
    assert storescu(node.address[1], files[:9]).returncode == 0  # the last 3 slices never come
    ended, last = delivered(node, uid), last_instance(node, uid)

    clock.set(ended, SHORT_S)
    assert watcher.check_once() == []
    clock.set(last, LONG_S - 0.1)
    assert watcher.check_once() == []
    clock.set(last, LONG_S)
    [job_id] = watcher.check_once()

    job = load_job(node.db, job_id)
    assert job.state == JobState.FAILED
    assert job.reason == (
        "failed: incomplete series: 9 of 12 images (ImagesInAcquisition 12), InstanceNumber 10-12 missing; "
        "waited 120 s for the rest (`dicom-node jobs retry` runs it as it is)"
    )
    assert job.rule_name == "brain-mr" and job.model == "default" and job.destinations == ["tps"]
    assert not job.exports

    # The rest arrives later: a new delivery, a new job, routed the short period after it.
    assert storescu(node.address[1], files[9:]).returncode == 0
    again = delivered(node, uid)
    clock.set(again, SHORT_S)
    [second_id] = watcher.check_once()
    assert second_id != job_id
    second = load_job(node.db, second_id)
    assert second.state == JobState.QUEUED and second.instance_count == 12

    # A physicist may still run the partial job as it was routed.
    retry_job(node.db, job_id)
    assert load_job(node.db, job_id).state == JobState.QUEUED


def test_a_gap_in_the_slice_positions_waits_for_the_missing_slices(node, watcher, clock, mr_series):
    uid = series_uid(mr_series)
    assert storescu(node.address[1], mr_series[:5] + mr_series[8:]).returncode == 0  # slices 6-8 later
    ended = delivered(node, uid)
    clock.set(ended, 60)
    assert watcher.check_once() == []

    assert storescu(node.address[1], mr_series[5:8]).returncode == 0
    clock.set(delivered(node, uid), SHORT_S)
    [job_id] = watcher.check_once()
    assert load_job(node.db, job_id).state == JobState.QUEUED and len(list_jobs(node.db)) == 1


def send_and_hold(port: int, files: list[Path]):
    """A pynetdicom association that stores `files` and stays open; the caller releases or aborts it."""
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(MRImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert assoc.is_established
    for path in files:
        assert assoc.send_c_store(pydicom.dcmread(path)).Status == 0
    return assoc


def test_an_open_association_holds_its_series_until_the_long_period(node, watcher, clock, mr_series, tmp_path):
    files = with_count(mr_series, tmp_path / "counted", len(mr_series))  # whole by its count, yet it waits
    uid = series_uid(files)
    assoc = send_and_hold(node.address[1], files)
    try:
        last = last_instance(node, uid)
        assert node.scp.tracker.deliveries.state(uid).open_associations == 1
        clock.set(last, 60)
        assert watcher.check_once() == []
        clock.set(last, LONG_S)  # a sender that keeps its association open without sending
        [job_id] = watcher.check_once()
        assert load_job(node.db, job_id).state == JobState.QUEUED
    finally:
        assoc.release()


def test_an_aborted_association_needs_a_count_to_be_routed_and_fails_without_one(
    node, watcher, clock, mr_series, tmp_path
):
    """A transfer cut short leaves evenly spaced positions: without a count nothing shows the series
    whole, and an outside tester's series cut after slice 30 of 48 was delivered without the
    metastasis in the slices that never came. It fails with the reason; `jobs retry` runs it."""
    uncounted, counted = mr_series[:6], with_count(mr_series[6:], tmp_path / "other", 6)
    # Two series: the second one's headers make it a series of its own with a count of 6.
    other = []
    for number, path in enumerate(counted, start=1):
        ds = pydicom.dcmread(path)
        ds.InstanceNumber = number
        ds.SeriesInstanceUID = ds.SeriesInstanceUID + ".2"
        ds.SOPInstanceUID = ds.SOPInstanceUID + ".2"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(path, enforce_file_format=True)
        other.append(path)
    send_and_hold(node.address[1], uncounted + other).abort()
    ended = delivered(node, series_uid(uncounted))
    assert delivered(node, series_uid(other)) == ended
    # pynetdicom may report the closed connection before the A-ABORT: either way, not released.
    assert node.scp.tracker.deliveries.state(series_uid(uncounted)).ended_outcome in ("aborted", "closed")

    clock.set(ended, SHORT_S)
    [counted_job] = watcher.check_once()  # 6 of 6: whole, although the sender aborted
    assert load_job(node.db, counted_job).series_uid == series_uid(other)
    last = last_instance(node, series_uid(uncounted))
    clock.set(last, LONG_S - 0.1)
    assert watcher.check_once() == []  # nothing seen missing, but no count and no release: the sender may retry
    clock.set(last, LONG_S + 1.5)  # the watcher's first round after the long period, not its exact end
    [late_job] = watcher.check_once()
    job = load_job(node.db, late_job)
    assert job.series_uid == series_uid(uncounted) and job.state == JobState.FAILED
    assert job.reason.startswith("failed: interrupted delivery: the association that sent it ")
    assert "with 6 instance(s) received" in job.reason and "`dicom-node jobs retry` runs it as it is" in job.reason


def test_a_correction_resent_on_an_open_association_holds_its_series(start_node, clock, mr_series, tmp_path):
    """A `replace` re-send (outcome conflict) is a delivery too: its series waits while the association is open."""
    node = start_node(DICOM_NODE__SERIES__QUIET_PERIOD_S="600", DICOM_NODE__STORAGE__CONFLICT_POLICY="replace")
    watcher = SeriesWatcher(
        node.db, node.store, node.watcher.rules, SHORT_S, LONG_S, node.scp.tracker.deliveries, clock=clock
    )
    uid = series_uid(mr_series)
    assert storescu(node.address[1], mr_series).returncode == 0
    clock.set(delivered(node, uid), SHORT_S)
    [first] = watcher.check_once()

    corrected = []
    for path in mr_series:
        ds = pydicom.dcmread(path)
        ds.PatientName = "Corrected^Name"
        corrected.append(tmp_path / path.name)
        ds.save_as(corrected[-1], enforce_file_format=True)
    assoc = send_and_hold(node.address[1], corrected)  # every instance a conflict, replaced
    try:
        assert node.scp.tracker.deliveries.state(uid).open_associations == 1
        last = last_instance(node, uid)
        clock.set(last, 60)
        assert watcher.check_once() == []  # long past the short quiet period, but still being delivered
    finally:
        assoc.release()
    clock.set(delivered(node, uid), SHORT_S)
    [second] = watcher.check_once()
    assert second != first and load_job(node.db, second).state == JobState.QUEUED


def test_a_correction_that_moves_a_slice_without_changing_the_count_is_assessed_again(
    start_node, clock, mr_series, tmp_path
):
    """The verdict is read again after a `replace`, even when the instance count stays the same."""
    node = start_node(DICOM_NODE__SERIES__QUIET_PERIOD_S="600", DICOM_NODE__STORAGE__CONFLICT_POLICY="replace")
    watcher = SeriesWatcher(
        node.db, node.store, node.watcher.rules, SHORT_S, LONG_S, node.scp.tracker.deliveries, clock=clock
    )
    uid = series_uid(mr_series)
    assert storescu(node.address[1], mr_series[:5] + mr_series[6:11]).returncode == 0  # slice 6 missing: a gap
    clock.set(delivered(node, uid), 60)
    assert watcher.check_once() == []  # waiting for the gap

    # The sender corrects its last slice: it was meant to be the missing one (same SOP Instance UID, new position).
    moved = pydicom.dcmread(mr_series[5])
    last = pydicom.dcmread(mr_series[10], stop_before_pixels=True)
    moved.SOPInstanceUID = moved.file_meta.MediaStorageSOPInstanceUID = last.SOPInstanceUID
    moved.save_as(tmp_path / "moved.dcm", enforce_file_format=True)
    assert storescu(node.address[1], [tmp_path / "moved.dcm"]).returncode == 0
    clock.set(delivered(node, uid), SHORT_S)
    [job_id] = watcher.check_once()
    job = load_job(node.db, job_id)
    assert job.state == JobState.QUEUED and job.instance_count == 10
    assert any(e.message.startswith("completeness: 10 instances") and "no gap" in e.message for e in job.events)


def test_an_open_silent_association_is_aborted_and_its_uncounted_series_fails(
    node, watcher, clock, mr_series, tmp_path
):
    """The node aborts an association silent for `network_timeout_s`; its series, cut, fails. The watcher
    waits for that abort past the long period while the association is open (`idle_abort_s`)."""
    watcher.idle_abort_s = LONG_S + 30
    assoc = send_and_hold(node.address[1], mr_series[:6])
    try:
        last = last_instance(node, series_uid(mr_series[:6]))
        clock.set(last, LONG_S + 1)
        assert watcher.check_once() == []  # still open, not yet past `idle_abort_s`: it may be sending
    finally:
        assoc.abort()  # what the node's idle timer does to a silent association
    delivered(node, series_uid(mr_series[:6]))
    clock.set(last, LONG_S + 31)
    [job_id] = watcher.check_once()
    job = load_job(node.db, job_id)
    assert job.state == JobState.FAILED and job.reason.startswith("failed: interrupted delivery")


def test_a_cut_delivery_is_still_known_when_the_watcher_comes_late(node, watcher, clock, mr_series):
    """The delivery of a series still to decide is never pruned: checked long after its long period (the
    database was down, say), the aborted series still fails instead of looking clean."""
    send_and_hold(node.address[1], mr_series[:6]).abort()
    ended = delivered(node, series_uid(mr_series[:6]))
    clock.set(ended, 3 * LONG_S)
    [job_id] = watcher.check_once()
    assert load_job(node.db, job_id).state == JobState.FAILED
