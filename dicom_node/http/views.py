"""What the pages show that is not a job: associations, destinations, the system. Read-only queries."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import TYPE_CHECKING

from sqlalchemy import func, select

from storage.models import EventKind, Export, ExportState, Job, JobEvent, JobState

if TYPE_CHECKING:
    from dicom_node.service import NodeService


@dataclass(frozen=True)
class DestinationView:
    name: str
    address: str
    tls: bool
    pending: int
    failed: int
    last_attempt_at: datetime | None
    last_attempt: str | None
    last_echo: object | None  # EchoResult with its time, from this process


def destinations(service: NodeService, echo_results: dict) -> list[DestinationView]:
    views = []
    with service.db.session() as session:
        counts = dict(
            session.execute(
                select(Export.destination, func.count())
                .where(Export.state == ExportState.PENDING)
                .group_by(Export.destination)
            ).all()
        )
        failed = dict(
            session.execute(
                select(Export.destination, func.count())
                .where(Export.state == ExportState.FAILED)
                .group_by(Export.destination)
            ).all()
        )
        for dest in service.settings.destinations:
            last = session.execute(
                select(JobEvent.at, JobEvent.message)
                .where(
                    JobEvent.kind == EventKind.EXPORT, JobEvent.message.startswith(f"{dest.name}: ", autoescape=True)
                )
                .order_by(JobEvent.id.desc())
                .limit(1)
            ).first()
            views.append(
                DestinationView(
                    name=dest.name,
                    address=f"{dest.ae_title}@{dest.host}:{dest.port}",
                    tls=dest.tls.enabled,
                    pending=counts.get(dest.name, 0),
                    failed=failed.get(dest.name, 0),
                    last_attempt_at=last.at if last else None,
                    last_attempt=last.message.removeprefix(f"{dest.name}: ") if last else None,
                    last_echo=echo_results.get(dest.name),
                )
            )
    return views


@dataclass(frozen=True)
class PackageView:
    model: str  # as routing rules name it
    name: str | None
    version: str | None
    is_demo: bool | None
    path: str
    error: str | None


@lru_cache(maxsize=32)
def _package(model: str) -> PackageView:
    """A model package's identity (validated once per process: reading the weights costs a moment)."""
    from inference.errors import ModelPackageError
    from inference.model.package import default_package_path, load_package

    path = default_package_path() if model == "default" else model
    try:
        package = load_package(path)
    except ModelPackageError as exc:
        return PackageView(model, None, None, None, str(path), str(exc))
    return PackageView(model, package.name, package.version, package.is_demo, str(package.path), None)


def packages(service: NodeService) -> list[PackageView]:
    models = sorted({"default", *(rule.model for rule in service.settings.rules)})
    return [_package(model) for model in models]


@dataclass(frozen=True)
class SystemView:
    free_bytes: int
    watermark_bytes: int
    queued: int
    running: int
    exporting: int
    pending_exports: int
    workers: list[tuple[str, bool]]
    device: str
    packages: list[PackageView]


def system(service: NodeService) -> SystemView:
    with service.db.session() as session:
        states = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
        pending = session.scalar(select(func.count()).where(Export.state == ExportState.PENDING)) or 0
    return SystemView(
        free_bytes=service.store.free_bytes(),
        watermark_bytes=service.settings.node.min_free_disk_mb * 1024 * 1024,
        queued=states.get(JobState.QUEUED, 0),
        running=states.get(JobState.RUNNING, 0),
        exporting=states.get(JobState.EXPORTING, 0),
        pending_exports=pending,
        workers=[(w.name, w.is_alive()) for w in service.workers],
        device=_device(service.settings.worker.device),
        packages=packages(service),
    )


def _device(configured: str) -> str:
    """The device the workers resolve (`worker.device`, else $DICOM_NODE_DEVICE, else CUDA when present)."""
    from inference.model.predictor import select_device

    try:
        return str(select_device(None if configured == "auto" else configured)) + f" (configured: {configured})"
    except (RuntimeError, ValueError) as exc:
        return f"{configured}: {exc}"
