"""The web application: one FastAPI app per node, built from the running service.

Authentication is one middleware (see `auth.py` for the policy), so no route
can forget it; actions additionally call `require_actor`. A POST whose
`Origin` is another site is refused, so a page elsewhere cannot make a
logged-in browser act on a job.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from dicom_node.http.auth import Authenticator, User

if TYPE_CHECKING:
    from dicom_node.service import NodeService

OPEN_PATHS = frozenset({"/healthz"})
CHALLENGE = {"WWW-Authenticate": 'Basic realm="dicom-node", charset="UTF-8"'}


def require_actor(request: Request) -> User:
    """The authenticated user allowed to act on jobs, or 401 (browser asks for a login) / 403."""
    user: User = request.state.user
    if not user.authenticated:
        raise HTTPException(401, "log in as a physicist or admin to do this", headers=CHALLENGE)
    if not user.can_act:
        raise HTTPException(403, f"user {user.name!r} has role {user.role}; this needs physicist or admin")
    return user


def create_app(service: NodeService) -> FastAPI:
    from dicom_node.http import api, health, pages

    app = FastAPI(
        title="dicom-node operations API",
        summary="Jobs, exports and health of one DICOM node (brain-metastasis GTV + EGFR).",
        version="1",
        docs_url="/api/docs",
        redoc_url=None,
        openapi_url="/api/openapi.json",
    )
    app.state.service = service
    app.state.auth = Authenticator(service.settings.http)
    app.state.echo_results = {}

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        if request.url.path in OPEN_PATHS:
            request.state.user = None
            return await call_next(request)
        auth: Authenticator = request.app.state.auth
        # scrypt takes tens of milliseconds: verify off the event loop
        user = await run_in_threadpool(auth.resolve, request.headers.get("authorization"))
        if user is None or (auth.required and not user.authenticated):
            return PlainTextResponse("authentication required", status_code=401, headers=CHALLENGE)
        if request.method == "POST" and not _same_origin(request):
            return PlainTextResponse("cross-site request refused", status_code=403)
        request.state.user = user
        return await call_next(request)

    @app.exception_handler(HTTPException)
    async def readable_errors(request: Request, exc: HTTPException) -> Response:
        if request.url.path.startswith("/api/"):
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)
        return pages.error_page(request, exc)

    app.include_router(health.router)
    app.include_router(api.router)
    app.include_router(pages.router)
    return app


def _same_origin(request: Request) -> bool:
    origin = request.headers.get("origin")
    if origin is None:  # not a browser form (curl, scripts): nothing to forge
        return True
    return urlsplit(origin).netloc == request.headers.get("host")
