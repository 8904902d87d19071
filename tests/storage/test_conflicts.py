"""Re-sent SOP Instance UIDs with other bytes (storage/ingest.py conflict policy), on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import threading
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import RTStructureSetStorage
from sqlalchemy import select, text

from dicom_node.store_scp import instance_meta
from storage.database import Database
from storage.ingest import ConflictPolicy, IdentityConflict, StoreOutcome, store_instance
from storage.instance_store import InstanceStore, sha256_file
from storage.jobs import (
    InvalidTransition,
    RoutingOutcome,
    claim_next_job,
    complete_series,
    fail_job,
    hold_outputs,
    release_job,
    series_awaiting_routing,
)
from storage.models import EventKind, Export, Instance, Job, JobEvent, JobState, Series, Study, utcnow
from storage.retention import purge_expired

BASE = Path(get_testdata_file("MR_small.dcm"))  # type: ignore[arg-type]
IMPLICIT = Path(get_testdata_file("MR_small_implicit.dcm"))  # type: ignore[arg-type]
RLE = Path(get_testdata_file("MR_small_RLE.dcm"))  # type: ignore[arg-type]
BASE_UID = str(pydicom.dcmread(BASE, stop_before_pixels=True).SOPInstanceUID)


def send(db: Database, store: InstanceStore, path: Path, policy=ConflictPolicy.KEEP_FIRST) -> StoreOutcome:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    meta = instance_meta(ds, ds.file_meta.TransferSyntaxUID, "PACS", "127.0.0.1")
    return store_instance(db, store, meta, path.read_bytes(), policy)


def edited(tmp_path: Path, name: str, **changes: object) -> Path:
    ds = pydicom.dcmread(BASE)
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    ds.save_as(tmp_path / name)
    return tmp_path / name


def the_instance(db: Database) -> Instance:
    with db.session() as session:
        return session.scalars(select(Instance)).one()


def conflict_events(db: Database) -> list[tuple[int, str]]:
    with db.session() as session:
        rows = session.execute(select(JobEvent.job_id, JobEvent.message).where(JobEvent.kind == EventKind.CONFLICT))
        return [(job_id, message) for job_id, message in rows]


def jobs(db: Database) -> list[tuple[int, JobState]]:
    with db.session() as session:
        return [(j.id, j.state) for j in session.scalars(select(Job).order_by(Job.id))]


@pytest.fixture
def stores(job_store_url: str, tmp_path: Path):
    db = Database(job_store_url)
    yield db, InstanceStore(tmp_path / "data")
    db.dispose()


@pytest.mark.parametrize("resent", [IMPLICIT, RLE], ids=["implicit-vr", "rle-lossless"])
def test_the_same_content_in_another_transfer_syntax_is_a_duplicate(stores, resent: Path) -> None:
    db, store = stores
    assert send(db, store, BASE) is StoreOutcome.STORED
    assert send(db, store, resent) is StoreOutcome.DUPLICATE
    row = the_instance(db)
    assert row.sha256 == sha256_file(BASE) and sha256_file(store.absolute(row.path)) == sha256_file(BASE)
    assert not (store.root / "conflicts").exists()
    assert conflict_events(db) == []
    assert not list(store.tmp_dir.iterdir())  # the re-send's temporary file is gone


def test_keep_first_keeps_the_first_version_and_records_what_changed(stores, tmp_path: Path) -> None:
    db, store = stores
    send(db, store, BASE)
    original_name = str(pydicom.dcmread(BASE).PatientName)
    corrected = edited(tmp_path, "corrected.dcm", PatientName="Merged^Patient", SliceThickness="4.0")
    assert send(db, store, corrected) is StoreOutcome.CONFLICT

    row = the_instance(db)
    assert row.sha256 == sha256_file(BASE) == sha256_file(store.absolute(row.path))
    kept = store.conflicts(row.sop_instance_uid) / f"{sha256_file(corrected)}.dcm"
    assert kept.read_bytes() == corrected.read_bytes()
    ((job_id, message),) = conflict_events(db)
    assert job_id == jobs(db)[-1][0]
    assert (
        row.sop_instance_uid in message
        and "PatientName" in message
        and "SliceThickness 0.8" in message
        and "-> 4.0" in message
    )
    assert "keep-first: the first version stays in use" in message
    assert "Merged" not in message and original_name not in message

    # The same correction again: nothing new to record; a third version is recorded.
    assert send(db, store, corrected) is StoreOutcome.CONFLICT
    assert len(conflict_events(db)) == 1
    assert send(db, store, edited(tmp_path, "third.dcm", PatientID="X9")) is StoreOutcome.CONFLICT
    assert len(conflict_events(db)) == 2 and len(list(store.conflicts(row.sop_instance_uid).iterdir())) == 2


def test_replace_makes_the_new_version_the_instance_and_a_new_delivery(stores, tmp_path: Path) -> None:
    db, store = stores
    send(db, store, BASE)
    first_job = complete_series(db, 1, RoutingOutcome("r", "default", ["tps"], "test"))
    assert [s.series_id for s in series_awaiting_routing(db, 0)] == []
    corrected = edited(tmp_path, "corrected.dcm", PatientName="Merged^Patient", PatientID="MERGED-1")

    assert send(db, store, corrected, ConflictPolicy.REPLACE) is StoreOutcome.CONFLICT

    row = the_instance(db)
    assert row.sha256 == sha256_file(corrected) == sha256_file(store.absolute(row.path))
    assert row.size_bytes == corrected.stat().st_size
    previous = store.conflicts(row.sop_instance_uid) / f"{sha256_file(BASE)}.dcm"
    assert previous.read_bytes() == BASE.read_bytes()  # nothing is lost
    with db.session() as session:
        study = session.scalars(select(Study)).one()
        assert (study.patient_id, study.patient_name) == ("MERGED-1", "Merged^Patient")
    # A new job in `received`, routed after the quiet period; the first, still queued, is cancelled
    # (it must not run on a series being replaced) and keeps its history.
    (first, first_state), (second, second_state) = jobs(db)
    assert first == first_job and first_state == JobState.CANCELLED and second_state == JobState.RECEIVED
    with db.session() as session:
        assert session.get(Job, first).reason == (
            f"cancelled: superseded by job {second} (instances of the series were replaced by corrected versions)"
        )
    assert [s.series_id for s in series_awaiting_routing(db, 0)] == [1]
    events = conflict_events(db)
    assert {job_id for job_id, _ in events} == {first, second}
    assert all("replace: the new version is the instance now" in m and "new delivery" in m for _, m in events)
    assert all("Merged" not in m and "MERGED-1" not in m for _, m in events)
    new_job = complete_series(db, 1, RoutingOutcome("r", "default", ["tps"], "test"))
    assert new_job == second
    with db.session() as session:
        assert session.get(Job, new_job).patient_id == "MERGED-1"


def test_replace_of_something_nothing_downstream_reads_is_no_new_delivery(stores, tmp_path: Path) -> None:
    db, store = stores
    send(db, store, BASE)
    complete_series(db, 1, RoutingOutcome("r", "default", ["tps"], "test"))
    recreated = edited(tmp_path, "recreated.dcm", InstanceCreationTime="101010")
    assert send(db, store, recreated, ConflictPolicy.REPLACE) is StoreOutcome.CONFLICT
    assert the_instance(db).sha256 == sha256_file(recreated)
    assert len(jobs(db)) == 1 and [s.series_id for s in series_awaiting_routing(db, 0)] == []
    ((_, message),) = conflict_events(db)
    assert "InstanceCreationTime" in message and "not evaluated again" in message


@pytest.mark.parametrize(("keyword", "value"), [("BodyPartExamined", "PELVIS"), ("PositionReferenceIndicator", "XX")])
def test_replace_of_an_element_no_fixed_list_named_is_a_new_delivery(
    stores, tmp_path: Path, keyword: str, value: str
) -> None:
    """The reviewer's case: routing may read these; the corrected series is delivered again."""
    db, store = stores
    send(db, store, BASE)
    first = complete_series(db, 1, RoutingOutcome("r", "default", ["tps"], "test"))
    assert send(db, store, edited(tmp_path, "c.dcm", **{keyword: value}), ConflictPolicy.REPLACE) is (
        StoreOutcome.CONFLICT
    )
    assert jobs(db) == [(first, JobState.CANCELLED), (first + 1, JobState.RECEIVED)]
    assert [s.series_id for s in series_awaiting_routing(db, 0)] == [1]


@pytest.mark.parametrize("policy", list(ConflictPolicy))
def test_a_re_send_naming_another_series_is_refused_not_kept_as_a_conflict(stores, tmp_path: Path, policy) -> None:
    """A SOP Instance UID names one instance: a re-send naming another series is a re-used UID (an
    outside tester's other patient's series vanished, acknowledged, into this series' conflicts)."""
    db, store = stores
    send(db, store, BASE)
    moved = edited(tmp_path, "moved.dcm", SeriesInstanceUID="1.2.826.0.1.3680043.8.498.1")
    with pytest.raises(IdentityConflict, match=r"is already stored in another series; this instance names"):
        send(db, store, moved, policy)
    row = the_instance(db)
    assert row.sha256 == sha256_file(BASE) and store.absolute(row.path).exists()
    assert not store.conflicts(row.sop_instance_uid).exists() and conflict_events(db) == []
    assert not list(store.tmp_dir.iterdir())  # nothing of it kept


def test_conflicting_versions_are_purged_with_the_series(stores, tmp_path: Path) -> None:
    """`conflicts/` follows retention: both the kept re-send and a replaced first version go with the series."""
    db, store = stores
    send(db, store, BASE)
    send(db, store, edited(tmp_path, "a.dcm", PatientID="A"), ConflictPolicy.KEEP_FIRST)
    send(db, store, edited(tmp_path, "b.dcm", PatientID="B"), ConflictPolicy.REPLACE)
    uid = the_instance(db).sop_instance_uid
    assert len(list(store.conflicts(uid).iterdir())) == 2
    job_id = complete_series(db, 1, RoutingOutcome(None, None, [], "no rule"))  # rejected: purgeable
    assert jobs(db)[-1] == (job_id, JobState.REJECTED)
    assert purge_expired(db, store, retention_days=30, now=utcnow() + timedelta(days=31)) == 1
    assert not store.conflicts(uid).exists()
    assert not list((store.root / "instances").rglob("*.dcm"))


def test_replace_when_the_stored_file_was_lost_stores_the_new_version(stores, tmp_path: Path) -> None:
    """A stored file removed outside the node: nothing to keep, the correction still becomes the instance."""
    db, store = stores
    send(db, store, BASE)
    store.absolute(the_instance(db).path).unlink()
    corrected = edited(tmp_path, "corrected.dcm", PatientID="NEW")
    assert send(db, store, corrected, ConflictPolicy.REPLACE) is StoreOutcome.CONFLICT
    row = the_instance(db)
    assert sha256_file(store.absolute(row.path)) == row.sha256 == sha256_file(corrected)
    ((_, message),) = conflict_events(db)
    assert "data set (could not be read" in message and "the instance now, its file was lost" in message
    assert not store.conflicts(row.sop_instance_uid).exists()


def test_a_re_send_naming_another_study_is_refused_even_when_the_stored_file_cannot_be_read(
    stores, tmp_path: Path
) -> None:
    """The reviewer's case: the stored file lost, the re-send names another study and series (and patient).
    The guard reads the stored row, not the file."""
    db, store = stores
    send(db, store, BASE)
    stored_path = the_instance(db).path
    store.absolute(stored_path).unlink()
    other = edited(
        tmp_path, "other.dcm", StudyInstanceUID="1.2.3.999", SeriesInstanceUID="1.2.3.999.1", PatientID="OTHER"
    )
    with pytest.raises(IdentityConflict, match=r"already stored in another study"):
        send(db, store, other, ConflictPolicy.REPLACE)
    row = the_instance(db)
    assert (row.path, row.sha256) == (stored_path, sha256_file(BASE))
    assert not store.absolute(stored_path).exists()  # nothing of the other study under this study's path
    assert not store.conflicts(row.sop_instance_uid).exists()
    with db.session() as session:
        assert session.scalars(select(Study)).one().patient_id == pydicom.dcmread(BASE).PatientID
    assert conflict_events(db) == []


def test_replace_updates_the_sop_class_of_the_row(stores, tmp_path: Path) -> None:
    db, store = stores
    send(db, store, BASE)
    enhanced = "1.2.840.10008.5.1.4.1.1.4.1"  # Enhanced MR Image Storage
    resent = edited(tmp_path, "enhanced.dcm", SOPClassUID=enhanced)
    assert send(db, store, resent, ConflictPolicy.REPLACE) is StoreOutcome.CONFLICT
    assert (the_instance(db).sop_class_uid, the_instance(db).sha256) == (enhanced, sha256_file(resent))


def test_replace_never_leaves_the_instance_path_without_a_file(stores, tmp_path: Path) -> None:
    """The reviewer's case: a reader polling the instance's path during 30 replacements never misses it."""
    db, store = stores
    send(db, store, BASE)
    target = store.absolute(the_instance(db).path)
    missing, stop = [0], threading.Event()

    def reader() -> None:
        while not stop.is_set():
            if not os.path.exists(target):
                missing[0] += 1

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(30):
            send(db, store, edited(tmp_path, f"c{i}.dcm", SliceThickness=str(1 + i)), ConflictPolicy.REPLACE)
    finally:
        stop.set()
        thread.join()
    assert missing[0] == 0
    row = the_instance(db)
    assert row.sha256 == sha256_file(target) == sha256_file(tmp_path / "c29.dcm")
    assert len(list(store.conflicts(row.sop_instance_uid).iterdir())) == 30  # every earlier version kept


def test_a_failed_row_commit_puts_the_first_version_back(tmp_path: Path) -> None:
    """The database refuses the row update (a real SQLite trigger): the sender gets a failure, nothing changed."""
    db, store = Database(f"sqlite:///{tmp_path}/db.sqlite"), InstanceStore(tmp_path / "data")
    send(db, store, BASE)
    path = store.absolute(the_instance(db).path)
    with db.session() as session:
        session.execute(
            text("CREATE TRIGGER refuse BEFORE UPDATE ON instances BEGIN SELECT RAISE(ABORT, 'refused'); END")
        )
    with pytest.raises(Exception, match="refused"):
        send(db, store, edited(tmp_path, "c.dcm", PatientID="NEW"), ConflictPolicy.REPLACE)
    assert path.read_bytes() == BASE.read_bytes() and the_instance(db).sha256 == sha256_file(BASE)
    assert not (store.root / "conflicts").exists() or not any((store.root / "conflicts").rglob("*.dcm"))
    assert not list(store.tmp_dir.iterdir())
    db.dispose()


def test_a_replacement_interrupted_before_its_commit_is_completed_by_the_re_send(stores, tmp_path: Path) -> None:
    """A crash after the new file was renamed into place, before the row: the state is built as the
    crash leaves it (old version kept under conflicts/, new bytes at the path, row unchanged)."""
    db, store = stores
    send(db, store, BASE)
    complete_series(db, 1, RoutingOutcome("r", "default", ["tps"], "test"))
    row = the_instance(db)
    corrected = edited(tmp_path, "corrected.dcm", PatientID="NEW")
    store.keep_copy(row.path, f"conflicts/{row.sop_instance_uid}/{row.sha256}.dcm")
    incoming = store.incoming(corrected.read_bytes())
    incoming.finish()
    os.replace(incoming.path, store.absolute(row.path))  # the rename, as `_replace` does it

    assert send(db, store, corrected, ConflictPolicy.REPLACE) is StoreOutcome.CONFLICT
    assert the_instance(db).sha256 == sha256_file(corrected)
    with db.session() as session:
        assert session.scalars(select(Study)).one().patient_id == "NEW"
    assert [state for _, state in jobs(db)] == [JobState.CANCELLED, JobState.RECEIVED]
    assert any("PatientID" in m for _, m in conflict_events(db))


def test_a_running_job_is_left_to_finish_when_its_series_is_replaced(stores, tmp_path: Path) -> None:
    db, store = stores
    send(db, store, BASE)
    first = complete_series(db, 1, RoutingOutcome("r", "default", ["tps"], "test"))
    assert claim_next_job(db, "worker-1") == first
    send(db, store, edited(tmp_path, "c.dcm", PatientID="NEW"), ConflictPolicy.REPLACE)
    assert [state for _, state in jobs(db)] == [JobState.RUNNING, JobState.RECEIVED]
    ((_, pointer),) = [(j, m) for j, m in conflict_events(db) if j == first]
    assert pointer.endswith(f"evaluated again as a new delivery: job {jobs(db)[1][0]}")


def test_a_re_send_of_an_instance_whose_file_is_missing_is_stored_again(stores) -> None:
    """The same bytes again, but the row's file is gone (an older backup restored): not a duplicate."""
    db, store = stores
    send(db, store, BASE)
    path = store.absolute(the_instance(db).path)
    path.unlink()
    assert send(db, store, BASE) is StoreOutcome.STORED
    assert path.read_bytes() == BASE.read_bytes() and the_instance(db).purged_at is None
    assert send(db, store, BASE) is StoreOutcome.DUPLICATE


@pytest.mark.parametrize("damage", ["short", "same size, other bytes"])
def test_a_re_send_of_an_instance_whose_file_a_power_cut_damaged_is_stored_again(stores, damage: str) -> None:
    """The row was committed while its file's fsync ran (issue #18) and the power went: the file is
    short or holds other bytes. The sender, never told it was stored, re-sends it: stored again,
    not answered "duplicate" on the strength of the row."""
    db, store = stores
    send(db, store, BASE)
    path = store.absolute(the_instance(db).path)
    content = path.read_bytes()
    path.write_bytes(content[:-1000] if damage == "short" else content[:-4] + bytes(b ^ 0xFF for b in content[-4:]))
    assert send(db, store, BASE) is StoreOutcome.STORED
    assert path.read_bytes() == content and the_instance(db).sha256 == sha256_file(path)
    assert send(db, store, BASE) is StoreOutcome.DUPLICATE


def test_a_failed_fsync_while_the_row_commits_takes_the_row_back_out(stores, tmp_path, monkeypatch) -> None:
    """An instance of a series that is receiving: its file's fsync runs while its row commits
    (issue #18). The fsync fails (EIO): the C-STORE fails, the row is taken back out and the
    series' count with it, no file is left, and the re-send is stored."""
    db, store = stores
    send(db, store, BASE)  # the series' first instance (its job opened): fsync, then commit
    second = edited(tmp_path, "second.dcm", SOPInstanceUID=BASE_UID + ".2")
    real_fsync = os.fsync

    def failing_fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".dcm"):
            raise OSError(5, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="Input/output error"):
        send(db, store, second)
    monkeypatch.setattr(os, "fsync", real_fsync)
    with db.session() as session:
        assert session.scalars(select(Instance.sop_instance_uid)).all() == [BASE_UID]
        assert session.scalars(select(Series.instance_count)).one() == 1
    assert len(list((store.root / "instances").rglob("*.dcm"))) == 1
    assert send(db, store, second) is StoreOutcome.STORED
    with db.session() as session:
        assert session.scalars(select(Series.instance_count)).one() == 2


def _held(db: Database, job_id: int) -> None:
    """Claim `job_id` and end its attempt as the plausibility gate does: outputs recorded, nothing sent."""
    assert claim_next_job(db, "worker-1") == job_id
    _hold_claimed(db, job_id)


def _hold_claimed(db: Database, job_id: int) -> None:
    rtstruct = (f"2.25.{job_id}1", RTStructureSetStorage, f"outputs/job-{job_id}/attempt-1/rtstruct.dcm")
    hold_outputs(
        db, job_id, f"outputs/job-{job_id}/attempt-1", {"outputs": [rtstruct]}, ["30 lesions"], holder=("worker-1", 1)
    )


def _refused_release(db: Database, job_id: int) -> str:
    with pytest.raises(InvalidTransition) as refused:
        release_job(db, job_id, "physicist")
    with db.session() as session:
        assert session.scalars(select(Export)).all() == []  # nothing is ever sent
    return str(refused.value)


def test_a_held_job_is_cancelled_when_its_series_is_replaced_and_never_released(stores, tmp_path: Path) -> None:
    """Its outputs were computed on the first version: after a material replacement they are never delivered."""
    db, store = stores
    send(db, store, BASE)
    first = complete_series(db, 1, RoutingOutcome("r", "default", ["tps"], "test"))
    _held(db, first)

    send(db, store, edited(tmp_path, "c.dcm", PatientID="NEW"), ConflictPolicy.REPLACE)

    (_, first_state), (second, second_state) = jobs(db)
    assert (first_state, second_state) == (JobState.CANCELLED, JobState.RECEIVED)
    expected = (
        f"cancelled: superseded by job {second} (instances of the series were replaced by corrected versions);"
        " its held outputs were computed on the earlier version and are never released"
    )
    with db.session() as session:
        assert session.get(Job, first).reason == expected
        last = session.scalars(
            select(JobEvent)
            .where(JobEvent.job_id == first, JobEvent.kind == EventKind.STATE)
            .order_by(JobEvent.id.desc())
        ).first()
        assert last is not None and (last.state, last.message) == (JobState.CANCELLED, expected)
    assert _refused_release(db, first) == (f"job {first} is cancelled ({expected}); only a held job can be released")


def test_a_job_running_when_its_series_is_replaced_is_cancelled_if_it_ends_held(stores, tmp_path: Path) -> None:
    db, store = stores
    send(db, store, BASE)
    first = complete_series(db, 1, RoutingOutcome("r", "default", ["tps"], "test"))
    assert claim_next_job(db, "worker-1") == first
    send(db, store, edited(tmp_path, "c.dcm", PatientID="NEW"), ConflictPolicy.REPLACE)
    send(db, store, edited(tmp_path, "d.dcm", PatientID="NEWER"), ConflictPolicy.REPLACE)  # recorded once

    _hold_claimed(db, first)  # the attempt that read the first version ends held

    (_, first_state), (second, _) = jobs(db)
    assert first_state == JobState.CANCELLED
    with db.session() as session:
        messages = [e.message for e in session.scalars(select(JobEvent).where(JobEvent.job_id == first))]
    assert sum(m.startswith(f"superseded while running by job {second} ") for m in messages) == 1
    assert messages[-2].startswith("held: 30 lesions")  # the gate's reason stays in the history
    assert f"superseded by job {second}" in _refused_release(db, first)


def test_the_superseded_while_running_marker_holds_across_clock_skew(stores, tmp_path: Path) -> None:
    """The marker is stamped on the receiving host, the attempt's start on the worker's: a worker
    clock ahead of the receiver's must not make the held attempt releasable (matched by attempt)."""
    db, store = stores
    send(db, store, BASE)
    first = complete_series(db, 1, RoutingOutcome("r", "default", ["tps"], "test"))
    assert claim_next_job(db, "worker-1") == first
    send(db, store, edited(tmp_path, "c.dcm", PatientID="NEW"), ConflictPolicy.REPLACE)
    with db.session() as session:  # the worker's clock five minutes ahead of the receiving host's
        session.get(Job, first).started_at = utcnow() + timedelta(minutes=5)

    _hold_claimed(db, first)

    assert jobs(db)[0] == (first, JobState.CANCELLED)


def test_a_held_job_is_cancelled_by_a_replacement_after_more_slices_opened_a_new_delivery(
    stores, tmp_path: Path
) -> None:
    db, store = stores
    send(db, store, BASE)
    first = complete_series(db, 1, RoutingOutcome("r", "default", ["tps"], "test"))
    _held(db, first)
    assert send(db, store, edited(tmp_path, "late.dcm", SOPInstanceUID="1.2.3.4.5.6")) is StoreOutcome.STORED
    (_, _), (second, second_state) = jobs(db)
    assert second_state == JobState.RECEIVED

    send(db, store, edited(tmp_path, "c.dcm", PatientID="NEW"), ConflictPolicy.REPLACE)

    assert jobs(db) == [(first, JobState.CANCELLED), (second, JobState.RECEIVED)]
    assert f"superseded by job {second}" in _refused_release(db, first)


def test_a_held_job_of_a_series_replaced_only_in_how_the_file_was_made_stays_held(stores, tmp_path: Path) -> None:
    db, store = stores
    send(db, store, BASE)
    first = complete_series(db, 1, RoutingOutcome("r", "default", ["tps"], "test"))
    _held(db, first)
    send(db, store, edited(tmp_path, "c.dcm", InstanceCreationTime="235959"), ConflictPolicy.REPLACE)
    assert jobs(db) == [(first, JobState.HELD)]
    assert release_job(db, first, "physicist") == 1


def test_a_duplicate_re_send_is_answered_only_once_the_stored_file_is_durable(stores, monkeypatch) -> None:
    """A process that crashed after committing a row but before its file's fsync returned left the
    file in the page cache only; the sender re-sends: its "duplicate" (Success) comes only after the
    stored file and its directory are fsync'd, also for the same content in another transfer syntax."""
    db, store = stores
    send(db, store, BASE)
    stored = store.absolute(the_instance(db).path)
    real_fsync = os.fsync
    synced: list[str] = []

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    for resent in (BASE, IMPLICIT):
        synced.clear()
        assert send(db, store, resent) is StoreOutcome.DUPLICATE
        assert str(stored) in synced and str(stored.parent) in synced


@pytest.mark.parametrize("damage", ["short", "missing"])
def test_a_damaged_file_is_repaired_by_a_re_send_in_another_transfer_syntax(stores, damage: str) -> None:
    """No intact first version to keep: the re-send in another transfer syntax (the PACS forwarding
    instead of the modality) becomes the instance, not a "conflict" kept aside."""
    db, store = stores
    send(db, store, BASE)
    stored = store.absolute(the_instance(db).path)
    if damage == "short":
        stored.write_bytes(stored.read_bytes()[:-1000])
    else:
        stored.unlink()
    assert send(db, store, IMPLICIT) is StoreOutcome.STORED
    assert stored.read_bytes() == IMPLICIT.read_bytes() and the_instance(db).sha256 == sha256_file(IMPLICIT)
    assert conflict_events(db) == [] and not (store.root / "conflicts").exists()
    assert send(db, store, BASE) is StoreOutcome.DUPLICATE


@pytest.mark.parametrize("latest", [JobState.QUEUED, JobState.FAILED])
def test_a_repaired_file_opens_a_new_delivery_only_when_the_series_job_has_ended(stores, latest) -> None:
    """The repair of a file a power cut damaged: a queued job reads the repaired file (checked
    before it runs), so no second delivery of the series; a job that failed on the damage has
    ended, so the series runs again as a new job."""
    db, store = stores
    send(db, store, BASE)
    job = complete_series(db, 1, RoutingOutcome("r", "default", ["tps"], "test"))
    if latest is JobState.FAILED:
        assert claim_next_job(db, "worker-1") == job
        fail_job(db, job, "1 of the series' 1 instance files are missing or differ from what was received")
    stored = store.absolute(the_instance(db).path)
    stored.write_bytes(stored.read_bytes()[:-1000])
    assert send(db, store, BASE) is StoreOutcome.STORED
    expected = [(job, latest)] if latest is JobState.QUEUED else [(job, latest), (job + 1, JobState.RECEIVED)]
    assert jobs(db) == expected
