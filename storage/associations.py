"""Incoming associations as rows: the operations view's "who sent what, from where, how it ended".

One row is opened when an association is accepted and closed with its counts
when the connection ends; a rejected association is one closed row. Rows are
written from the SCP's association threads, one short transaction each, so a
slow page never holds up a C-STORE.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select

from storage.database import Database
from storage.models import Association, Heartbeat, utcnow


@dataclass
class AssociationCounts:
    """What one association delivered, kept in memory while it lasts."""

    stored: int = 0
    duplicate: int = 0
    conflict: int = 0
    refused: int = 0
    bytes_received: int = 0

    @property
    def instances(self) -> int:
        return self.stored + self.duplicate + self.conflict + self.refused


def open_association(
    db: Database, node: str, calling_ae: str | None, called_ae: str | None, address: str, port: int
) -> int:
    """A row for an association `node` accepted (outcome `open`); returns its id."""
    with db.session() as session:
        row = Association(node=node, calling_ae_title=calling_ae, called_ae_title=called_ae, address=address, port=port)
        session.add(row)
        session.flush()
        return row.id


def close_association(db: Database, association_id: int, outcome: str, counts: AssociationCounts) -> None:
    """End time, outcome and counts of a finished association."""
    with db.session() as session:
        row = session.get(Association, association_id)
        if row is None:
            return
        row.ended_at = utcnow()
        row.outcome = outcome
        row.instances_stored = counts.stored
        row.instances_duplicate = counts.duplicate
        row.instances_conflict = counts.conflict
        row.instances_refused = counts.refused
        row.bytes_received = counts.bytes_received


def settle_interrupted(db: Database, node: str) -> int:
    """On start-up: `node`'s rows still `open` (it stopped without closing them) become `interrupted`."""
    with db.session() as session:
        rows = session.scalars(select(Association).where(Association.node == node, Association.outcome == "open"))
        count = 0
        for row in rows:
            row.outcome, row.ended_at, count = "interrupted", utcnow(), count + 1
        return count


def record_rejected(
    db: Database, calling_ae: str | None, called_ae: str | None, address: str, port: int, reason: str
) -> None:
    """A refused association (A-ASSOCIATE-RJ or a source address outside the allow-list)."""
    now = utcnow()
    with db.session() as session:
        session.add(
            Association(
                calling_ae_title=calling_ae,
                called_ae_title=called_ae,
                address=address,
                port=port,
                started_at=now,
                ended_at=now,
                outcome="rejected",
                reason=reason,
            )
        )


def recent_associations(db: Database, limit: int = 200) -> list[Association]:
    """Newest first."""
    with db.session() as session:
        return list(session.scalars(select(Association).order_by(Association.id.desc()).limit(limit)))


def write_heartbeat(db: Database, host: str) -> None:
    """One committed write: raises if the job store cannot take writes (readiness probe)."""
    with db.session() as session:
        row = session.get(Heartbeat, host)
        if row is None:
            session.add(Heartbeat(host=host))
        else:
            row.at = utcnow()
