"""Inference workers: claim queued jobs, run the engine, write outputs, queue exports.

One worker thread per configured worker (`[worker] count`; one per GPU, or one
on the CPU). A job runs through `inference.pipeline.run_series` (load,
preprocess, model, postprocess, each timed) and `write_dicom_outputs`; each
stage becomes a job event with its duration. Any failure is recorded with a
readable reason and the stack trace, and the worker takes the next job: a bad
series never stops the service. A series the input screening refuses (not what
the model accepts) is `rejected` with the reason instead; the job's routing rule
may add its own screening names (`rules.screening`). Outputs go to `outputs/job-<id>/attempt-<n>/`
so a retried job never mixes its results with an earlier attempt's. Any other
error re-queues the job until it has been tried `[worker] max_attempts` times.
A result the plausibility gate stops is written but not sent: the job is `held`
with the gate's reasons and no export rows until a person releases it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import select

from dicom_node.export_targets import ExportTargets
from dicom_node.logging_setup import get_logger
from dicom_node.settings import RoutingRule, WorkerSettings
from storage.database import Database
from storage.instance_store import InstanceStore
from storage.jobs import (
    add_event,
    claim_next_job,
    fail_job,
    get_job,
    hold_outputs,
    record_outputs,
    reject_job,
    retry_after_error,
)
from storage.models import EventKind, Instance
from storage.write_retry import retry_write

if TYPE_CHECKING:
    from inference.imaging.screening import NamePatterns

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


def screening_names(rules: Sequence[RoutingRule]) -> dict[str, NamePatterns]:
    """Each rule's own screening names, as the engine takes them, by rule name."""
    from inference.imaging.screening import NamePatterns

    return {r.name: NamePatterns(accept=tuple(r.screening.accept), refuse=tuple(r.screening.refuse)) for r in rules}


def run_job(
    job_id: int,
    db: Database,
    store: InstanceStore,
    registry: ModelRegistry,
    device: str | None,
    targets: ExportTargets,
    max_attempts: int,
    names: Mapping[str, NamePatterns] | None = None,
) -> None:
    """Run one claimed job to `exporting`/`done`, `held`, `rejected`, `failed` with its reason, or back to `queued`.

    `targets` applies the destinations' object filters: a filtered-out output gets no export row.
    `names`: `screening_names` of the configured rules; the job's rule picks its own.
    """
    from inference.errors import InferenceError, SeriesRefused

    bound = log.bind(job_id=job_id)
    try:
        from inference.outputs.dicom_outputs import write_dicom_outputs
        from inference.pipeline import run_series, write_offline_outputs

        with db.session() as session:
            job = get_job(session, job_id)
            series_id, model_name, destinations, attempt, rule_name = (
                job.series_id,
                job.model,
                list(job.destinations),
                job.attempts,
                job.rule_name,
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
        result = run_series(files, package, device=device, names=(names or {}).get(rule_name or ""))
        for stage, seconds in result.timings_s.items():
            add_event(db, job_id, EventKind.STAGE, stage, duration_s=seconds)
        out_dir = store.attempt_outputs(job_id, attempt)
        start = time.perf_counter()
        summary = write_offline_outputs(result, out_dir)
        written = write_dicom_outputs(result, out_dir)
        add_event(db, job_id, EventKind.STAGE, "write outputs", duration_s=time.perf_counter() - start)
        outputs = [
            (output.sop_instance_uid, output.sop_class_uid, output.path.relative_to(store.root).as_posix())
            for output in written
        ]
        summary["outputs"] = outputs
        relative_dir = out_dir.relative_to(store.root).as_posix()
        if result.hold_reasons:
            hold_outputs(db, job_id, relative_dir, summary, result.hold_reasons)
            bound.warning("job.held", reasons=result.hold_reasons, lesions=len(result.lesions))
            return
        exports = targets.rows(destinations, outputs)
        record_outputs(db, job_id, relative_dir, summary, exports)
        bound.info("job.inference_done", lesions=len(result.lesions), egfr=result.egfr.call.value, outputs=len(outputs))
    except SeriesRefused as exc:
        bound.warning("job.rejected", reason=str(exc))
        reject_job(db, job_id, str(exc))
    except InferenceError as exc:
        bound.warning("job.failed", reason=str(exc))
        retry_write(partial(fail_job, db, job_id, str(exc), exc), f"job {job_id} failure")
    except Exception as exc:
        bound.exception("job.error", reason=repr(exc))
        reason = f"internal error: {type(exc).__name__}: {exc}"
        retry_write(partial(retry_after_error, db, job_id, reason, max_attempts, exc), f"job {job_id} failure")


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
        rules: Sequence[RoutingRule] = (),
    ) -> None:
        super().__init__(name=worker_id, daemon=True)
        self.worker_id = worker_id
        self.db = db
        self.store = store
        self.settings = settings
        self.registry = registry
        self.stop_event = stop
        self.targets = targets
        self.names = screening_names(rules)

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
                run_job(
                    job_id,
                    self.db,
                    self.store,
                    self.registry,
                    device,
                    self.targets,
                    self.settings.max_attempts,
                    self.names,
                )
            except Exception:  # e.g. the job store went away while recording a failure
                log.exception("worker.job_crashed", worker=self.worker_id, job_id=job_id)
