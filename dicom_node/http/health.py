"""Liveness and readiness: what a load balancer, systemd's watchdog or a monitor asks.

`/healthz` answers while the process serves HTTP at all. `/readyz` answers 200
only when the node can do its job: the SCP listens, the job store takes a
write, the disk is above the watermark (else C-STORE is refused) and every
in-process worker thread is alive. Each check says why it failed.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from storage.associations import write_heartbeat

if TYPE_CHECKING:
    from dicom_node.service import NodeService


router = APIRouter(tags=["health"])


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def readiness(service: NodeService) -> list[Check]:
    """Every readiness check, each with a sentence an operator can act on."""
    checks = [
        Check("scp", service.scp.accepting, "accepting associations" if service.scp.accepting else "not listening")
    ]
    try:
        write_heartbeat(service.db, socket.gethostname())
        checks.append(Check("database", True, "writable"))
    except Exception as exc:
        checks.append(Check("database", False, f"write failed: {exc}"))
    free = service.store.free_bytes()
    watermark = service.settings.node.min_free_disk_mb * 1024 * 1024
    checks.append(
        Check(
            "disk",
            free >= watermark,
            f"{free // 2**20} MiB free, watermark {watermark // 2**20} MiB"
            + ("" if free >= watermark else ": C-STORE is refused"),
        )
    )
    dead = [w.name for w in service.workers if not w.is_alive()]
    checks.append(
        Check(
            "workers",
            not dead,
            f"{len(service.workers)} alive" if not dead else f"not alive: {', '.join(dead)}",
        )
    )
    return checks


@router.get("/healthz", response_class=PlainTextResponse, summary="The process is alive (no authentication).")
def healthz() -> str:
    return "ok\n"


@router.get("/readyz", summary="Ready to receive and process: SCP, database, disk, workers (503 if not).")
def readyz(request: Request) -> JSONResponse:
    checks = readiness(request.app.state.service)
    ready = all(c.ok for c in checks)
    body = {"ready": ready, "checks": {c.name: {"ok": c.ok, "detail": c.detail} for c in checks}}
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get("/metrics", summary="Prometheus metrics (text exposition format).")
def metrics(request: Request) -> Response:
    registry = request.app.state.service.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
