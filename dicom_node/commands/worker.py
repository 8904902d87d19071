"""`dicom-node worker`: inference workers only, for hosts that share the job store.

Several GPU hosts point at one PostgreSQL job store and shared storage; the
receiving host runs `serve` (with `[worker] count = 0` if it has no GPU) and
each GPU host runs `worker`. Jobs are claimed with SKIP LOCKED, so no job runs twice.
"""

from __future__ import annotations

import signal
import socket
import threading
from pathlib import Path

import typer

from dicom_node.commands._common import ConfigOption, job_store_or_exit, settings_or_exit


def worker(
    config: Path | None = ConfigOption,
    count: int | None = typer.Option(None, help="Workers in this process (default: [worker] count, at least 1)."),
) -> None:
    """Claim and run queued jobs until stopped (SIGTERM/Ctrl-C)."""
    from dicom_node.export_targets import ExportTargets
    from dicom_node.logging_setup import configure_logging, get_logger
    from dicom_node.worker import InferenceWorker, ModelRegistry
    from storage.instance_store import InstanceStore
    from storage.jobs import resume_interrupted

    settings = settings_or_exit(config)
    configure_logging(settings.logging)
    db = job_store_or_exit(settings)
    store = InstanceStore(settings.storage.data_dir)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    registry = ModelRegistry()
    targets = ExportTargets(settings.destinations)
    prefix = f"{socket.gethostname()}-worker-"
    resumed = resume_interrupted(db, prefix)
    workers = [
        InferenceWorker(f"{prefix}{i}", db, store, settings.worker, registry, stop, targets, settings.outputs)
        for i in range(count or max(settings.worker.count, 1))
    ]
    for w in workers:
        w.start()
    get_logger(__name__).info("workers.started", count=len(workers), jobs_resumed=resumed)
    stop.wait()
    for w in workers:
        w.join(timeout=120)


def register(app: typer.Typer) -> None:
    app.command("worker")(worker)
