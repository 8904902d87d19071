"""C-ECHO SCU: "can this peer be reached as a DICOM application?", the first
check after installing the node or adding a destination.

Decisions recorded here: the outcome is returned as a value (never raised) with
a sentence saying what happened at which step (connect, association, status),
including the peer's A-ASSOCIATE-RJ reason, because that sentence is what an
operator needs when a PACS refuses us.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from dicom_node.association import request_association, scu_ae
from dicom_node.settings import TlsSettings
from dicom_node.status_codes import SUCCESS
from dicom_node.tls import client_ssl_context


@dataclass(frozen=True)
class EchoResult:
    """Outcome of one C-ECHO: ``status`` is None when no response was received."""

    ok: bool
    status: int | None
    message: str
    elapsed_s: float


def send_echo(
    host: str,
    port: int,
    *,
    calling_ae_title: str,
    called_ae_title: str,
    tls: TlsSettings | None = None,
    timeout_s: float = 10.0,
) -> EchoResult:
    """Associate, send one C-ECHO, release."""
    from pynetdicom.sop_class import Verification

    start = time.perf_counter()
    ssl_context = client_ssl_context(tls) if tls is not None else None
    ae = scu_ae(calling_ae_title, timeout_s)
    ae.add_requested_context(Verification)
    peer = f"{called_ae_title}@{host}:{port}"
    request = request_association(ae, host, port, ae_title=called_ae_title, ssl_context=ssl_context)
    assoc = request.assoc
    try:
        if request.rejected:
            return _result(False, None, f"association rejected by {peer} ({request.rejection})", start)
        if not assoc.is_established:
            why = "connection refused, timed out or aborted"
            return _result(False, None, f"no association with {peer}: {why}", start)
        response = assoc.send_c_echo()
        status = int(response.Status) if "Status" in response else None
        if status is None:
            return _result(False, None, f"no C-ECHO response from {peer} (timeout or abort)", start)
        if status != SUCCESS:
            return _result(False, status, f"C-ECHO to {peer} failed with status 0x{status:04X}", start)
        return _result(True, status, f"C-ECHO to {peer}: success (0x0000)", start)
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


def _result(ok: bool, status: int | None, message: str, start: float) -> EchoResult:
    return EchoResult(ok, status, message, time.perf_counter() - start)
