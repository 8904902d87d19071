"""The service: one process wiring the Store SCP, series watcher, workers and exporter.

Start-up order makes restarts safe: leftovers of interrupted writes are
removed (partial temp files, and complete files whose row was never committed,
hence never acknowledged), the jobs this process's dead previous incarnation
was running and `running` jobs whose lease has expired go back to `queued` (a
job whose worker still renews its lease, in this host's `dicom-node worker`
or on another host, is left alone), pending exports are picked
up by the exporter's first round; only then does the SCP accept
associations. The HTTP operations view (`[http]`) binds first of all, so a
port in use stops start-up before anything runs; until the SCP listens,
`/readyz` says so. Expired leases are looked for again every `lease_s / 3`.
Shutdown stops HTTP and the SCP first (no new instances),
then the scheduler and the workers.
"""

from __future__ import annotations

import signal
import threading
from dataclasses import dataclass, field

from apscheduler.schedulers.background import BackgroundScheduler

from dicom_node import systemd_notify
from dicom_node.export_targets import ExportTargets
from dicom_node.exporter import Exporter
from dicom_node.incarnation import Incarnation
from dicom_node.logging_setup import get_logger
from dicom_node.metrics import JobStoreCollector, NodeMetrics
from dicom_node.routing import compile_rules
from dicom_node.series_watcher import SeriesWatcher
from dicom_node.settings import Settings
from dicom_node.store_scp import StoreSCP
from dicom_node.worker import InferenceWorker, ModelRegistry, requeue_dead_holders, take_over_at_start, worker_ids
from storage.database import Database
from storage.instance_store import InstanceStore
from storage.jobs import stored_instance_paths
from storage.store_identity import check_and_bind

log = get_logger(__name__)


@dataclass
class NodeService:
    settings: Settings
    db: Database = field(init=False)
    store: InstanceStore = field(init=False)
    scp: StoreSCP = field(init=False)
    watcher: SeriesWatcher = field(init=False)
    exporter: Exporter = field(init=False)
    address: tuple[str, int] | None = None

    def __post_init__(self) -> None:
        s = self.settings
        self.store = InstanceStore(s.storage.data_dir)
        self.db = Database(s.storage.resolved_database_url)
        self.metrics = NodeMetrics()
        self.metrics.add_collector(
            JobStoreCollector(
                self.db,
                self.store.free_bytes,
                s.node.min_free_disk_mb * 2**20,
                [d.name for d in s.destinations if d.storage_commitment],
            )
        )
        self.scp = StoreSCP(s.node, self.db, self.store, self.metrics, conflict_policy=s.storage.conflict_policy)
        self.watcher = SeriesWatcher(
            self.db,
            self.store,
            compile_rules(s.rules),
            s.series.quiet_period_s,
            s.series.partial_quiet_period_s,
            self.scp.tracker.deliveries,
            idle_abort_s=s.node.network_timeout_s,
        )
        self.exporter = Exporter(self.db, self.store, s.destinations, s.export, s.node.ae_title, s.node.dimse_timeout_s)
        self.exporter.on_attempt = self.metrics.observe_export
        self.registry = ModelRegistry()
        self._stop = threading.Event()
        self._workers: list[InferenceWorker] = []
        self._incarnation: Incarnation | None = None
        self._scheduler = BackgroundScheduler(timezone="UTC")
        self.http = None
        if s.http.enabled:
            from dicom_node.http.server import HttpServer

            self.http = HttpServer(self)

    def start(self) -> tuple[str, int]:
        check_and_bind(self.db, self.store)  # before anything is deleted: never against the wrong database
        if self.http is not None:  # before the SCP and schedulers: a port in use stops start-up early
            self.http.start()
        s = self.settings
        removed = self.store.remove_partials()
        orphans = self.store.remove_unreferenced(stored_instance_paths(self.db))
        self.store.sync_all()
        self._incarnation, resumed = take_over_at_start(self.db, s.storage.data_dir, s.worker.max_attempts)
        log.info(
            "service.starting",
            data_dir=str(self.store.root),
            partials_removed=removed,
            unacknowledged_files_removed=orphans,
            jobs_resumed=resumed,
        )
        try:  # the DICOM port before any worker runs: a port in use must not kill (and count) a claimed job
            self.address = self.scp.start()
            self.watcher.listening_since = self.watcher.clock()  # a sender cut by the stop may resume from now
        except BaseException:
            self.stop()
            raise
        every = {"max_instances": 1, "coalesce": True}
        self._scheduler.add_job(
            self._guard(self.watcher.check_once),
            "interval",
            seconds=s.series.check_interval_s,
            id="series-watcher",
            **every,
        )
        self._scheduler.add_job(
            self._guard(self.exporter.dispatch),
            "interval",
            seconds=max(1.0, min(s.export.retry_initial_s, 5.0)),
            id="exporter",
            **every,
        )
        self._scheduler.add_job(
            self._guard(lambda: requeue_dead_holders(self.db, s.worker.max_attempts)),
            "interval",
            seconds=s.worker.lease_check_interval_s,
            id="expired-leases",
            **every,
        )
        if s.storage.retention_days is not None:
            from storage.retention import purge_expired

            self._scheduler.add_job(
                self._guard(
                    lambda: purge_expired(
                        self.db,
                        self.store,
                        s.storage.retention_days,
                        pseudonymise=s.storage.pseudonymise_after_retention,
                    )
                ),
                "interval",
                minutes=s.storage.retention_check_interval_min,
                id="retention",
                **every,
            )
        self._scheduler.start()
        for worker_id in worker_ids(s.worker.count):
            worker = InferenceWorker(
                worker_id,
                s.worker.device,
                self.db,
                self.store,
                s.worker,
                self.registry,
                self._stop,
                ExportTargets(s.destinations),
                s.rules,
                s.outputs,
            )
            worker.start()
            self._workers.append(worker)
        return self.address

    @property
    def workers(self) -> list[InferenceWorker]:
        return list(self._workers)

    @staticmethod
    def _guard(function):
        """A scheduled job that logs its errors instead of dying silently."""

        def run():
            try:
                function()
            except Exception:
                log.exception("scheduled_job.failed", job=getattr(function, "__name__", "job"))

        run.__name__ = getattr(function, "__name__", "job")
        return run

    def stop(self) -> None:
        if self._stop.is_set():
            return
        if self.http is not None:
            self.http.stop()
        self.scp.stop()
        self._stop.set()
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)
        self.exporter.stop(timeout_s=10)
        for worker in self._workers:
            worker.join(timeout=60)
        if self._incarnation is not None:
            self._incarnation.release()
        self.db.dispose()
        log.info("service.stopped")

    def serve_forever(self) -> None:
        """Run until SIGTERM/SIGINT (systemd stop, Ctrl-C)."""
        done = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: done.set())
        self.start()
        systemd_notify.notify("READY=1")
        interval = systemd_notify.watchdog_interval_s()
        if interval is not None:
            self._scheduler.add_job(self._guard(self._pet_watchdog), "interval", seconds=interval, id="watchdog")
        done.wait()
        systemd_notify.notify("STOPPING=1")
        self.stop()

    def _pet_watchdog(self) -> None:
        """WATCHDOG=1 only while ready: a node that cannot do its job gets restarted by systemd."""
        from dicom_node.http.health import readiness

        failed = [c for c in readiness(self) if not c.ok and c.name != "disk"]
        if failed:
            log.error("watchdog.withheld", failed={c.name: c.detail for c in failed})
        else:
            systemd_notify.notify("WATCHDOG=1")
