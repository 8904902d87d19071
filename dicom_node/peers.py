"""DICOM peers nobody here wrote, started and driven the way a hospital's would be.

Why a module of its own: the demo, the tests and the benchmarks all need the
same stand-ins (DCMTK `storescp` as the receiving TPS, DCMTK `storescu` as the
sending modality) and the same loopback helpers. Each falls back to a
pynetdicom peer where DCMTK is not installed, and says which one it used.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pydicom

from dicom_node.association import request_association, scu_ae


def find_dcmtk(name: str) -> str | None:
    """Path of a DCMTK tool, ignoring the same-named pynetdicom scripts in our own venv."""
    venv_bin = str(Path(sys.prefix) / "bin")
    search = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p != venv_bin)
    return shutil.which(name, path=search)


_PORT_BLOCKS = 32  # processes picking ports at once (test workers, the demo, a benchmark) each walk their own block
_FALLBACK_EPHEMERAL_LOW = 32768
_port_lock = threading.Lock()
_next_in_block: int | None = None  # where this process's walk through its block goes on


def _ephemeral_low() -> int:
    """The first port the kernel hands to outgoing connections and to bind(port 0)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return _FALLBACK_EPHEMERAL_LOW


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, that nothing else is likely to take before the caller binds it.

    Why not bind(port 0): the kernel takes that port from the ephemeral range, which every
    outgoing connection of every process (an SCU's, a database client's) also draws from, so
    another process can take it between this call and the caller's bind ("Address already in
    use"). Instead the port comes from below the ephemeral range, in a block of its own for this
    process (by PID), walked round from a random start (two processes whose PIDs share a block
    seldom meet), and only once a bind without SO_REUSEADDR succeeds (so not while a connection
    on it is in TIME_WAIT). Thread-safe.
    """
    global _next_in_block
    high = _ephemeral_low()
    low = max(1024, high - 12_000)
    block = (high - low) // _PORT_BLOCKS
    if block < 16:
        return _kernel_port()
    start = low + (os.getpid() % _PORT_BLOCKS) * block
    with _port_lock:
        if _next_in_block is None:
            _next_in_block = random.randrange(block)
        for _ in range(block):
            port = start + _next_in_block
            _next_in_block = (_next_in_block + 1) % block
            if _bindable(port):
                return port
    return _kernel_port()


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _kernel_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_listening(port: int, timeout_s: float = 10.0) -> None:
    """Return once something accepts TCP connections on 127.0.0.1:`port`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing is listening on port {port} after {timeout_s:.0f} s")


class ReceivingNode:
    """The stand-in TPS: a Store SCP writing what it receives to `folder`."""

    def __init__(self, folder: Path, port: int, ae_title: str = "TPS") -> None:
        self.folder, self.port, self.ae_title = folder, port, ae_title
        folder.mkdir(parents=True, exist_ok=True)
        self._process: subprocess.Popen[bytes] | None = None
        self._server: Any = None
        storescp = find_dcmtk("storescp")
        if storescp:
            self.kind = "DCMTK storescp"
            self._process = subprocess.Popen(
                [storescp, "-aet", ae_title, "-od", str(folder), str(port)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        else:
            from pynetdicom import AE, AllStoragePresentationContexts, evt

            self.kind = "pynetdicom Store SCP"
            ae = AE(ae_title=ae_title)
            ae.supported_contexts = AllStoragePresentationContexts

            def handle(event: Any) -> int:
                ds = event.dataset
                ds.file_meta = event.file_meta
                ds.save_as(folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
                return 0x0000

            self._server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, handle)])
        wait_listening(port)

    def received(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p.is_file())

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(10)
        if self._server is not None:
            self._server.shutdown()


def send_series(
    files: Sequence[Path],
    port: int,
    *,
    calling_ae: str = "DEMO_MR",
    called_ae: str = "DICOMNODE",
    on_sent: Callable[[int], None] | None = None,
) -> str:
    """C-STORE every file to 127.0.0.1:`port`; returns the sender's name.

    DCMTK `storescu` in batches of 16 files when installed, else one pynetdicom
    association. `on_sent(n)` is called after each batch with the number sent.
    """
    storescu = find_dcmtk("storescu")
    if storescu:
        batch = 16
        for start in range(0, len(files), batch):
            chunk = list(files[start : start + batch])
            result = subprocess.run(
                [storescu, "-aet", calling_ae, "-aec", called_ae, "127.0.0.1", str(port), *map(str, chunk)],
                capture_output=True,
                text=True,
            )
            if result.returncode != 0:
                raise RuntimeError(f"storescu failed: {result.stderr.strip()}")
            if on_sent:
                on_sent(len(chunk))
        return "DCMTK storescu"
    from pynetdicom.sop_class import MRImageStorage

    ae = scu_ae(calling_ae, 30)
    ae.add_requested_context(MRImageStorage)
    request = request_association(ae, "127.0.0.1", port, ae_title=called_ae)  # Nagle off, as the node's own
    assoc = request.assoc
    if not assoc.is_established:
        raise RuntimeError(f"the node refused the association: {request.rejection or 'no reason given'}")
    try:
        for path in files:
            status = assoc.send_c_store(pydicom.dcmread(path))
            if not status or status.Status != 0:
                raise RuntimeError(f"C-STORE of {path.name} failed: {status}")
            if on_sent:
                on_sent(1)
    finally:
        assoc.release()
    return "pynetdicom"
