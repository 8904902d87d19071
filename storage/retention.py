"""Retention: delete received images and outputs after a configured age, keep the history.

Decision: a series' files are purged only when every job of the series is
`done` (all outputs delivered) or `rejected` (never to be processed) and the
newest of them finished more than `retention_days` ago. Anything `failed`,
queued, running or still exporting is kept, so nothing is ever deleted before
it was exported. Rows are kept (`purged_at` set) and a job event records the
purge, so `jobs show` still tells the whole story.
"""

from __future__ import annotations

import shutil
from datetime import datetime, timedelta

from sqlalchemy import select

from storage.database import Database
from storage.instance_store import InstanceStore
from storage.jobs import event_row
from storage.models import EventKind, Instance, Job, JobState, Series, utcnow

PURGEABLE = (JobState.DONE, JobState.REJECTED)


def purge_expired(db: Database, store: InstanceStore, retention_days: float, now: datetime | None = None) -> int:
    """Purge every expired series; returns the number of instance files removed."""
    cutoff = (now or utcnow()) - timedelta(days=retention_days)
    removed = 0
    with db.session() as session:
        candidates = session.scalars(
            select(Series).join(Job, Job.series_id == Series.id).where(Job.purged_at.is_(None)).distinct()
        ).all()
        for series in candidates:
            jobs = session.scalars(select(Job).where(Job.series_id == series.id)).all()
            if any(j.state not in PURGEABLE or j.finished_at is None or j.finished_at > cutoff for j in jobs):
                continue
            instances = session.scalars(
                select(Instance).where(Instance.series_id == series.id, Instance.purged_at.is_(None))
            ).all()
            for instance in instances:
                store.remove(instance.path)
                instance.purged_at = now or utcnow()
                removed += 1
            for job in jobs:
                if job.purged_at is not None:
                    continue
                if job.output_dir:
                    shutil.rmtree(store.absolute(job.output_dir).parent, ignore_errors=True)
                job.purged_at = now or utcnow()
                event_row(
                    session,
                    job,
                    EventKind.LOG,
                    f"retention: {len(instances)} image file(s) and outputs purged "
                    f"(older than {retention_days:g} days); history kept",
                )
    return removed
