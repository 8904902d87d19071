"""Inference workers: claim queued jobs, run the engine, write outputs, queue exports.

One worker thread per configured worker (`[worker] count`; one per GPU, or one
on the CPU). A job runs through `inference.pipeline.run_series` (load,
preprocess, model, postprocess, each timed) and `write_dicom_outputs`; each
stage becomes a job event with its duration. Any failure is recorded with a
readable reason and the stack trace, and the worker takes the next job: a bad
series never stops the service. Outputs go to `outputs/job-<id>/attempt-<n>/`
so a retried job never mixes its results with an earlier attempt's.
"""

from __future__ import annotations

import threading
import time
from functools import partial
from pathlib import Path

from sqlalchemy import select

from dicom_node.export_targets import ExportTargets
from dicom_node.logging_setup import get_logger
from dicom_node.settings import OutputSettings, WorkerSettings
from storage.database import Database
from storage.instance_store import InstanceStore
from storage.jobs import add_event, claim_next_job, fail_job, get_job, record_outputs
from storage.models import EventKind, Instance
from storage.write_retry import retry_write

log = get_logger(__name__)


class ModelRegistry:
    """Loaded model packages by the name a routing rule gives ("default" or a path)."""

    def __init__(self) -> None:
        self._packages: dict[str, object] = {}
        self._lock = threading.Lock()

    def get(self, name: str | None):
        from inference.model.package import default_package_path, load_package

        key = name or "default"
        with self._lock:
            if key not in self._packages:
                path = default_package_path() if key == "default" else Path(key)
                self._packages[key] = load_package(path)
            return self._packages[key]


def series_files(db: Database, store: InstanceStore, series_id: int) -> list[Path]:
    with db.session() as session:
        paths = session.scalars(
            select(Instance.path)
            .where(Instance.series_id == series_id, Instance.purged_at.is_(None))
            .order_by(Instance.id)
        ).all()
    return [store.absolute(p) for p in paths]


def run_job(
    job_id: int,
    db: Database,
    store: InstanceStore,
    registry: ModelRegistry,
    device: str | None,
    targets: ExportTargets,
    outputs: OutputSettings | None = None,
) -> None:
    """Run one claimed job to `exporting`/`done`, or `failed` with its reason.

    `targets` applies the destinations' object filters: a filtered-out output gets no export row;
    `outputs` says how the DICOM outputs are written (ROI name prefix).
    """
    outputs = outputs or OutputSettings()
    from inference.errors import InferenceError

    bound = log.bind(job_id=job_id)
    try:
        from inference.outputs.dicom_outputs import write_dicom_outputs
        from inference.pipeline import run_series, write_offline_outputs

        with db.session() as session:
            job = get_job(session, job_id)
            series_id, model_name, destinations, attempt = (
                job.series_id,
                job.model,
                list(job.destinations),
                job.attempts,
            )
        bound = bound.bind(series_uid=job.series_uid, study_uid=job.study_uid)
        files = series_files(db, store, series_id)
        if not files:
            raise FileNotFoundError("the series' instances are no longer on disk (purged?)")
        start = time.perf_counter()
        package = registry.get(model_name)
        add_event(
            db,
            job_id,
            EventKind.STAGE,
            f"model package {package.identity.display} ready",
            duration_s=time.perf_counter() - start,
        )
        result = run_series(files, package, device=device)
        for stage, seconds in result.timings_s.items():
            add_event(db, job_id, EventKind.STAGE, stage, duration_s=seconds)
        out_dir = store.root / "outputs" / f"job-{job_id}" / f"attempt-{attempt}"
        start = time.perf_counter()
        summary = write_offline_outputs(result, out_dir)
        written = write_dicom_outputs(result, out_dir, roi_name_prefix=outputs.roi_name_prefix)
        add_event(db, job_id, EventKind.STAGE, "write outputs", duration_s=time.perf_counter() - start)
        written_rows = [
            (output.sop_instance_uid, output.sop_class_uid, output.path.relative_to(store.root).as_posix())
            for output in written
        ]
        summary["outputs"] = written_rows
        exports = targets.rows(destinations, written_rows)
        record_outputs(db, job_id, out_dir.relative_to(store.root).as_posix(), summary, exports)
        bound.info(
            "job.inference_done", lesions=len(result.lesions), egfr=result.egfr.call.value, outputs=len(written_rows)
        )
    except InferenceError as exc:
        bound.warning("job.failed", reason=str(exc))
        retry_write(partial(fail_job, db, job_id, str(exc), exc), f"job {job_id} failure")
    except Exception as exc:
        bound.exception("job.failed", reason=repr(exc))
        reason = f"internal error: {type(exc).__name__}: {exc}"
        retry_write(partial(fail_job, db, job_id, reason, exc), f"job {job_id} failure")


class InferenceWorker(threading.Thread):
    """Polls the job store for queued jobs until stopped."""

    def __init__(
        self,
        worker_id: str,
        db: Database,
        store: InstanceStore,
        settings: WorkerSettings,
        registry: ModelRegistry,
        stop: threading.Event,
        targets: ExportTargets,
        outputs: OutputSettings | None = None,
    ) -> None:
        super().__init__(name=worker_id, daemon=True)
        self.outputs = outputs or OutputSettings()
        self.worker_id = worker_id
        self.db = db
        self.store = store
        self.settings = settings
        self.registry = registry
        self.stop_event = stop
        self.targets = targets

    def run(self) -> None:
        device = None if self.settings.device == "auto" else self.settings.device
        while not self.stop_event.is_set():
            try:
                job_id = claim_next_job(self.db, self.worker_id)
            except Exception:
                log.exception("worker.claim_failed", worker=self.worker_id)
                job_id = None
            if job_id is None:
                self.stop_event.wait(self.settings.poll_interval_s)
                continue
            try:
                run_job(job_id, self.db, self.store, self.registry, device, self.targets, self.outputs)
            except Exception:  # e.g. the job store went away while recording a failure
                log.exception("worker.job_crashed", worker=self.worker_id, job_id=job_id)
