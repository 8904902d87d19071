"""The service: one process wiring the Store SCP, series watcher, workers and exporter.

Start-up order makes restarts safe: leftovers of interrupted writes are
removed (partial temp files, and complete files whose row was never committed,
hence never acknowledged), jobs left `running` go back to `queued`, pending exports are picked
up by the exporter's first round; only then does the SCP accept
associations. Shutdown stops the SCP first (no new instances), then the
scheduler and the workers.
"""

from __future__ import annotations

import signal
import socket
import threading
from dataclasses import dataclass, field

from apscheduler.schedulers.background import BackgroundScheduler

from dicom_node.export_targets import ExportTargets
from dicom_node.exporter import Exporter
from dicom_node.logging_setup import get_logger
from dicom_node.routing import compile_rules
from dicom_node.series_watcher import SeriesWatcher
from dicom_node.settings import Settings
from dicom_node.store_scp import StoreSCP
from dicom_node.worker import InferenceWorker, ModelRegistry
from storage.database import Database
from storage.instance_store import InstanceStore
from storage.jobs import resume_interrupted, stored_instance_paths

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
        self.scp = StoreSCP(s.node, self.db, self.store)
        self.watcher = SeriesWatcher(self.db, self.store, compile_rules(s.rules), s.series.quiet_period_s)
        self.exporter = Exporter(self.db, self.store, s.destinations, s.export, s.node.ae_title, s.node.dimse_timeout_s)
        self.registry = ModelRegistry()
        self._stop = threading.Event()
        self._workers: list[InferenceWorker] = []
        self._scheduler = BackgroundScheduler(timezone="UTC")

    def start(self) -> tuple[str, int]:
        removed = self.store.remove_partials()
        orphans = self.store.remove_unreferenced(stored_instance_paths(self.db))
        resumed = resume_interrupted(self.db, self.worker_prefix)
        log.info(
            "service.starting",
            data_dir=str(self.store.root),
            partials_removed=removed,
            unacknowledged_files_removed=orphans,
            jobs_resumed=resumed,
        )
        s = self.settings
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
        if s.storage.retention_days is not None:
            from storage.retention import purge_expired

            self._scheduler.add_job(
                self._guard(lambda: purge_expired(self.db, self.store, s.storage.retention_days)),
                "interval",
                minutes=s.storage.retention_check_interval_min,
                id="retention",
                **every,
            )
        self._scheduler.start()
        for index in range(s.worker.count):
            worker = InferenceWorker(
                f"{self.worker_prefix}{index}",
                self.db,
                self.store,
                s.worker,
                self.registry,
                self._stop,
                ExportTargets(s.destinations),
                s.outputs,
            )
            worker.start()
            self._workers.append(worker)
        self.address = self.scp.start()
        return self.address

    @property
    def worker_prefix(self) -> str:
        """Worker names on this host: `<hostname>-worker-<n>` (what `resume_interrupted` matches)."""
        return f"{socket.gethostname()}-worker-"

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
        self.scp.stop()
        self._stop.set()
        self._scheduler.shutdown(wait=False)
        self.exporter.stop(timeout_s=10)
        for worker in self._workers:
            worker.join(timeout=60)
        self.db.dispose()
        log.info("service.stopped")

    def serve_forever(self) -> None:
        """Run until SIGTERM/SIGINT (systemd stop, Ctrl-C)."""
        done = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: done.set())
        self.start()
        done.wait()
        self.stop()
