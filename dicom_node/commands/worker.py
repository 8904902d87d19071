"""`dicom-node worker`: inference workers only, for hosts that share the job store.

Several GPU hosts point at one PostgreSQL job store and shared storage; the
receiving host runs `serve` (with `[worker] count = 0` if it has no GPU) and
each GPU host runs `worker`, one per GPU (`--device cuda:N`) or one process
with a worker per `--device`. Jobs are claimed with SKIP LOCKED, so no job runs
twice; a started worker takes over only jobs whose lease has expired, or those
of the dead process whose slot it takes (`dicom_node.incarnation`), never a job
that another live process on the same host is running.
"""

from __future__ import annotations

import re
import signal
import threading
from pathlib import Path

import typer

from dicom_node.commands._common import ConfigOption, fail, job_store_or_exit, settings_or_exit


def _devices(settings, count: int | None, devices: list[str] | None) -> list[str]:
    """One device per worker: the `--device`s given, else `--count` times `[worker] device`; each must exist
    on this host (checked before the job store is opened)."""
    from dicom_node.preflight import StartupCheckFailed, check_device
    from dicom_node.settings.schema import DEVICE_PATTERN

    if devices and count is not None:
        raise fail("give --count or --device, not both (each --device starts one worker)")
    chosen = list(devices) if devices else [settings.worker.device] * (count or max(settings.worker.count, 1))
    for device in chosen:
        if not re.match(DEVICE_PATTERN, device):
            raise fail(f"--device {device!r} must be auto, cpu, cuda or cuda:N")
        try:
            check_device(device, "--device" if devices else "[worker] device")
        except StartupCheckFailed as exc:
            raise fail(f"cannot start: {exc}") from None
    return chosen


def worker(
    config: Path | None = ConfigOption,
    count: int | None = typer.Option(
        None, min=1, help="Workers in this process, all on worker.device (default: worker.count, at least 1)."
    ),
    device: list[str] = typer.Option(
        None, "--device", help="Run one worker on this device (cpu, cuda, cuda:N); repeat for one per GPU."
    ),
) -> None:
    """Claim and run queued jobs until stopped (SIGTERM/Ctrl-C)."""
    from apscheduler.schedulers.background import BackgroundScheduler

    from dicom_node.export_targets import ExportTargets
    from dicom_node.logging_setup import configure_logging, get_logger
    from dicom_node.preflight import StartupCheckFailed, check_models
    from dicom_node.worker import InferenceWorker, ModelRegistry, requeue_dead_holders, take_over_at_start, worker_ids
    from storage.instance_store import InstanceStore
    from storage.store_identity import StoreMismatchError, check_and_bind

    settings = settings_or_exit(config)
    configure_logging(settings.logging)
    devices = _devices(settings, count, device)
    db = job_store_or_exit(settings)
    store = InstanceStore(settings.storage.data_dir)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    registry = ModelRegistry()
    try:  # before any job is claimed: a broken package would fail every job it is given
        models = check_models(settings.rules, registry)
    except StartupCheckFailed as exc:
        raise fail(f"cannot start: {exc}") from None
    targets = ExportTargets(settings.destinations)
    max_attempts = settings.worker.max_attempts
    try:  # this host must see the data directory the job store belongs to (shared storage mounted)
        check_and_bind(db, store)
    except StoreMismatchError as exc:
        raise fail(f"cannot start: {exc}") from None
    incarnation, resumed = take_over_at_start(db, settings.storage.data_dir, max_attempts)
    leases = BackgroundScheduler(timezone="UTC")
    leases.add_job(
        lambda: _logged(requeue_dead_holders, db, max_attempts),
        "interval",
        seconds=settings.worker.lease_check_interval_s,
        id="expired-leases",
        max_instances=1,
        coalesce=True,
    )
    leases.start()
    workers = [
        InferenceWorker(
            worker_id, dev, db, store, settings.worker, registry, stop, targets, settings.rules, settings.outputs
        )
        for worker_id, dev in zip(worker_ids(len(devices)), devices, strict=True)
    ]
    for w in workers:
        w.start()
    get_logger(__name__).info(
        "workers.started", workers=[w.worker_id for w in workers], devices=devices, models=models, jobs_resumed=resumed
    )
    stop.wait()
    leases.shutdown(wait=False)
    for w in workers:
        w.join(timeout=120)
    incarnation.release()


def _logged(function, *args) -> None:
    """A scheduled call that logs its errors (e.g. the job store briefly unreachable) and goes on."""
    from dicom_node.logging_setup import get_logger

    try:
        function(*args)
    except Exception:
        get_logger(__name__).exception("worker.lease_check_failed")


def register(app: typer.Typer) -> None:
    app.command("worker")(worker)
