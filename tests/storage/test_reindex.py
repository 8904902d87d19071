"""`storage.reindex`: the job store lost, its rows rebuilt from the instance files (SQLite and PostgreSQL)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from dicom_node.commands.store import stored_instance_meta
from storage.database import Database
from storage.ingest import StoreOutcome, store_instance
from storage.instance_store import InstanceStore, sha256_file
from storage.jobs import RoutingOutcome, complete_series, series_awaiting_routing, stored_instance_paths
from storage.models import Instance, Job, JobState, Series, Study, utcnow
from storage.reindex import reindex
from storage.store_identity import StoreMismatchError, check_and_bind


def receive(db: Database, store: InstanceStore, files: list[Path]) -> None:
    for path in files:
        store_instance(db, store, stored_instance_meta(path), path.read_bytes())


@pytest.fixture
def lost_database(tmp_path: Path, small_axial_series, phantom_series) -> InstanceStore:
    """A data directory holding two series received and routed, whose SQLite job store was then deleted."""
    store = InstanceStore(tmp_path / "data")
    old = Database(f"sqlite:///{tmp_path}/old.db")
    check_and_bind(old, store)
    receive(old, store, small_axial_series.files)
    receive(old, store, phantom_series(11, orientation="sagittal", matrix=64, slices=10).files)
    for series_id in (1, 2):
        complete_series(old, series_id, RoutingOutcome("r", "default", ["tps"], "test"))
    old.dispose()
    for leftover in tmp_path.glob("old.db*"):
        leftover.unlink()
    return store


def instance_files(store: InstanceStore) -> dict[str, Path]:
    return {path.relative_to(store.root).as_posix(): path for path in (store.root / "instances").rglob("*.dcm")}


def test_reindex_with_route_brings_every_instance_back_and_the_series_are_routed_again(
    lost_database, job_store_url
) -> None:
    """The issue's requirement: the job history is gone, but every instance is back and can be routed again."""
    store = lost_database
    db = Database(job_store_url)
    files = instance_files(store)
    assert len(files) == 30
    with pytest.raises(StoreMismatchError, match="dicom-node store reindex"):
        check_and_bind(db, store)  # start-up refuses the empty database and deletes nothing
    assert instance_files(store) == files

    report = reindex(db, store, stored_instance_meta, route=True)

    assert (report.files, report.known, report.added, len(report.series), report.unreadable) == (30, 0, 30, 2, [])
    assert report.routed and report.missing == []
    with db.session() as session:
        rows = {row.path: row for row in session.scalars(select(Instance))}
        assert rows.keys() == files.keys()
        for relative, row in rows.items():
            ds = pydicom.dcmread(files[relative], stop_before_pixels=True)
            assert row.sop_instance_uid == ds.SOPInstanceUID and row.sha256 == sha256_file(files[relative])
            assert row.size_bytes == files[relative].stat().st_size
            assert row.transfer_syntax_uid == ds.file_meta.TransferSyntaxUID
        assert sorted(s.instance_count for s in session.scalars(select(Series))) == [10, 20]
        assert all(study.patient_id for study in session.scalars(select(Study)))
        assert [job.state for job in session.scalars(select(Job))] == [JobState.RECEIVED, JobState.RECEIVED]
    # Start-up accepts the pair now and would delete nothing; the watcher routes both series.
    assert check_and_bind(db, store) == report.store_id
    assert stored_instance_paths(db) == set(files)
    assert sorted([s.series_id for s in series_awaiting_routing(db, 0)]) == [1, 2]
    job_id = complete_series(db, 1, RoutingOutcome("r", "default", ["tps"], "test"))
    with db.session() as session:
        assert session.get(Job, job_id).state == JobState.QUEUED

    again = reindex(db, store, stored_instance_meta)  # idempotent
    assert (again.files, again.known, again.added, again.store_id) == (30, 30, 0, report.store_id)
    db.dispose()


def test_unreadable_and_misplaced_files_are_moved_aside_never_deleted(lost_database, tmp_path) -> None:
    store = lost_database
    db = Database(f"sqlite:///{tmp_path}/new.db")
    series_dir = next((store.root / "instances").glob("*/*"))
    junk = series_dir / "1.2.3.4.5.dcm"
    junk.write_bytes(b"not DICOM at all")
    a_file = next(p for p in series_dir.glob("*.dcm") if p != junk)
    misplaced = series_dir / "1.2.3.4.6.dcm"  # a real instance under another SOP Instance UID's name
    misplaced.write_bytes(a_file.read_bytes())
    for ignored in ("tmp/x.dcm", "conflicts/1.2.3/abc.dcm", "outputs/job-1/attempt-1/rt.dcm"):
        (store.root / ignored).parent.mkdir(parents=True, exist_ok=True)
        (store.root / ignored).write_bytes(a_file.read_bytes())

    dry = reindex(db, store, stored_instance_meta, dry_run=True)
    assert (dry.added, len(dry.unreadable), dry.store_id) == (30, 2, None)
    assert junk.exists() and stored_instance_paths(db) == set()

    report = reindex(db, store, stored_instance_meta)
    assert report.added == 30 and report.files == 32
    reasons = dict(report.unreadable)
    assert set(reasons) == {junk.relative_to(store.root).as_posix(), misplaced.relative_to(store.root).as_posix()}
    assert "its UIDs place it at instances/" in reasons[misplaced.relative_to(store.root).as_posix()]
    for moved in (junk, misplaced):
        aside = store.root / "unindexed" / moved.relative_to(store.root)
        assert not moved.exists() and aside.exists()
    assert (aside.read_bytes(), junk.name) == (a_file.read_bytes(), "1.2.3.4.5.dcm")
    assert len(stored_instance_paths(db)) == 30  # tmp/, conflicts/, outputs/ are not instances
    db.dispose()


def test_a_database_of_another_data_directory_is_refused(lost_database, tmp_path) -> None:
    other = Database(f"sqlite:///{tmp_path}/other.db")
    check_and_bind(other, InstanceStore(tmp_path / "other-data"))
    with pytest.raises(StoreMismatchError, match="belongs to another data directory"):
        reindex(other, lost_database, stored_instance_meta)
    assert stored_instance_paths(other) == set()
    other.dispose()


def test_reindex_by_default_marks_the_series_evaluated_so_nothing_is_delivered_again(
    lost_database, job_store_url, small_axial_series
) -> None:
    """After losing the database, months of old studies must not go through the model and to the TPS again."""
    store = lost_database
    db = Database(job_store_url)
    files = instance_files(store)

    report = reindex(db, store, stored_instance_meta)

    assert (report.added, len(report.series), report.routed) == (30, 2, False)
    assert stored_instance_paths(db) == set(files)
    with db.session() as session:
        assert session.scalars(select(Job)).all() == []  # no job opened
        for series in session.scalars(select(Series)):
            assert series.evaluated_at is not None and series.evaluated_at >= series.last_received_at
        assert sorted(s.instance_count for s in session.scalars(select(Series))) == [10, 20]
    assert series_awaiting_routing(db, 0) == []
    assert check_and_bind(db, store) == report.store_id

    # An instance received from now on makes its series a new delivery (and a re-send is a duplicate).
    assert receive_one(db, store, small_axial_series.files[0]) is StoreOutcome.DUPLICATE
    assert series_awaiting_routing(db, 0) == []
    ds = pydicom.dcmread(small_axial_series.files[0])
    ds.SOPInstanceUID = ds.SOPInstanceUID + ".1"
    ds.save_as(store.root / "new.dcm")
    assert receive_one(db, store, store.root / "new.dcm") is StoreOutcome.STORED
    assert len(series_awaiting_routing(db, 0)) == 1
    with db.session() as session:
        assert [job.state for job in session.scalars(select(Job))] == [JobState.RECEIVED]
    db.dispose()


def receive_one(db: Database, store: InstanceStore, path: Path) -> StoreOutcome:
    return store_instance(db, store, stored_instance_meta(path), path.read_bytes())


def test_after_restoring_an_older_backup_rows_of_purged_files_are_marked_purged(tmp_path, small_axial_series) -> None:
    """The reviewer's case: the backup predates a retention purge; reindex marks those rows purged, and a
    later re-send (the re-planning case) stores the instance again instead of answering a duplicate."""
    store = InstanceStore(tmp_path / "data")
    db = Database(f"sqlite:///{tmp_path}/db.sqlite")
    check_and_bind(db, store)
    first = small_axial_series.files[0]
    receive(db, store, [first])
    db.dispose()
    shutil.copy(tmp_path / "db.sqlite", tmp_path / "backup.sqlite")  # the nightly backup
    db = Database(f"sqlite:///{tmp_path}/db.sqlite")
    with db.session() as session:  # retention, after the backup: file deleted, row marked purged
        row = session.scalars(select(Instance)).one()
        store.absolute(row.path).unlink()
        row.purged_at, path = utcnow(), row.path
    db.dispose()
    shutil.copy(tmp_path / "backup.sqlite", tmp_path / "db.sqlite")  # the database lost, the backup restored
    db = Database(f"sqlite:///{tmp_path}/db.sqlite")

    report = reindex(db, store, stored_instance_meta)

    assert (report.files, report.added, report.missing) == (0, 0, [path])
    with db.session() as session:
        assert session.scalars(select(Instance)).one().purged_at is not None
    assert check_and_bind(db, store) == report.store_id
    assert reindex(db, store, stored_instance_meta).missing == []  # reported once
    assert receive_one(db, store, first) is StoreOutcome.STORED
    assert store.absolute(path).read_bytes() == first.read_bytes()
    with db.session() as session:
        assert session.scalars(select(Instance)).one().purged_at is None
    db.dispose()


def test_an_instance_file_cut_short_is_not_indexed_and_is_reported(lost_database, job_store_url) -> None:
    """A file a power cut left short (its Pixel Data cut) reads without an error, but gets no row: it is
    moved aside with the reason, like an unreadable one (the CLI exits 1 for it)."""
    store = lost_database
    db = Database(job_store_url)
    short = sorted(instance_files(store).values())[3]
    whole = short.read_bytes()
    short.write_bytes(whole[: len(whole) - 1000])
    pydicom.dcmread(short)  # pydicom takes it as it is

    report = reindex(db, store, stored_instance_meta)

    relative = short.relative_to(store.root).as_posix()
    assert (report.files, report.added) == (30, 29)
    assert [path for path, _ in report.unreadable] == [relative]
    assert "incomplete file" in report.unreadable[0][1] and "(7FE0,0010) PixelData" in report.unreadable[0][1]
    assert relative not in stored_instance_paths(db)
    aside = store.root / "unindexed" / relative
    assert not short.exists() and aside.read_bytes() == whole[: len(whole) - 1000]
    db.dispose()


@pytest.mark.parametrize("sequence_state", ["fresh", "behind"])
def test_the_job_id_sequence_is_moved_past_jobs_restored_under_their_own_ids(
    job_store_url, sequence_state, tmp_path
) -> None:
    """Reindex recreates jobs under their ids; PostgreSQL's sequence does not see them. A re-run
    after an interrupted reindex restores none, yet must still move the sequence past them, or
    every new job (and every first C-STORE of a new series) collides with a restored id."""
    DONE = JobState.DONE
    db = Database(job_store_url)
    with db.session() as session:
        study = Study(study_uid="1.2.826.0.1.77")
        series = Series(series_uid="1.2.826.0.1.77.1", study=study)
        session.add_all([study, series])
        session.flush()
        if sequence_state == "behind":  # a job made normally, then one restored with a higher id
            session.add(Job(series_id=series.id, study_uid=study.study_uid, series_uid=series.series_uid, state=DONE))
        session.add(Job(id=7, series_id=series.id, study_uid=study.study_uid, series_uid=series.series_uid, state=DONE))
    store = InstanceStore(tmp_path / "data")
    check_and_bind(db, store)
    reindex(db, store, stored_instance_meta)  # the re-run after one interrupted once it had restored job 7
    reindex(db, store, stored_instance_meta)  # and again: never moves the sequence backwards
    with db.session() as session:
        series_id = session.scalars(select(Series.id)).one()
        new = Job(series_id=series_id, study_uid="1.2.826.0.1.77", series_uid="1.2.826.0.1.77.1", state=DONE)
        session.add(new)
        session.flush()
        assert new.id == 8
    db.dispose()


def test_a_file_whose_series_uid_another_study_holds_is_moved_aside(lost_database, tmp_path) -> None:
    """On disk from before the receive refused it (`IdentityConflict`): an instance reusing a stored
    SeriesInstanceUID in another study. Reindex keeps the first series whole and reports the other,
    instead of merging it into another patient's series or stopping half way."""
    store = lost_database
    series_dir = next((store.root / "instances").glob("*/*"))
    a_file = next(series_dir.glob("*.dcm"))
    ds = pydicom.dcmread(a_file)
    ds.StudyInstanceUID, ds.SOPInstanceUID, ds.PatientID = "1.2.826.0.1.99", "1.2.826.0.1.99.1.1", "OTHER"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    intruder = store.root / store.instance_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    intruder.parent.mkdir(parents=True)
    ds.save_as(intruder, enforce_file_format=True)
    db = Database(f"sqlite:///{tmp_path}/new.db")
    report = reindex(db, store, stored_instance_meta)
    relative = intruder.relative_to(store.root).as_posix()
    assert report.added == 30 and dict(report.unreadable).keys() == {relative}
    assert "IdentityConflict: SeriesInstanceUID" in dict(report.unreadable)[relative]
    assert not intruder.exists() and (store.root / "unindexed" / relative).exists()
    with db.session() as session:
        assert sorted(session.scalars(select(Study.study_uid))) == sorted(
            {pydicom.dcmread(p).StudyInstanceUID for p in (store.root / "instances").rglob("*.dcm")}
        )
    db.dispose()
