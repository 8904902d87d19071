"""Requesting an association as an SCU: bounded waits, and the peer's A-ASSOCIATE-RJ reason.

Every wait of an SCU is bounded (`scu_ae`), the TCP connect and TLS handshake
included: pynetdicom leaves `connection_timeout` unset, and a destination that
accepts TCP and never answers a TLS handshake then held the exporter, and with
it the exports to every destination, until that peer hung up.

Why `request_association` exists: a peer that rejects an association and closes the connection
at once (DCMTK `storescp --refuse` does) races pynetdicom 3.0. Its state
machine may see the closed transport before the association thread reads the
rejection, and then reports the association as aborted instead of rejected.
This happened in about 1 of 4 tries on loopback. The A-ASSOCIATE-RJ PDU is
decoded in either case, so the reason is taken from EVT_PDU_RECV. An operator
then reads "rejected (reason)" and not "could not be reached", which points
the wrong way.

For the same reason the request tells apart a peer that accepted the
association but none of the proposed presentation contexts (pynetdicom then
aborts it): that is a configuration mismatch, not an unreachable peer.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pynetdicom is imported where it is used: `dicom-node --help` stays fast
    from pynetdicom import AE
    from pynetdicom.association import Association


def no_delay(sock: socket.socket) -> None:
    """Turn Nagle's algorithm off on an association's TCP socket (DCMTK: `TCP_NODELAY=1`).

    Why: pynetdicom leaves it on, and so does current DCMTK unless told. DICOM
    writes a PDU whole and then waits for the peer's answer; with Nagle on, a
    PDU written right after another (a C-STORE's data set after its command) is
    held until the peer ACKs the first, and the peer delays that ACK (up to
    40 ms on Linux). Measured (bench/ingest.py): the
    exporter sent a job's RTSTRUCT + SR in 0.113 s with Nagle and 0.026-0.036 s
    without (DCMTK `storescu`: 0.027 s). A socket that refuses the option is left as it is."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):  # not TCP (e.g. a test's socketpair), or already closed
        pass


def _no_delay_on_connect(event: Any) -> None:
    """EVT_CONN_OPEN of an SCU association: fires after the TCP connect, before the A-ASSOCIATE-RQ."""
    transport = event.assoc.dul.socket
    if transport is not None and transport.socket is not None:
        no_delay(transport.socket)


def scu_ae(ae_title: str, timeout_s: float) -> AE:
    """An SCU AE whose connect/handshake, negotiation, DIMSE and network waits all end after `timeout_s`."""
    from pynetdicom import AE

    ae = AE(ae_title=ae_title)
    ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    return ae


@dataclass(frozen=True)
class AssociationRequest:
    """The association and, when the peer refused it, why.

    `rejection`: the peer's A-ASSOCIATE-RJ (result, source, reason); `rejected_permanently`
    when its result was *rejected-permanent* (a retry gets the same answer).
    `contexts_refused`: the peer accepted the association but none of the proposed
    presentation contexts; each one's SOP class and result.
    """

    assoc: Association
    rejection: str | None
    rejected_permanently: bool = False
    contexts_refused: str | None = None

    @property
    def rejected(self) -> bool:
        return self.rejection is not None


def request_association(
    ae: AE,
    host: str,
    port: int,
    *,
    ae_title: str,
    ssl_context: ssl.SSLContext | None = None,
    evt_handlers: list[tuple[Any, Any]] | None = None,
) -> AssociationRequest:
    """`ae.associate(...)`; raises what pynetdicom raises (e.g. a TLS handshake error).

    `evt_handlers`: more handlers for the association (e.g. EVT_N_EVENT_REPORT for a Storage Commitment report).
    """
    from pynetdicom import evt
    from pynetdicom.pdu import A_ASSOCIATE_RJ

    rejections: list[tuple[str, bool]] = []
    refused: list[str] = []

    def on_pdu(event: Any) -> None:
        if isinstance(event.pdu, A_ASSOCIATE_RJ):
            primitive = event.pdu.to_primitive()
            text = f"{primitive.result_str}, source {primitive.source_str}: {primitive.reason_str}"
            rejections.append((text, primitive.result == REJECTED_PERMANENT))

    def on_accepted(event: Any) -> None:
        if not event.assoc.accepted_contexts:
            refused.extend(f"{cx.abstract_syntax.name} ({cx.status})" for cx in event.assoc.rejected_contexts)

    assoc = ae.associate(
        host,
        port,
        ae_title=ae_title,
        tls_args=(ssl_context, host) if ssl_context is not None else None,
        evt_handlers=[
            (evt.EVT_CONN_OPEN, _no_delay_on_connect),
            (evt.EVT_PDU_RECV, on_pdu),
            (evt.EVT_ACCEPTED, on_accepted),
            *(evt_handlers or []),
        ],
    )
    if rejections:
        return AssociationRequest(assoc, *rejections[0])
    if assoc.is_rejected:
        return AssociationRequest(assoc, "no reason given")
    return AssociationRequest(assoc, None, contexts_refused=", ".join(refused) or None)


REJECTED_PERMANENT = 0x01  # A-ASSOCIATE-RJ Result (PS3.8 9.3.4); 0x02 is rejected-transient
