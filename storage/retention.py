"""Retention: delete received images and outputs after a configured age, keep the history.

Decisions:
- A series' files are purged once its LATEST job is `done` (all outputs
  delivered) or `rejected` (never to be processed) and finished more than
  `retention_days` ago (a cancelled one too: nothing will be sent). An earlier
  failed attempt does not keep a series forever once a later job delivered; a
  latest job that is failed, held, queued, running or exporting keeps
  everything, and so does any job of the series that is still held or in flight, so nothing is deleted before
  it was exported or while a physicist still has to look at it.
- Purged with the series: its instances, every job's outputs
  (`InstanceStore.job_outputs`) and the conflicting re-sends kept under
  `conflicts/` for its instances.
- Rows are kept (`purged_at` set) and a job event records the purge, so
  `jobs show` still tells the whole story. With `pseudonymise` the patient's
  name is dropped and the patient ID replaced by a keyed hash (HMAC-SHA256
  with a per-installation key in `<data_dir>/pseudonym.key`): the same patient
  keeps the same pseudonym, and nobody without the key can recover the ID.
- One series per transaction: the SQLite write lock is held for one series at
  a time, so C-STOREs arriving during a long purge run are not refused.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import shutil
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from storage.database import Database
from storage.instance_store import InstanceStore
from storage.jobs import event_row
from storage.models import TERMINAL_STATES, EventKind, Instance, Job, JobState, Series, Study, utcnow

PURGEABLE = (JobState.DONE, JobState.REJECTED, JobState.CANCELLED)
PSEUDONYM_PREFIX = "PSEUDO-"


def purge_expired(
    db: Database,
    store: InstanceStore,
    retention_days: float,
    now: datetime | None = None,
    *,
    pseudonymise: bool = False,
) -> int:
    """Purge every expired series; returns the number of instance files removed."""
    now = now or utcnow()
    cutoff = now - timedelta(days=retention_days)
    with db.session() as session:
        candidates = session.scalars(
            select(Series.id).join(Job, Job.series_id == Series.id).where(Job.purged_at.is_(None)).distinct()
        ).all()
    key = _pseudonym_key(store.root) if pseudonymise else None
    removed = 0
    for series_id in candidates:
        with db.session() as session:
            removed += _purge_series(session, store, series_id, cutoff, now, retention_days, key)
    return removed


def _purge_series(
    session: Session,
    store: InstanceStore,
    series_id: int,
    cutoff: datetime,
    now: datetime,
    retention_days: float,
    key: bytes | None,
) -> int:
    jobs = session.scalars(select(Job).where(Job.series_id == series_id).order_by(Job.id)).all()
    latest = jobs[-1]
    if latest.state not in PURGEABLE or latest.finished_at is None or latest.finished_at > cutoff:
        return 0
    if any(job.state not in TERMINAL_STATES for job in jobs):  # e.g. an earlier result still held for review
        return 0
    instances = session.scalars(
        select(Instance).where(Instance.series_id == series_id, Instance.purged_at.is_(None))
    ).all()
    for instance in instances:
        store.remove(instance.path)
        shutil.rmtree(store.conflicts(instance.sop_instance_uid), ignore_errors=True)
        instance.purged_at = now
    for job in jobs:
        if job.purged_at is not None:
            continue
        shutil.rmtree(store.job_outputs(job.id), ignore_errors=True)
        job.purged_at = now
        message = (
            f"retention: {len(instances)} image file(s) and outputs purged "
            f"(older than {retention_days:g} days); history kept"
        )
        if key is not None:
            job.patient_id = pseudonym(job.patient_id, key)
            message += "; patient identifiers pseudonymised"
        event_row(session, job, EventKind.LOG, message)
    if key is not None:
        study = session.get(Study, session.get(Series, series_id).study_id)  # type: ignore[union-attr]
        if study is not None:
            study.patient_id, study.patient_name = pseudonym(study.patient_id, key), None
    return len(instances)


def pseudonym(patient_id: str | None, key: bytes) -> str | None:
    """A stable keyed pseudonym for `patient_id` (idempotent: a pseudonym stays itself)."""
    if patient_id is None or patient_id.startswith(PSEUDONYM_PREFIX):
        return patient_id
    digest = hmac.new(key, patient_id.encode(), hashlib.sha256).hexdigest()[:24]
    return PSEUDONYM_PREFIX + digest


def _pseudonym_key(root: Path) -> bytes:
    path = root / "pseudonym.key"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32))
    return bytes.fromhex(path.read_text().strip())
