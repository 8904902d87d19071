"""SQLAlchemy 2 ORM models: the job store.

One table per concept the node tracks: studies, series, instances, jobs, the
events of a job (state changes, stage timings, log lines, errors: the
physicist's view is built from these) and exports (one row per output object
per destination). The schema is portable: SQLite by default, PostgreSQL for
several hosts; times are stored as timezone-aware UTC.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

UID = String(64)


def utcnow() -> datetime:
    """Current time, timezone-aware UTC (the only clock the store uses)."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator):
    """DateTime that always comes back timezone-aware UTC (SQLite drops tzinfo)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given to the job store; use storage.models.utcnow()")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class JobState(str, enum.Enum):
    """Job life cycle (DESIGN.md): received -> queued -> running -> exporting -> done.

    `held`: the plausibility gate stopped the result; its outputs are written but
    nothing is sent until a physicist releases (-> exporting) or cancels it.
    `cancelled`: ended by a person (from held, queued or failed).
    """

    RECEIVED = "received"
    QUEUED = "queued"
    RUNNING = "running"
    EXPORTING = "exporting"
    DONE = "done"
    FAILED = "failed"
    REJECTED = "rejected"
    HELD = "held"
    CANCELLED = "cancelled"


#: The job is finished: `finished_at` is set, nothing more happens to it.
TERMINAL_STATES = frozenset({JobState.DONE, JobState.FAILED, JobState.REJECTED, JobState.CANCELLED})
#: Nothing more happens without a person: the finished states plus `held`, which
#: waits for a physicist's release or cancel (not terminal: it is not finished).
SETTLED_STATES = TERMINAL_STATES | {JobState.HELD}


class ExportState(str, enum.Enum):
    """One object to one destination: pending -> done, or (Storage Commitment) -> committing -> committed."""

    PENDING = "pending"
    DONE = "done"  # stored (C-STORE success); final unless the destination commits
    COMMITTING = "committing"  # stored, Storage Commitment requested, awaiting its N-EVENT-REPORT
    COMMITTED = "committed"  # the destination reported it has taken responsibility for the instance
    FAILED = "failed"


# Export states that still hold a job in `exporting`.
UNSETTLED_EXPORT_STATES = frozenset({ExportState.PENDING, ExportState.COMMITTING})
# Export states of an object the destination holds.
DELIVERED_EXPORT_STATES = frozenset({ExportState.DONE, ExportState.COMMITTED})


class EventKind(str, enum.Enum):
    STATE = "state"  # a job state transition
    STAGE = "stage"  # a pipeline stage finished, with its duration
    LOG = "log"  # an informational line
    EXPORT = "export"  # one export attempt
    ERROR = "error"  # a failure, with its reason and trace
    CONFLICT = "conflict"  # an instance re-sent with other content: what changed, the policy applied


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime}


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_uid: Mapped[str] = mapped_column(UID, unique=True)
    patient_id: Mapped[str | None] = mapped_column(String(64))
    patient_name: Mapped[str | None] = mapped_column(String(324))
    study_date: Mapped[str | None] = mapped_column(String(8))
    accession_number: Mapped[str | None] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(primary_key=True)
    series_uid: Mapped[str] = mapped_column(UID, unique=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"))
    modality: Mapped[str | None] = mapped_column(String(16))
    series_description: Mapped[str | None] = mapped_column(String(64))
    instance_count: Mapped[int] = mapped_column(default=0)
    first_received_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Time the last *new* instance arrived; re-sent duplicates do not move it.
    last_received_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Time the series was last evaluated against the routing rules (None = never).
    evaluated_at: Mapped[datetime | None] = mapped_column(default=None)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")

    __table_args__ = (Index("ix_series_pending", "evaluated_at", "last_received_at"),)


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    path: Mapped[str] = mapped_column(String(400))  # relative to the data directory
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(Integer)
    calling_ae_title: Mapped[str | None] = mapped_column(String(16))
    source_address: Mapped[str | None] = mapped_column(String(45), default=None)  # IPv4/IPv6 of the sender
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    purged_at: Mapped[datetime | None] = mapped_column(default=None)

    series: Mapped[Series] = relationship(back_populates="instances")


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    study_uid: Mapped[str] = mapped_column(UID, index=True)
    series_uid: Mapped[str] = mapped_column(UID, index=True)
    patient_id: Mapped[str | None] = mapped_column(String(64), index=True)
    state: Mapped[JobState] = mapped_column(Enum(JobState, native_enum=False, length=16), index=True)
    rule_name: Mapped[str | None] = mapped_column(String(64))
    model: Mapped[str | None] = mapped_column(String(400))
    destinations: Mapped[list[str]] = mapped_column(JSON, default=list)
    reason: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(default=0)
    # The worker that runs (or last ran) the job: `host:pid:nonce:worker-N` (dicom_node.worker_identity).
    claimed_by: Mapped[str | None] = mapped_column(String(128))
    # Until when that worker's heartbeat vouches for a `running` job; past it the holder counts as dead.
    lease_expires_at: Mapped[datetime | None] = mapped_column(default=None, index=True)
    instance_count: Mapped[int] = mapped_column(default=0)
    output_dir: Mapped[str | None] = mapped_column(String(400))
    summary: Mapped[dict | None] = mapped_column(JSON, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    purged_at: Mapped[datetime | None] = mapped_column(default=None)

    series: Mapped[Series] = relationship()
    events: Mapped[list[JobEvent]] = relationship(
        back_populates="job", order_by="JobEvent.id", cascade="all, delete-orphan"
    )
    exports: Mapped[list[Export]] = relationship(
        back_populates="job", order_by="Export.id", cascade="all, delete-orphan"
    )

    # At most one `received` job per series (the open delivery): two first instances of a new
    # delivery over parallel associations both look for it and may both insert one; the second
    # insert fails here and its retry joins the first (`storage.ingest._commit_row_opening_job`).
    # The enum is stored by name. Migration 0005 adds it.
    __table_args__ = (
        Index(
            "uq_jobs_received_series",
            "series_id",
            unique=True,
            sqlite_where=text("state = 'RECEIVED'"),
            postgresql_where=text("state = 'RECEIVED'"),
        ),
    )


class JobEvent(Base):
    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    kind: Mapped[EventKind] = mapped_column(Enum(EventKind, native_enum=False, length=16))
    state: Mapped[JobState | None] = mapped_column(Enum(JobState, native_enum=False, length=16), default=None)
    message: Mapped[str] = mapped_column(Text, default="")
    duration_s: Mapped[float | None] = mapped_column(Float, default=None)
    details: Mapped[str | None] = mapped_column(Text, default=None)  # e.g. a stack trace

    job: Mapped[Job] = relationship(back_populates="events")


class Association(Base):
    """One incoming DICOM association: who, from where, when, how many instances, how it ended.

    `outcome` is `open` while it lasts, then `released`, `aborted`, `closed`
    (connection dropped without release or abort), `rejected`, or
    `interrupted` (the node stopped without closing it; set at its next start).
    `node` is the receiving host, so a restart only settles its own rows.
    """

    __tablename__ = "associations"

    id: Mapped[int] = mapped_column(primary_key=True)
    node: Mapped[str | None] = mapped_column(String(128), default=None)
    calling_ae_title: Mapped[str | None] = mapped_column(String(16), index=True)
    called_ae_title: Mapped[str | None] = mapped_column(String(16))
    address: Mapped[str | None] = mapped_column(String(45))
    port: Mapped[int | None] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    ended_at: Mapped[datetime | None] = mapped_column(default=None)
    outcome: Mapped[str] = mapped_column(String(16), default="open")
    instances_stored: Mapped[int] = mapped_column(default=0)
    instances_duplicate: Mapped[int] = mapped_column(default=0)
    instances_conflict: Mapped[int] = mapped_column(default=0)
    instances_refused: Mapped[int] = mapped_column(default=0)
    bytes_received: Mapped[int] = mapped_column(BigInteger, default=0)  # one association can exceed 2 GiB
    reason: Mapped[str | None] = mapped_column(Text, default=None)


class Heartbeat(Base):
    """Last successful write probe per host: `/readyz` proves the job store accepts writes."""

    __tablename__ = "heartbeats"

    host: Mapped[str] = mapped_column(String(128), primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)


# Display names of the output classes the node sends (storage needs no pydicom for this).
OUTPUT_CLASS_NAMES = {
    "1.2.840.10008.5.1.4.1.1.481.3": "RTSTRUCT",
    "1.2.840.10008.5.1.4.1.1.88.22": "SR",
    "1.2.840.10008.5.1.4.1.1.88.33": "SR",
    "1.2.840.10008.5.1.4.1.1.88.34": "SR",
    "1.2.840.10008.5.1.4.1.1.66.4": "SEG",
}


class Export(Base):
    """One output object to one destination; retried until delivered or given up."""

    __tablename__ = "exports"

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(UID)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    path: Mapped[str] = mapped_column(String(400))  # relative to the data directory
    state: Mapped[ExportState] = mapped_column(
        Enum(ExportState, native_enum=False, length=16), default=ExportState.PENDING, index=True
    )
    attempts: Mapped[int] = mapped_column(default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_error: Mapped[str | None] = mapped_column(Text, default=None)
    done_at: Mapped[datetime | None] = mapped_column(default=None)
    # Storage Commitment: the N-ACTION's Transaction UID, kept so a report after a restart still finds the row.
    transaction_uid: Mapped[str | None] = mapped_column(UID, default=None, index=True)
    commit_requested_at: Mapped[datetime | None] = mapped_column(default=None)
    # The job's attempt whose output this is: a retry's rows never settle (or re-send) another attempt's.
    attempt: Mapped[int] = mapped_column(default=1, server_default="1")

    job: Mapped[Job] = relationship(back_populates="exports")

    def sop_class_name(self) -> str:
        return OUTPUT_CLASS_NAMES.get(self.sop_class_uid, self.sop_class_uid)

    __table_args__ = (UniqueConstraint("job_id", "destination", "sop_instance_uid"),)


class Output(Base):
    """One DICOM object an attempt of a job wrote (RTSTRUCT, SR, SEG), delivered or not.

    The history re-runs supersede (`storage.outputs`): the latest row of an output
    series is the result a re-run of the same source series and model replaces,
    and `jobs export --attempt N` sends attempt N's rows.
    """

    __tablename__ = "outputs"

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16))
    study_uid: Mapped[str] = mapped_column(UID)
    series_uid: Mapped[str] = mapped_column(UID, index=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    path: Mapped[str] = mapped_column(String(400))  # relative to the data directory
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class NodeMeta(Base):
    """Facts about the installation the job store belongs to (e.g. which data directory: `store_id`)."""

    __tablename__ = "node_meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(400))
