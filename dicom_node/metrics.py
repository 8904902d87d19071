"""Prometheus metrics of one node process (served at `/metrics`).

Two kinds, chosen by where the truth lives:

- Counted as it happens, in this process (reset on restart, as Prometheus
  expects of counters): C-STORE instances, bytes and handling latency,
  associations active and rejected, export attempts. The SCP and the exporter
  call `NodeMetrics`.
- Read from the job store at scrape time (`JobStoreCollector`): jobs by
  state, held jobs, stage durations (the `stage` events, so workers on other
  hosts are counted too), the oldest pending export, Storage Commitment
  outcomes per destination (a report may arrive on any association, or the
  exporter's timeout may end it: the export rows are the one record of all
  three), free disk. Nothing to
  keep in sync, and a restart loses nothing.

Labels never carry patient data: calling AE titles, destination names, stage
names, job states and outcomes only. Calling AE titles come from peers, so
when no allow-list bounds them at most `MAX_AE_LABELS` distinct titles get a
series of their own; the rest are counted as `other`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import case, func, select

from dicom_node.logging_setup import get_logger
from storage.database import Database
from storage.models import EventKind, Export, ExportState, Job, JobEvent, JobState, utcnow

log = get_logger(__name__)

MAX_AE_LABELS = 50
STAGE_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
CSTORE_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
# Stage event messages that are stage names; "model package <name> ready" is folded into one.
MODEL_PACKAGE_STAGE = "model package"
# Storage Commitment outcome label of each export state a requested commitment can be in.
COMMITMENT_OUTCOMES = {
    ExportState.COMMITTING: "awaiting",
    ExportState.COMMITTED: "committed",
    ExportState.FAILED: "failed",
}


class NodeMetrics:
    """The process's registry and the instruments the SCP and exporter update."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.instances = Counter(
            "dicom_node_instances_received",
            "C-STORE requests handled, by calling AE title and outcome (stored, duplicate, conflict, or the refusal).",
            ["calling_ae", "outcome"],
            registry=r,
        )
        self.bytes = Counter(
            "dicom_node_bytes_received",
            "Bytes of data sets received over C-STORE, by calling AE title and outcome.",
            ["calling_ae", "outcome"],
            registry=r,
        )
        self.cstore_seconds = Histogram(
            "dicom_node_cstore_handling_seconds",
            "Time from a C-STORE request's data set to its response (file fsync'd, row committed).",
            buckets=CSTORE_BUCKETS_S,
            registry=r,
        )
        self.associations_active = Gauge(
            "dicom_node_associations_active", "Incoming associations open now.", registry=r
        )
        self.associations = Counter(
            "dicom_node_associations",
            "Incoming associations ended, by calling AE title and outcome (released, aborted, closed).",
            ["calling_ae", "outcome"],
            registry=r,
        )
        self.associations_rejected = Counter(
            "dicom_node_associations_rejected",
            "Incoming associations refused: 'policy' (A-ASSOCIATE-RJ) or 'address' (source not allowed).",
            ["reason"],
            registry=r,
        )
        self.export_attempts = Counter(
            "dicom_node_export_attempts",
            "C-STORE SCU attempts to send an output, by destination and outcome (delivered, failed).",
            ["destination", "outcome"],
            registry=r,
        )
        self._ae_labels: set[str] = set()
        self._ae_lock = threading.Lock()

    def ae_label(self, calling_ae: str | None) -> str:
        """The label for a calling AE title, bounded in number (see module docstring)."""
        title = (calling_ae or "").strip() or "unknown"
        with self._ae_lock:
            if title in self._ae_labels:
                return title
            if len(self._ae_labels) < MAX_AE_LABELS:
                self._ae_labels.add(title)
                return title
        return "other"

    def observe_store(self, calling_ae: str | None, outcome: str, nbytes: int, seconds: float) -> None:
        label = self.ae_label(calling_ae)
        self.instances.labels(label, outcome).inc()
        self.bytes.labels(label, outcome).inc(nbytes)
        self.cstore_seconds.observe(seconds)

    def observe_export(self, destination: str, delivered: bool) -> None:
        self.export_attempts.labels(destination, "delivered" if delivered else "failed").inc()

    def add_collector(self, collector: Collector) -> None:
        self.registry.register(collector)


def stage_label(message: str) -> str:
    return MODEL_PACKAGE_STAGE if message.startswith(MODEL_PACKAGE_STAGE) else message


class JobStoreCollector(Collector):
    """Gauges and histograms computed from the job store at each scrape."""

    def __init__(
        self,
        db: Database,
        free_bytes: Callable[[], int],
        watermark_bytes: int,
        commitment_destinations: Sequence[str] = (),
    ) -> None:
        self.db = db
        self.free_bytes = free_bytes
        self.watermark_bytes = watermark_bytes
        self.commitment_destinations = tuple(commitment_destinations)  # reported from the start, at 0

    def describe(self) -> list:
        return []  # collected lazily: no DB query when the collector is registered

    def collect(self) -> Iterator:
        try:
            families = list(self._from_job_store())
        except Exception as exc:  # the job store is down: say so, and still report the disk
            log.error("metrics.job_store_unreadable", reason=str(exc))
            families = []
        yield GaugeMetricFamily(
            "dicom_node_job_store_up", "1 when the job store answered this scrape, else 0.", value=1 if families else 0
        )
        yield from families
        yield GaugeMetricFamily(
            "dicom_node_disk_free_bytes", "Free bytes on the data directory's file system.", value=self.free_bytes()
        )
        yield GaugeMetricFamily(
            "dicom_node_disk_watermark_bytes",
            "Below this many free bytes C-STORE is refused (node.min_free_disk_mb).",
            value=self.watermark_bytes,
        )

    def _from_job_store(self) -> Iterator:
        with self.db.session() as session:
            by_state = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
            jobs = GaugeMetricFamily("dicom_node_jobs", "Jobs in the job store, by state.", labels=["state"])
            for state in JobState:
                jobs.add_metric([state.value], by_state.get(state, 0))
            yield jobs
            yield GaugeMetricFamily(
                "dicom_node_jobs_held",
                "Jobs held by the plausibility gate, waiting for a physicist.",
                value=by_state.get(JobState.HELD, 0),
            )
            yield self._stage_histogram(session)
            pending = session.execute(
                select(Export.destination, func.count(), func.min(Export.created_at))
                .where(Export.state == ExportState.PENDING)
                .group_by(Export.destination)
            ).all()
            queue = GaugeMetricFamily(
                "dicom_node_exports_pending", "Exports waiting to be delivered, by destination.", labels=["destination"]
            )
            oldest = None
            for destination, count, first in pending:
                queue.add_metric([destination], count)
                oldest = first if oldest is None or first < oldest else oldest
            yield queue
            yield self._commitments(session)
            yield GaugeMetricFamily(
                "dicom_node_export_oldest_pending_age_seconds",
                "Age of the oldest pending export (0 when none): a stuck destination shows here first.",
                value=(utcnow() - oldest).total_seconds() if oldest is not None else 0.0,
            )

    def _commitments(self, session) -> GaugeMetricFamily:
        """Exports whose Storage Commitment was requested, by destination and outcome (awaiting,
        committed, failed: refused by the report or no report in time); every outcome of a
        configured destination is present, 0 when none."""
        rows = session.execute(
            select(Export.destination, Export.state, func.count())
            .where(Export.transaction_uid.is_not(None), Export.state.in_(list(COMMITMENT_OUTCOMES)))
            .group_by(Export.destination, Export.state)
        ).all()
        counts = {(destination, COMMITMENT_OUTCOMES[state]): count for destination, state, count in rows}
        family = GaugeMetricFamily(
            "dicom_node_storage_commitments",
            "Exports with Storage Commitment requested, by destination and outcome (awaiting, committed, failed).",
            labels=["destination", "outcome"],
        )
        destinations = sorted({d for d, _ in counts} | set(self.commitment_destinations))
        for destination in destinations:
            for outcome in COMMITMENT_OUTCOMES.values():
                family.add_metric([destination, outcome], counts.get((destination, outcome), 0))
        return family

    def _stage_histogram(self, session) -> HistogramMetricFamily:
        """Cumulative buckets counted in SQL over every stage event (one query)."""
        columns = [func.sum(case((JobEvent.duration_s <= bound, 1), else_=0)) for bound in STAGE_BUCKETS_S]
        rows = session.execute(
            select(JobEvent.message, func.count(), func.sum(JobEvent.duration_s), *columns)
            .where(JobEvent.kind == EventKind.STAGE, JobEvent.duration_s.is_not(None))
            .group_by(JobEvent.message)
        ).all()
        merged: dict[str, list[float]] = {}
        for message, count, total, *buckets in rows:
            values = [count, total or 0.0, *(b or 0 for b in buckets)]
            key = stage_label(message)
            merged[key] = [a + b for a, b in zip(merged.get(key, [0] * len(values)), values)]
        family = HistogramMetricFamily(
            "dicom_node_stage_duration_seconds", "Duration of each job stage (from the job events).", labels=["stage"]
        )
        for stage, (count, total, *buckets) in sorted(merged.items()):
            family.add_metric(
                [stage],
                [(str(bound), value) for bound, value in zip(STAGE_BUCKETS_S, buckets)] + [("+Inf", count)],
                total,
            )
        return family
