"""A series belongs to one study and a study to one patient (`storage.ingest` module doc, identity).

The outside tester's fault: a sender re-used the SeriesInstanceUID of a series
stored (and delivered) for patient A in a new study of patient B. The node
answered Success and counted B's instances into A's series, so A's job, retried,
failed on "mixed PatientID". Such an instance is refused now, on the fast path
(series still receiving) and on the job path (series evaluated), and nothing of
A's series changes. Real rows and files, on SQLite and PostgreSQL.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import MRImageStorage
from sqlalchemy import func, select

from dicom_node import status_codes
from dicom_node.settings import NodeSettings
from dicom_node.store_scp import StoreSCP
from storage.database import Database
from storage.ingest import IdentityConflict, InstanceMeta, StoreOutcome, group_commit, store_instance
from storage.instance_store import InstanceStore
from storage.jobs import RoutingOutcome, complete_series
from storage.models import Instance, Job, JobState, Series, Study

MR = "1.2.840.10008.5.1.4.1.1.4"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
STUDY_A, STUDY_B = "1.2.826.0.1.7.1", "1.2.826.0.1.7.2"
SERIES_A = "1.2.826.0.1.7.1.1"
INSTANCES_A = 3


def meta(k: int, study: str = STUDY_A, series: str = SERIES_A, patient: str | None = "PAT-A") -> InstanceMeta:
    return InstanceMeta(
        f"{series}.{k}" if study == STUDY_A else f"{study}.9.{k}", MR, study, series, EXPLICIT_LE, patient_id=patient
    )


def snapshot(db: Database, store: InstanceStore) -> dict[str, object]:
    """Everything of the job store and the instance store a refused instance must leave as it was."""
    with db.session() as session:
        series = [
            (s.series_uid, s.study.study_uid, s.instance_count, s.evaluated_at) for s in session.scalars(select(Series))
        ]
        studies = [(s.study_uid, s.patient_id) for s in session.scalars(select(Study))]
        instances = sorted((i.sop_instance_uid, i.series_id, i.path) for i in session.scalars(select(Instance)))
        jobs = sorted((j.id, j.series_id, j.state, j.study_uid, j.patient_id) for j in session.scalars(select(Job)))
    files = sorted(p.relative_to(store.root).as_posix() for p in (store.root / "instances").rglob("*.dcm"))
    return {"series": series, "studies": studies, "instances": instances, "jobs": jobs, "files": files}


@pytest.fixture
def stored_a(job_store_url: str, tmp_path: Path):
    """Patient A's series of three instances, still receiving (one `received` job)."""
    db = Database(job_store_url)
    store = InstanceStore(tmp_path / "data")
    for k in range(INSTANCES_A):
        assert store_instance(db, store, meta(k), b"A %d" % k) is StoreOutcome.STORED
    yield db, store
    db.dispose()


def evaluate(db: Database) -> None:
    """The watcher's evaluation of A's series (routed nowhere): the next instance takes the job path."""
    with db.session() as session:
        series_id = session.scalars(select(Series.id).where(Series.series_uid == SERIES_A)).one()
    complete_series(db, series_id, RoutingOutcome(None, None, [], "no rule matched"))


def assert_refused(db: Database, store: InstanceStore, instance: InstanceMeta, words: str) -> str:
    """Refused with `words` in the reason (returned), and nothing of it kept: no row, no file, no change."""
    before = snapshot(db, store)
    with pytest.raises(IdentityConflict, match=words) as refused:
        store_instance(db, store, instance, b"B's instance")
    assert snapshot(db, store) == before
    relative = store.instance_path(instance.study_uid, instance.series_uid, instance.sop_instance_uid)
    assert not store.absolute(relative).exists()
    return str(refused.value)


def test_reused_series_uid_in_another_study_is_refused_on_the_fast_path(stored_a):
    """A's series still receiving: B's instance must not be counted into it by the grouped UPDATE."""
    db, store = stored_a
    transactions = group_commit(db).transactions
    assert_refused(db, store, meta(1, STUDY_B, SERIES_A, "PAT-B"), f"stored in StudyInstanceUID {STUDY_A}")
    assert_refused(db, store, meta(2, STUDY_B, SERIES_A, "PAT-A"), f"names StudyInstanceUID {STUDY_B}")
    assert group_commit(db).transactions == transactions + 2  # the fast path ran, and matched no row
    with db.session() as session:
        assert session.scalar(select(Series.instance_count)) == INSTANCES_A
        assert [j.state for j in session.scalars(select(Job))] == [JobState.RECEIVED]
    # A's series keeps receiving on the fast path.
    assert store_instance(db, store, meta(INSTANCES_A), b"A, one more") is StoreOutcome.STORED
    with db.session() as session:
        assert session.scalar(select(Series.instance_count)) == INSTANCES_A + 1


def test_reused_series_uid_in_another_study_is_refused_on_the_job_path(stored_a):
    """A's series evaluated (delivered): B's first instance would open a new delivery of A's series."""
    db, store = stored_a
    evaluate(db)
    assert_refused(db, store, meta(1, STUDY_B, SERIES_A, "PAT-B"), f"StudyInstanceUID {STUDY_A}")
    with db.session() as session:
        series = session.scalars(select(Series)).one()
        assert series.instance_count == INSTANCES_A
        assert series.evaluated_at >= series.last_received_at  # no new delivery opened
        assert session.scalar(select(func.count()).select_from(Job)) == 1
        assert session.scalar(select(func.count()).select_from(Study)) == 1
        assert {i.path for i in session.scalars(select(Instance))} == {
            p.relative_to(store.root).as_posix() for p in (store.root / "instances").rglob("*.dcm")
        }


@pytest.mark.parametrize("evaluated", [False, True], ids=["receiving", "evaluated"])
def test_same_study_with_another_patient_id_is_refused(stored_a, evaluated: bool):
    """Into A's series (either path) or as a new series of A's study: another PatientID is refused; PatientIDs
    are not in the reason (PHI). (A patient reconciliation is refused too: a known cost, module doc.)"""
    db, store = stored_a
    if evaluated:
        evaluate(db)
    for instance in (
        meta(11, patient="PAT-B"),  # A's series
        meta(12, patient=None),  # no PatientID is not A's
        meta(13, series=f"{SERIES_A}.2", patient="PAT-B"),  # a new series of A's study
    ):
        assert "PAT-" not in assert_refused(db, store, instance, "PatientID differs")


def test_a_purged_instance_re_sent_in_another_series_is_refused(stored_a):
    """Retention purged A's file: a re-send of its SOP Instance UID naming another study and series is a
    re-used UID too, not A's file coming back (review: it was stored under B's path, A's row kept)."""
    db, store = stored_a
    with db.session() as session:
        session.execute(
            Instance.__table__.update().where(Instance.sop_instance_uid == f"{SERIES_A}.0").values(purged_at=func.now())
        )
    other = InstanceMeta(f"{SERIES_A}.0", MR, STUDY_B, f"{STUDY_B}.1", EXPLICIT_LE, patient_id="PAT-B")
    assert "another study" in assert_refused(db, store, other, "is already stored in another")


def test_a_study_without_patient_id_takes_no_patient_id_and_an_empty_one(job_store_url: str, tmp_path: Path):
    """None and "" are the same PatientID (as the SCP reads it), on both paths."""
    db = Database(job_store_url)
    store = InstanceStore(tmp_path / "data")
    assert store_instance(db, store, meta(0, patient=None), b"0") is StoreOutcome.STORED
    assert store_instance(db, store, meta(1, patient=""), b"1") is StoreOutcome.STORED
    assert store_instance(db, store, meta(2, patient=None), b"2") is StoreOutcome.STORED
    with pytest.raises(IdentityConflict, match="PatientID differs"):
        store_instance(db, store, meta(3, patient="PAT-A"), b"3")
    with db.session() as session:
        assert session.scalar(select(Series.instance_count)) == 3
    db.dispose()


def test_second_series_of_the_same_study_and_patient_is_stored(stored_a):
    db, store = stored_a
    evaluate(db)
    second = f"{SERIES_A}.2"
    for k in range(2):
        assert store_instance(db, store, meta(20 + k, series=second), b"second %d" % k) is StoreOutcome.STORED
    assert store_instance(db, store, meta(INSTANCES_A), b"A, a new delivery") is StoreOutcome.STORED
    with db.session() as session:
        counts = dict(session.execute(select(Series.series_uid, Series.instance_count)).all())
        assert counts == {SERIES_A: INSTANCES_A + 1, second: 2}
        assert session.scalar(select(func.count()).select_from(Study)) == 1
        states = sorted(j.state.value for j in session.scalars(select(Job)))
    assert states.count("received") == 2  # the second series' job and A's new delivery's


def mr_file(path: Path, study: str, series: str, sop: str, patient: str) -> Path:
    """A tiny MR Image Storage instance (8x8), enough for the SCP's header read."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.PatientID, ds.PatientName, ds.Modality = patient, "TEST^IDENTITY", "MR"
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = bytes(128)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = MRImageStorage, sop
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


def test_the_scp_answers_cannot_understand_for_a_reused_series_uid(tmp_path: Path) -> None:
    """Over a real association: A's instance Success, B's with A's SeriesInstanceUID 0xC000, nothing kept."""
    scp = StoreSCP(NodeSettings(port=0), Database(f"sqlite:///{tmp_path}/jobs.db"), InstanceStore(tmp_path / "data"))
    _, port = scp.start()
    try:
        ae = AE(ae_title="PYNETDICOM")
        ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
        assert assoc.is_established
        responses = [
            assoc.send_c_store(pydicom.dcmread(mr_file(tmp_path / f"{k}.dcm", study, SERIES_A, sop, patient)))
            for k, (study, sop, patient) in enumerate(
                [(STUDY_A, f"{SERIES_A}.1", "PAT-A"), (STUDY_B, f"{STUDY_B}.9.1", "PAT-B")]
            )
        ]
        assoc.release()
        assert [int(rsp.Status) for rsp in responses] == [status_codes.SUCCESS, status_codes.CANNOT_UNDERSTAND]
        # The sender's operator is told why, without the UIDs (those are in the node's log).
        assert "ErrorComment" not in responses[0]
        assert responses[1].ErrorComment == "SeriesInstanceUID already stored in another study"
        with scp.db.session() as session:
            assert session.scalars(select(Instance.sop_instance_uid)).all() == [f"{SERIES_A}.1"]
            assert session.scalar(select(Series.instance_count)) == 1
        assert len(list((scp.store.root / "instances").rglob("*.dcm"))) == 1
    finally:
        scp.stop()
        scp.db.dispose()
