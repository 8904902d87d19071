"""Inference workers: claim queued jobs, run the engine, write outputs, queue exports.

One worker thread per configured worker, each on its own device (`[worker]
count` on `[worker] device` in `serve`; `dicom-node worker --device cuda:N`,
one worker per GPU). A job runs through `inference.pipeline.run_series` (load,
preprocess, model, postprocess, each timed) and `write_dicom_outputs`; each
stage becomes a job event with its duration. Any failure is recorded with a
readable reason and the stack trace, and the worker takes the next job: a bad
series never stops the service. A series the input screening refuses (not what
the model accepts) is `rejected` with the reason instead; the job's routing rule
may add its own screening names (`rules.screening`). Outputs go to `outputs/job-<id>/attempt-<n>/`
so a retried job never mixes its results with an earlier attempt's. A re-run (a retry, or a
later job of the same series and model) writes into the same output series and supersedes
the latest object written there (`storage.outputs`, `inference.outputs.supersession`).

Decisions:
- A worker's id is `host:pid:nonce:worker-N`, unique per process (the nonce
  tells a restarted process from its previous incarnation with the same pid),
  so no process ever mistakes another's job for its own.
- While a job runs, a heartbeat renews its lease every `lease_s / 3`; a worker
  that stops renewing (killed, host gone) loses the job when the lease expires,
  and then cannot record outputs for it any more (`storage.jobs.LeaseLost`).
- At start-up a process re-queues at once the jobs of the dead process it
  replaces on this host (`dicom_node.incarnation`), and otherwise only jobs
  whose lease has expired.
- `ModelRegistry` loads and verifies each package once per process and builds
  its network once per device, so jobs after the first reuse it. A worker
  builds the networks of the models its rules name, and runs each once on a
  batch of empty slices, before it takes its first job (`InferenceWorker.warm_up`): the
  first patient's job after a start does not pay for torch's first calls.
"""

from __future__ import annotations

import itertools
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Row, select

from dicom_node.export_targets import ExportTargets
from dicom_node.incarnation import Incarnation
from dicom_node.logging_setup import get_logger
from dicom_node.settings import OutputSettings, RoutingRule, WorkerSettings
from storage.database import Database
from storage.instance_store import InstanceStore, sha256_file
from storage.jobs import (
    LeaseLost,
    add_event,
    claim_next_job,
    fail_job,
    get_job,
    hold_outputs,
    record_outputs,
    reject_job,
    renew_lease,
    requeue_expired_leases,
    requeue_jobs_of,
    retry_after_error,
)
from storage.models import EventKind, Instance
from storage.outputs import WrittenObject, latest_in_series, output_path
from storage.store_identity import database_store_id
from storage.write_retry import retry_write

if TYPE_CHECKING:
    from inference.imaging.screening import NamePatterns
    from inference.outputs.supersession import Predecessor

if TYPE_CHECKING:
    from inference.model.mtsa_net import MTSANet
    from inference.model.package import ModelPackage

log = get_logger(__name__)

_NONCE = secrets.token_hex(4)
_WORKER_NUMBERS = itertools.count()  # unique within the process, even across services (tests)


def process_identity() -> str:
    """`host:pid:nonce` of this process; the nonce is drawn once per process start."""
    return f"{socket.gethostname()}:{os.getpid()}:{_NONCE}"


def worker_ids(count: int) -> list[str]:
    """Ids of this process's `count` workers: `host:pid:nonce:worker-N`."""
    identity = process_identity()
    return [f"{identity}:worker-{next(_WORKER_NUMBERS)}" for _ in range(count)]


def holder_host(worker_id: str | None) -> str | None:
    """The host part of a worker id (older ids, `<host>-worker-N`, have no colon)."""
    if not worker_id:
        return None
    return worker_id.split(":", 1)[0] if ":" in worker_id else worker_id.rsplit("-worker-", 1)[0]


def requeue_dead_holders(db: Database, max_attempts: int) -> list[int]:
    """Re-queue the running jobs whose holder stopped renewing its lease (logged); their ids.

    A job already tried `max_attempts` times fails instead (it may be what kills its workers)."""
    requeued = requeue_expired_leases(db, max_attempts)
    if requeued:
        log.warning("jobs.requeued_expired_leases", jobs=requeued)
    return requeued


def take_over_at_start(db: Database, data_dir: Path, max_attempts: int) -> tuple[Incarnation, list[int]]:
    """At start-up: take a process slot on this host; re-queue the running jobs of the slot's
    previous holder (a dead process) and those whose lease has expired. Keep the returned
    `Incarnation` for the life of the process: it holds the slot."""
    incarnation = Incarnation(data_dir, process_identity())
    previous = incarnation.claim()
    # The slot's previous holder is dead, unless it was this very process (an earlier service in it).
    requeued = requeue_jobs_of(db, previous, max_attempts) if previous and previous != process_identity() else []
    if requeued:
        log.warning("jobs.requeued_previous_incarnation", previous=previous, jobs=requeued)
    return incarnation, requeued + requeue_dead_holders(db, max_attempts)


class ModelRegistry:
    """Verified model packages by the name a routing rule gives ("default" or a path), and
    their networks by device: each package is read and checked once, each network built once."""

    def __init__(self) -> None:
        self._packages: dict[str, ModelPackage] = {}
        self._networks: dict[tuple[str, str], MTSANet] = {}
        self._lock = threading.Lock()

    def get(self, name: str | None) -> ModelPackage:
        from inference.model.package import default_package_path, load_package

        key = name or "default"
        with self._lock:
            if key not in self._packages:
                path = default_package_path() if key == "default" else Path(key)
                self._packages[key] = load_package(path)
            return self._packages[key]

    def network(self, name: str | None, device: str | None) -> tuple[ModelPackage, MTSANet]:
        """The package and its network on `device` (None: `select_device`'s choice), built on first use."""
        from inference.model.predictor import select_device

        package = self.get(name)
        torch_device = select_device(device)
        key = (name or "default", str(torch_device))
        with self._lock:
            if key not in self._networks:
                self._networks[key] = package.build_model(torch_device)
            return package, self._networks[key]


class LeaseHeartbeat:
    """Renews a running job's lease every `lease_s / 3` in a background thread."""

    def __init__(self, db: Database, job_id: int, worker_id: str, lease_s: float) -> None:
        self.db, self.job_id, self.worker_id, self.lease_s = db, job_id, worker_id, lease_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease-{job_id}", daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                if not renew_lease(self.db, self.job_id, self.worker_id, self.lease_s):
                    if not self._stop.is_set():  # else the job has just left `running` normally
                        log.warning("job.lease_lost", job_id=self.job_id, worker=self.worker_id)
                    return
            except Exception:  # the job store is unreachable: try again at the next beat
                log.exception("job.lease_renewal_failed", job_id=self.job_id, worker=self.worker_id)

    def __enter__(self) -> LeaseHeartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()


class DamagedInstanceFiles(Exception):
    """Instance files that are not what was received (a job fails on them: retrying cannot help)."""


def _instance_rows(db: Database, series_id: int) -> Sequence[Row[str, str, int, str]]:
    with db.session() as session:
        return session.execute(
            select(Instance.path, Instance.sha256, Instance.size_bytes, Instance.sop_instance_uid)
            .where(Instance.series_id == series_id, Instance.purged_at.is_(None))
            .order_by(Instance.id)
        ).all()


def series_files(db: Database, store: InstanceStore, series_id: int) -> list[Path]:
    """The series' instance files (not purged), in the order they were received."""
    return [store.absolute(row.path) for row in _instance_rows(db, series_id)]


def verified_series_files(db: Database, store: InstanceStore, series_id: int) -> list[Path]:
    """`series_files`, each checked against the size and sha256 recorded when it was received.

    Why: a power cut can leave a received file short or missing behind its
    committed row (`storage.ingest._place_and_commit`), and disks fail; a job
    must never run on other bytes than were received. Hashing costs about
    0.3 s for a 176-slice 512x512 series. All files missing raises
    `FileNotFoundError` (retried: the data directory not mounted?); some
    missing or differing raises `DamagedInstanceFiles`. A mismatch is checked
    again after `RECHECK_S`, against the rows read again: a `replace`
    correction renames its file a moment before it commits its row."""
    rows = _instance_rows(db, series_id)
    files = [store.absolute(row.path) for row in rows]
    if not files or not any(f.is_file() for f in files):
        raise FileNotFoundError(
            f"{'the' if not files else 'all'} of the series' instance files are not on disk"
            f" under {store.root} (purged, or the data directory is not mounted?)"
        )
    if not _differing(store, rows):
        return files
    time.sleep(RECHECK_S)
    rows = _instance_rows(db, series_id)
    differing = _differing(store, rows)
    if differing:
        raise DamagedInstanceFiles(
            f"{len(differing)} of the series' {len(rows)} instance files are missing or differ from what was"
            f" received (first: {differing[0]}; a power cut during their receipt, or a damaged disk);"
            " re-send the series from its source: those instances are stored again and the series runs again"
        )
    return [store.absolute(row.path) for row in rows]


RECHECK_S = 1.0


def _differing(store: InstanceStore, rows: Sequence[Row[str, str, int, str]]) -> list[str]:
    """SOP Instance UIDs whose file is missing or not the size and sha256 of its row."""
    differing = []
    for row in rows:
        path = store.absolute(row.path)
        try:
            if path.stat().st_size == row.size_bytes and sha256_file(path) == row.sha256:
                continue
        except OSError:
            pass
        differing.append(row.sop_instance_uid)
    return differing


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
    worker_id: str,
    targets: ExportTargets,
    max_attempts: int,
    names: Mapping[str, NamePatterns] | None = None,
    output_settings: OutputSettings | None = None,
    batch_size: int = 8,
) -> None:
    """Run one job that `worker_id` has claimed to `exporting`/`done`, `held`, `rejected`,
    `failed` with its reason, or back to `queued` (an internal error, until `max_attempts`).

    Results and failures are recorded only while this run still holds the job.
    `targets` applies the destinations' object filters: a filtered-out output gets no export row.
    `names`: `screening_names` of the configured rules; the job's rule picks its own.
    `output_settings` says how the DICOM outputs are written (ROI name prefix);
    `batch_size` is `[worker] batch_size`, slices per forward pass.
    """
    output_settings = output_settings or OutputSettings()
    from inference.errors import InferenceError, SeriesRefused

    bound = log.bind(job_id=job_id, worker=worker_id)
    holder: tuple[str, int] | None = None
    try:
        from inference.outputs.dicom_outputs import output_series_uids, write_dicom_outputs
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
        holder = (worker_id, attempt)
        bound = bound.bind(series_uid=job.series_uid, study_uid=job.study_uid)
        files = verified_series_files(db, store, series_id)
        start = time.perf_counter()
        package, network = registry.network(model_name, device)
        add_event(
            db,
            job_id,
            EventKind.STAGE,
            f"model package {package.identity.display} ready",
            duration_s=time.perf_counter() - start,
        )
        result = run_series(
            files, package, model=network, names=(names or {}).get(rule_name or ""), batch_size=batch_size
        )
        for stage, seconds in result.timings_s.items():
            add_event(db, job_id, EventKind.STAGE, stage, duration_s=seconds)
        out_dir = store.attempt_outputs(job_id, attempt)
        start = time.perf_counter()
        summary = write_offline_outputs(result, out_dir)
        installation = installation_id(db)
        predecessors = _predecessors(db, output_series_uids(result, installation))
        written = write_dicom_outputs(
            result,
            out_dir,
            roi_name_prefix=output_settings.roi_name_prefix,
            predecessors=predecessors,
            installation=installation,
        )
        add_event(db, job_id, EventKind.STAGE, "write outputs", duration_s=time.perf_counter() - start)
        for kind, before in predecessors.items():
            add_event(db, job_id, EventKind.LOG, f"{kind} r{before.next_revision}: {before.sentence()}")
        objects = [
            WrittenObject(
                kind=output.kind,
                series_uid=output.series_instance_uid,
                sop_instance_uid=output.sop_instance_uid,
                sop_class_uid=output.sop_class_uid,
                path=output.path.relative_to(store.root).as_posix(),
            )
            for output in written
        ]
        outputs = [(o.sop_instance_uid, o.sop_class_uid, o.path) for o in objects]
        summary["outputs"] = outputs
        relative_dir = out_dir.relative_to(store.root).as_posix()
        hold_reasons = list(result.hold_reasons)
        if (withdrawal := _unwithdrawn_rtstruct(db, store, len(result.lesions), predecessors)) is not None:
            hold_reasons.append(withdrawal)
        if hold_reasons:
            hold_outputs(db, job_id, relative_dir, summary, hold_reasons, holder=holder, objects=objects)
            bound.warning("job.held", reasons=hold_reasons, lesions=len(result.lesions))
            return
        exports = targets.rows(destinations, outputs)
        record_outputs(db, job_id, relative_dir, summary, exports, holder=holder, objects=objects)
        bound.info("job.inference_done", lesions=len(result.lesions), egfr=result.egfr.call.value, outputs=len(outputs))
    except LeaseLost as exc:
        bound.warning("job.lease_lost", reason=str(exc))
    except SeriesRefused as exc:
        bound.warning("job.rejected", reason=str(exc))
        _record_end(partial(reject_job, db, job_id, str(exc), holder=holder), job_id)
    except (InferenceError, DamagedInstanceFiles) as exc:
        bound.warning("job.failed", reason=str(exc))
        _record_end(partial(fail_job, db, job_id, str(exc), exc, holder=holder), job_id)
    except Exception as exc:
        bound.exception("job.error", reason=repr(exc))
        reason = f"internal error: {type(exc).__name__}: {exc}"
        _record_end(partial(retry_after_error, db, job_id, reason, max_attempts, exc, holder=holder), job_id)


def installation_id(db: Database) -> str:
    """The store id of the job store (`storage.store_identity`), which names this installation's output series.

    Raises
    ------
    RuntimeError
        The job store has none yet: `serve` and `worker` record it at start-up.
    """
    store_id = database_store_id(db)
    if not store_id:
        raise RuntimeError(
            f"the job store ({db.url_for_humans}) has no store id yet; start the node with"
            " `dicom-node serve` or `dicom-node worker`, which record it"
        )
    return store_id


def _predecessors(db: Database, series_uids: Mapping[str, str]) -> dict[str, Predecessor]:
    """By kind, the latest object already written in each output series: what this run supersedes."""
    from inference.outputs.supersession import Predecessor

    latest = latest_in_series(db, series_uids.values())
    return {
        kind: Predecessor(
            study_uid=prior.study_uid,
            series_uid=prior.series_uid,
            sop_class_uid=prior.sop_class_uid,
            sop_instance_uid=prior.sop_instance_uid,
            written_at=prior.created_at,
            job_id=prior.job_id,
            attempt=prior.attempt,
            revision=prior.revision,
        )
        for kind, series_uid in series_uids.items()
        if (prior := latest.get(series_uid)) is not None
    }


def _unwithdrawn_rtstruct(
    db: Database, store: InstanceStore, lesions: int, predecessors: Mapping[str, Predecessor]
) -> str | None:
    """`supersession.unwithdrawn_rtstruct`, with the ROI count read from the earlier RTSTRUCT's file."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    from inference.outputs.supersession import unwithdrawn_rtstruct

    earlier = predecessors.get("RTSTRUCT")
    if lesions or earlier is None:
        return None
    rois = None
    path = output_path(db, earlier.sop_instance_uid)
    if path is not None:
        try:
            ds = pydicom.dcmread(
                store.absolute(path), stop_before_pixels=True, specific_tags=["StructureSetROISequence"]
            )
            rois = len(ds.get("StructureSetROISequence", []))
        except (OSError, InvalidDicomError):  # purged by retention: the hold does not need the count
            rois = None
    return unwithdrawn_rtstruct(lesions, predecessors, rois)


def _record_end(record: Callable[[], object], job_id: int) -> None:
    """Record how a run ended, retried while the store is busy; nothing if the run lost the job."""
    try:
        retry_write(record, f"job {job_id} outcome")
    except LeaseLost as lost:
        log.warning("job.lease_lost", job_id=job_id, reason=str(lost))


class InferenceWorker(threading.Thread):
    """Polls the job store for queued jobs until stopped; runs them on its own device."""

    def __init__(
        self,
        worker_id: str,
        device: str,
        db: Database,
        store: InstanceStore,
        settings: WorkerSettings,
        registry: ModelRegistry,
        stop: threading.Event,
        targets: ExportTargets,
        rules: Sequence[RoutingRule] = (),
        outputs: OutputSettings | None = None,
    ) -> None:
        super().__init__(name=worker_id, daemon=True)
        self.outputs = outputs or OutputSettings()
        self.worker_id = worker_id
        self.device = None if device == "auto" else device
        self.db = db
        self.store = store
        self.settings = settings
        self.registry = registry
        self.stop_event = stop
        self.targets = targets
        self.names = screening_names(rules)
        self.models = sorted({rule.model for rule in rules})  # no rule, no job: nothing to warm up

    def warm_up(self) -> None:
        """Build the network of each model the rules name on this worker's device and run it once
        on a batch of empty slices, as a job would.

        Why: otherwise a worker's first job pays for the build, torch's first calls and the
        writers' imports: 5.1 s of the first job's 29 s on a 2-core CPU host (bench/README.md,
        "First job after a start"), on a patient's series. A failure is logged and left to the
        first job that needs the model, which reports it as it would have."""
        for name in self.models:
            if self.stop_event.is_set():
                return
            start = time.perf_counter()
            try:
                import numpy as np

                import inference.outputs.dicom_outputs  # noqa: F401 - the writers' imports (highdicom)
                from inference.model.predictor import predict_slices

                package, network = self.registry.network(name, self.device)
                batch, size = self.settings.batch_size, package.input_size
                device = next(network.parameters()).device
                predict_slices(network, np.zeros((batch, size, size), np.float32), device=device, batch_size=batch)
            except Exception as exc:
                log.warning("worker.warm_up_failed", worker=self.worker_id, model=name, reason=str(exc))
                continue
            log.info(
                "worker.warmed_up", worker=self.worker_id, model=name, seconds=round(time.perf_counter() - start, 2)
            )

    def run(self) -> None:
        self.warm_up()
        lease_s = self.settings.lease_s
        while not self.stop_event.is_set():
            try:
                job_id = claim_next_job(self.db, self.worker_id, lease_s)
            except Exception:
                log.exception("worker.claim_failed", worker=self.worker_id)
                job_id = None
            if job_id is None:
                self.stop_event.wait(self.settings.poll_interval_s)
                continue
            try:
                with LeaseHeartbeat(self.db, job_id, self.worker_id, lease_s):
                    run_job(
                        job_id,
                        self.db,
                        self.store,
                        self.registry,
                        self.device,
                        self.worker_id,
                        self.targets,
                        self.settings.max_attempts,
                        self.names,
                        self.outputs,
                        self.settings.batch_size,
                    )
            except Exception:  # e.g. the job store went away while recording a failure
                log.exception("worker.job_crashed", worker=self.worker_id, job_id=job_id)
