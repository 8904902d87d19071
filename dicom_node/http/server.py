"""uvicorn in a thread of the node process: started after the SCP, stopped before it.

The listening socket is bound here (not by uvicorn) so that port 0 yields a
free port the caller learns at once, and so a port in use fails start-up
with the address in the message.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import TYPE_CHECKING

import uvicorn

from dicom_node.logging_setup import get_logger

if TYPE_CHECKING:
    from dicom_node.service import NodeService

log = get_logger(__name__)


class HttpBindError(OSError):
    """The HTTP port cannot be bound; the message names the address and the key to change."""


class HttpServer:
    def __init__(self, service: NodeService) -> None:
        from dicom_node.http.app import create_app

        self.settings = service.settings.http
        self.app = create_app(service)
        tls = service.settings.node.tls if self.settings.tls else None
        self.config = uvicorn.Config(
            self.app,
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=5,  # a browser's keep-alive never delays the node's stop
            ssl_certfile=str(tls.cert_file) if tls else None,
            ssl_keyfile=str(tls.key_file) if tls else None,
        )
        self._server = uvicorn.Server(self.config)
        self._thread: threading.Thread | None = None
        self.url: str | None = None

    def start(self) -> tuple[str, int]:
        host, port = self.settings.host, self.settings.port
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise HttpBindError(
                f"cannot listen for HTTP on {host}:{port} ({exc.strerror}); change http.port or http.host"
            ) from None
        sock.listen(128)
        bound = sock.getsockname()[:2]
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, name="http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        scheme = "https" if self.settings.tls else "http"
        shown = f"[{bound[0]}]" if family == socket.AF_INET6 else bound[0]
        self.url = f"{scheme}://{shown}:{bound[1]}/"
        log.info("http.listening", url=self.url, auth_required=not self.settings.loopback_only)
        return bound

    def stop(self) -> None:
        if self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._thread = None
