"""The Store SCP's transport: what pynetdicom's server does not bound, bounded here.

pynetdicom's `AssociationServer` is kept; these subclasses close its gaps
(issue #13 items 3-5), each decision in one place:

- TLS: sockets are wrapped without a handshake in the accept loop. The
  source-address check (`verify_request`) runs first, then the handshake runs
  in the connection's own thread with a timeout (`acse_timeout_s`). One
  silent TCP connection therefore never blocks the accept loop.
- Association slots: `max_associations` counts *established* associations.
  A connection that has not (yet) sent an A-ASSOCIATE-RQ holds none; to keep
  such connections from piling up, one source address may hold at most
  `max_associations` of them at a time (more are closed on accept).
- PDU length: the announced length is checked before the PDU is read. A
  P-DATA-TF longer than our maximum (`max_pdu_kb`, announced in the
  A-ASSOCIATE-AC) or any other PDU over 1 MiB gets an A-ABORT; nothing of it
  is buffered. Reads time out after `network_timeout_s`, also in the middle
  of a PDU.
- Trickling: the command and the data set of a DIMSE message must each arrive
  within `dimse_timeout_s` plus one second per 64 KiB received, else A-ABORT.
  A peer sending a fragment now and then forever is cut off; a slow but real
  transfer (>= 64 KiB/s) is not.
- Memory: a C-STORE data set streams, fragment by fragment, into an
  `IncomingFile` under the data directory's `tmp/` (hashed as it is written)
  and is never assembled in memory. Over `max_instance_mb`: A-ABORT.
- Latency (issue #18): pynetdicom's two reactor threads poll, each sleeping
  1 ms when idle, and a C-STORE crosses both. Here the network thread waits
  on its socket instead (`WakingDUL`), and the association thread waits on
  the message queue (`SpoolingDIMSE.get_msg`): each wakes when its input
  arrives. The file meta of a received instance is encoded directly
  (`file_meta_bytes`), and so is a plain C-STORE-RSP, which the association's
  thread writes on the socket itself (`SpoolingDIMSE._send_directly`) instead
  of queuing it for the network thread's next round. Nagle's algorithm is
  off on the connection (`no_delay`), as on the node's SCU associations
  (pynetdicom leaves it on; a tuned PACS turns it off).
"""

from __future__ import annotations

import queue
import select
import socket
import ssl
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pynetdicom import AE, PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import create_file_meta, encode_file_meta
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from dicom_node.association import no_delay
from dicom_node.logging_setup import get_logger
from storage.instance_store import IncomingFile, InvalidUIDError, validate_uid

log = get_logger(__name__)

P_DATA_TF = 0x04
MAX_OTHER_PDU_BYTES = 1024 * 1024  # A-ASSOCIATE-RQ with many contexts fits easily
MIN_RATE_BYTES_PER_S = 64 * 1024
_ABORT_INVALID_PARAMETER = 0x06
# Longest wait of an idle reactor before it looks at its timers and flags again (pynetdicom: 1 ms).
IDLE_WAIT_S = 0.005


def _explicit_le(group_element: int, vr: bytes, value: bytes) -> bytes:
    """One Explicit VR Little Endian element with a 2-byte length (UI, SH)."""
    return struct.pack("<HH", 2, group_element) + vr + struct.pack("<H", len(value)) + value


_META_VERSION = struct.pack("<HH", 2, 0x0001) + b"OB\x00\x00" + struct.pack("<L", 2) + b"\x00\x01"
_META_IMPLEMENTATION = _explicit_le(
    0x0012, b"UI", PYNETDICOM_IMPLEMENTATION_UID.encode() + b"\x00" * (len(PYNETDICOM_IMPLEMENTATION_UID) % 2)
) + _explicit_le(
    0x0013, b"SH", PYNETDICOM_IMPLEMENTATION_VERSION.encode() + b" " * (len(PYNETDICOM_IMPLEMENTATION_VERSION) % 2)
)


def file_meta_bytes(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> bytes:
    """The File Meta Information group of a received instance, as pynetdicom's
    `encode_file_meta(create_file_meta(...))` writes it, without building a data set;
    raises `InvalidUIDError` for a value that is not a UID."""
    body = _META_VERSION
    for element, (value, what) in (
        (0x0002, (sop_class_uid, "SOP Class UID")),
        (0x0003, (sop_instance_uid, "SOP Instance UID")),
        (0x0010, (transfer_syntax_uid, "Transfer Syntax UID")),
    ):
        encoded = validate_uid(value, what).encode()
        body += _explicit_le(element, b"UI", encoded + b"\x00" * (len(encoded) % 2))
    body += _META_IMPLEMENTATION
    return struct.pack("<HH", 2, 0x0000) + b"UL" + struct.pack("<HL", 4, len(body)) + body


def _implicit_le(element: int, value: bytes) -> bytes:
    """One Implicit VR Little Endian command element (group 0000)."""
    return struct.pack("<HHL", 0, element, len(value)) + value


def _ui(value: str) -> bytes:
    encoded = value.encode("ascii")
    return encoded + b"\x00" * (len(encoded) % 2)


def store_response_command(primitive: C_STORE) -> bytes | None:
    """The command set of a C-STORE-RSP with a status only, as pynetdicom encodes it, or None.

    Why: pynetdicom builds a pydicom data set and encodes it twice (for the
    group length) for every response, about 1 ms of the association thread's
    time per instance. None (pynetdicom encodes it) for anything but a plain
    response: an error comment, an offending element, an absent or non-ASCII UID."""
    if primitive.ErrorComment is not None or primitive.OffendingElement is not None:
        return None
    if not primitive.AffectedSOPClassUID or not primitive.AffectedSOPInstanceUID:
        return None  # pynetdicom leaves an absent UID out (a request without it)
    try:
        body = b"".join(
            (
                _implicit_le(0x0002, _ui(str(primitive.AffectedSOPClassUID))),
                _implicit_le(0x0100, struct.pack("<H", 0x8001)),  # CommandField: C-STORE-RSP
                _implicit_le(0x0120, struct.pack("<H", int(primitive.MessageIDBeingRespondedTo))),
                _implicit_le(0x0800, struct.pack("<H", 0x0101)),  # CommandDataSetType: no data set
                _implicit_le(0x0900, struct.pack("<H", int(primitive.Status))),
                _implicit_le(0x1000, _ui(str(primitive.AffectedSOPInstanceUID))),
            )
        )
    except (UnicodeEncodeError, TypeError, ValueError, struct.error):
        return None
    return _implicit_le(0x0000, struct.pack("<L", len(body))) + body


class NodeAE(AE):
    """An AE whose association limit counts established associations only."""

    @property
    def active_associations(self) -> list[Any]:
        # pynetdicom's acceptor compares len(active acceptors) > maximum_associations while
        # negotiating, in the new association's own thread: count it, and the established ones.
        current = threading.current_thread()
        return [
            assoc
            for assoc in super().active_associations
            if not assoc.is_acceptor or assoc.is_established or assoc is current
        ]


def _pynetdicom_file_meta(command: Any, context: Any) -> bytes:
    """pynetdicom's file meta encoding, for request UIDs `file_meta_bytes` refuses."""
    try:
        return bytes(
            encode_file_meta(
                create_file_meta(
                    sop_class_uid=command.AffectedSOPClassUID,
                    sop_instance_uid=command.AffectedSOPInstanceUID,
                    transfer_syntax=context.transfer_syntax[0],
                )
            )
        )
    except Exception:  # a malformed request UID: the handler finds no file meta and refuses
        return b""  # this thread reads the network and must not die of a peer's data


class SpoolingDIMSE(DIMSEServiceProvider):
    """Writes each C-STORE data set fragment to an `IncomingFile`; pynetdicom sees empty fragments.

    pynetdicom still assembles the command set and sees every fragment's
    control header (so it knows when a message ends), but not the data set
    bytes. The handler takes the file by Message ID (`take`).
    """

    def __init__(self, assoc: Any, open_file: Callable[[bytes], IncomingFile]) -> None:
        super().__init__(assoc)
        self._open_file = open_file
        self._current: IncomingFile | None = None
        self._done: dict[int, IncomingFile] = {}

    def receive_primitive(self, primitive: P_DATA) -> None:
        for context_id, data in primitive.presentation_data_value_list:
            message = self.message
            context = self.assoc._accepted_cx.get(context_id)
            if not data[0] & 1 and isinstance(message, C_STORE_RQ) and context is not None:
                self._spool(message, context, memoryview(data)[1:])
                if data[0] & 2 and self._current is not None:
                    self._done[int(message.command_set.MessageID)] = self._current
                    self._current = None
                data = data[:1]  # the control header only: pynetdicom's data set stays empty
            single = P_DATA()
            single.presentation_data_value_list = [[context_id, data]]
            super().receive_primitive(single)

    def send_msg(self, primitive: Any, context_id: int) -> None:
        """A plain C-STORE-RSP encoded directly (`store_response_command`), anything else by pynetdicom."""
        command = (
            store_response_command(primitive)
            if isinstance(primitive, C_STORE) and primitive.MessageIDBeingRespondedTo is not None
            else None
        )
        if command is None or (self.maximum_pdu_size and len(command) + 6 > self.maximum_pdu_size):
            super().send_msg(primitive, context_id)
            return
        value = b"\x03" + command  # the command's last (only) fragment
        if self._send_directly(context_id, value):
            return
        pdata = P_DATA()
        pdata.presentation_data_value_list.append((context_id, value))
        self.dul.send_pdu(pdata)

    def _send_directly(self, context_id: int, value: bytes) -> bool:
        """Write the P-DATA-TF with `value` on the socket from this (the association's) thread.

        Why: queued to the DUL, a response waits for its reactor's next round
        (up to 1 ms, half of it on average) while the sender waits for the
        response. Only while data transfer is plainly under way: state Sta6,
        nothing queued before it (order kept), no TLS (one SSL object must not
        be written by one thread while another reads it). Otherwise, or if the
        socket fails, False: pynetdicom's queue sends it (and notices the
        closed connection)."""
        sock = self.dul.socket
        if (
            not isinstance(sock, GuardedSocket)
            or isinstance(sock.socket, ssl.SSLSocket)
            or self.dul.state_machine.current_state != "Sta6"
            or not self.dul.to_provider_queue.empty()
        ):
            return False
        item = struct.pack(">LB", len(value) + 1, context_id) + value
        return sock.send_now(struct.pack(">BxL", P_DATA_TF, len(item)) + item)

    def get_msg(self, block: bool = False) -> Any:
        """The next complete message; the association reactor's poll (`block=False`) waits up
        to `IDLE_WAIT_S` for one instead of coming back empty at once (module doc)."""
        if block:
            return super().get_msg(block=True)
        try:
            return self.msg_queue.get(timeout=IDLE_WAIT_S)
        except queue.Empty:
            return None, None

    def _spool(self, message: C_STORE_RQ, context: Any, chunk: memoryview) -> None:
        if self._current is None:
            command = message.command_set
            try:
                meta = file_meta_bytes(
                    command.AffectedSOPClassUID, command.AffectedSOPInstanceUID, context.transfer_syntax[0]
                )
            except InvalidUIDError:  # pynetdicom's encoder decides what it accepts
                meta = _pynetdicom_file_meta(command, context)
            self._current = self._open_file(b"\x00" * 128 + b"DICM" + meta)
        self._current.write(chunk)  # its size is bounded by GuardedSocket (max_instance_mb)

    def take(self, message_id: int) -> IncomingFile | None:
        """The received data set of C-STORE `message_id` (the caller owns it from now on)."""
        return self._done.pop(message_id, None)

    def discard_all(self) -> None:
        """Drop unfinished or untaken files (an aborted or closed association)."""
        for incoming in [self._current, *self._done.values()]:
            if incoming is not None:
                incoming.discard()
        self._current = None
        self._done.clear()


class WakingDUL(DULServiceProvider):
    """pynetdicom's DUL reactor, woken by the peer's data instead of sleeping through it.

    `run_reactor` is pynetdicom 3.0's loop with one change: where it slept
    1 ms after an idle round, it waits on the socket for up to that long, so
    a PDU is read as soon as it arrives. A primitive queued to be sent is
    still picked up within 1 ms: waking the reactor for it (a wake-up socket
    was tried) made the sending thread wait for the GIL, and was slower.
    """

    def __init__(self, assoc: Any) -> None:
        super().__init__(assoc)
        self._kill_thread: bool = False  # pynetdicom's flag, typed for mypy

    def _wait(self) -> None:
        """Until the peer sent something, or `self._run_loop_delay` (1 ms) passed."""
        transport = self.socket.socket if self.socket is not None else None
        if transport is None or transport.fileno() == -1:
            time.sleep(self._run_loop_delay)
            return
        if isinstance(transport, ssl.SSLSocket) and transport.pending():
            return  # decrypted bytes already buffered: select would not see them
        try:
            select.select([transport], [], [], self._run_loop_delay)
        except (OSError, ValueError):  # the transport closed meanwhile: the next round notices
            return

    def run_reactor(self) -> None:
        """pynetdicom's `DULServiceProvider.run_reactor` with `_wait` for its idle sleep."""
        self._idle_timer.start()
        idle = False
        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
                idle = True
            if idle:
                self._wait()
            if self._kill_thread:
                break
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")
            try:
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception as exc:  # as pynetdicom: A-ABORT past the state machine, end both reactors
                log.error("association.dul_failed", reason=str(exc))
                abort_pdu = A_ABORT_RQ()
                abort_pdu.source = 0x02
                abort_pdu.reason_diagnostic = 0x00
                if self.socket is not None:
                    self.socket.send(abort_pdu.encode())
                self.assoc.is_aborted = True
                self.assoc.is_established = False
                self.assoc._kill = True
                self._kill_thread = True
                return
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                idle = True
                continue
            self.state_machine.do_action(event)
            idle = False


class GuardedSocket(AssociationSocket):
    """Checks each PDU's announced length before reading it, times reads out, and stops trickling."""

    def __init__(self, assoc: Any, client_socket: Any, limits: TransportLimits) -> None:
        super().__init__(assoc, client_socket=client_socket)
        self.limits = limits
        client_socket.settimeout(limits.network_timeout_s)  # a half-sent PDU cannot block the reader forever
        no_delay(client_socket)  # a response is never held for the peer's delayed ACK
        self._expect_body: int | None = None  # the PDU type whose body is read next
        self._send_lock = threading.Lock()  # the DUL's sends and `send_now` (another thread) never interleave
        self._segment_started: float | None = None
        self._segment_bytes = 0

    def send(self, bytestream: bytes) -> None:
        """pynetdicom's send (the DUL's thread), serialised with `send_now`."""
        with self._send_lock:
            super().send(bytestream)

    def send_now(self, pdu: bytes) -> bool:
        """Send one encoded PDU from the calling thread. False when there is no open socket (nothing
        sent: the caller queues it to pynetdicom); True once sent, or once the socket failed on it
        (part of it may be out, so it must not be sent again: the connection is closing)."""
        with self._send_lock:
            transport = self.socket
            if transport is None or transport.fileno() == -1:
                return False
            try:
                transport.sendall(pdu)
            except OSError as exc:
                log.warning("association.send_failed", reason=str(exc), address=self._address)
                self.event_queue.put("Evt17")  # as pynetdicom's send: the transport closed
                return True  # part of it may be out: the queue must not send it again
            return True

    def recv(self, nr_bytes: int) -> bytearray:
        """pynetdicom reads a 6-byte PDU header, then the body; a short result means "closed" to it."""
        if self._expect_body is not None:
            pdu_type, self._expect_body = self._expect_body, None
            limit = self.limits.max_pdu_bytes if pdu_type == P_DATA_TF else MAX_OTHER_PDU_BYTES
            if nr_bytes > limit:
                return self._abort(
                    f"PDU of type 0x{pdu_type:02X} announces {nr_bytes} bytes, over the limit of {limit}"
                )
            body = self._read(nr_bytes)
            if pdu_type == P_DATA_TF and len(body) == nr_bytes:
                reason = self._check_progress(body)
                if reason is not None:
                    return self._abort(reason)
            return body
        header = self._read(nr_bytes)
        if nr_bytes == 6 and len(header) == 6 and 0x01 <= header[0] <= 0x07:
            self._expect_body = header[0]
        return header

    def _read(self, nr_bytes: int) -> bytearray:
        """Exactly `nr_bytes`, or fewer if the peer closed or went silent for `network_timeout_s`."""
        buffer = bytearray(nr_bytes)
        got = 0
        with memoryview(buffer) as view:
            try:
                while got < nr_bytes:
                    n = self.socket.recv_into(view[got:], nr_bytes - got)
                    if n == 0:
                        break
                    got += n
            except OSError as exc:  # TimeoutError included: a half-sent PDU
                log.warning("association.read_failed", reason=str(exc) or "timed out", address=self._address)
        del buffer[got:]
        return buffer

    @property
    def _address(self) -> str | None:
        return self.assoc.requestor.address

    def _check_progress(self, body: bytearray) -> str | None:
        """Why to abort, if a message part (command or data set) is too slow or a data set too large."""
        now = time.monotonic()
        offset = 0
        while offset + 6 <= len(body):
            (item_length,) = struct.unpack_from(">L", body, offset)
            control = body[offset + 5]
            if self._segment_started is None:
                self._segment_started, self._segment_bytes = now, 0
            self._segment_bytes += max(item_length - 2, 0)
            allowed = self.limits.dimse_timeout_s + self._segment_bytes / MIN_RATE_BYTES_PER_S
            if now - self._segment_started > allowed:
                return (
                    f"message arriving too slowly: {self._segment_bytes} bytes in "
                    f"{now - self._segment_started:.0f} s (allowed {allowed:.0f} s at 64 KiB/s)"
                )
            if not control & 1 and self._segment_bytes > self.limits.max_instance_bytes:
                return f"data set larger than max_instance_mb ({self.limits.max_instance_bytes // 2**20} MiB)"
            if control & 2:  # the last fragment of this command or data set
                self._segment_started = None
            offset += 4 + item_length
        return None

    def _abort(self, reason: str) -> bytearray:
        """Send A-ABORT and close; the empty result tells pynetdicom the connection is gone."""
        log.warning("association.aborted_limit", reason=reason, address=self._address)
        pdu = A_ABORT_RQ()
        pdu.source = 0x02
        pdu.reason_diagnostic = _ABORT_INVALID_PARAMETER
        try:
            self.socket.sendall(pdu.encode())
            self.socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        return bytearray()


@dataclass(frozen=True)
class TransportLimits:
    """The numbers the transport enforces (from `NodeSettings`)."""

    max_pdu_bytes: int
    max_instance_bytes: int
    handshake_timeout_s: float
    network_timeout_s: float
    dimse_timeout_s: float
    max_pending_per_address: int


class NodeRequestHandler(RequestHandler):
    """Runs in the connection's own thread: TLS handshake (bounded), then pynetdicom's association."""

    server: NodeAssociationServer

    def handle(self) -> None:
        address = self.client_address[0]
        try:
            if isinstance(self.request, ssl.SSLSocket):
                try:
                    self.request.settimeout(self.server.limits.handshake_timeout_s)
                    self.request.do_handshake()
                except (OSError, ValueError) as exc:
                    log.warning("association.tls_handshake_failed", address=address, reason=str(exc) or "timed out")
                    self.server.shutdown_request(self.request)
                    return
        finally:
            self.server.handshake_done(address)
        super().handle()

    def _create_association(self) -> Any:
        """pynetdicom's `RequestHandler._create_association` with the node's socket and DIMSE provider."""
        from copy import deepcopy
        from datetime import datetime

        from pynetdicom import evt
        from pynetdicom._globals import MODE_ACCEPTOR
        from pynetdicom.association import Association

        server, ae = self.server, self.server.ae
        assoc = Association(ae, MODE_ACCEPTOR)
        assoc._server = server
        assoc.name = f"AcceptorThread@{datetime.now():%Y%m%d%H%M%S}"
        assoc.dul = WakingDUL(assoc)  # before the socket, which is handed to the DUL
        assoc.acse_timeout, assoc.network_timeout = ae.acse_timeout, ae.network_timeout  # the DUL's timers
        assoc.set_socket(GuardedSocket(assoc, self.request, server.limits))
        assoc.dimse = SpoolingDIMSE(assoc, server.open_incoming)
        assoc.acceptor.maximum_length = ae.maximum_pdu_size
        assoc.acceptor.ae_title = server.ae_title
        assoc.acceptor.address_info = self.local
        assoc.acceptor.implementation_class_uid = ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = ae.implementation_version_name
        assoc.acceptor.supported_contexts = deepcopy(server.contexts)
        assoc.requestor.address_info = self.remote
        for event, handlers in server._handlers.items():
            if event.is_intervention and handlers:
                assoc.bind(event, *handlers)
            elif isinstance(event, evt.NotificationEvent):
                for handler, args in handlers:
                    assoc.bind(event, handler, args)
        return assoc


class NodeAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the node's accept policy (module doc)."""

    def __init__(
        self,
        *args: Any,
        limits: TransportLimits,
        open_incoming: Callable[[bytes], IncomingFile],
        address_allowed: Callable[[str], bool],
        **kwargs: Any,
    ) -> None:
        self.limits = limits
        self.open_incoming = open_incoming
        self._address_allowed = address_allowed
        self._handshaking: Counter[str] = Counter()
        self._lock = threading.Lock()
        super().__init__(*args, request_handler=NodeRequestHandler, **kwargs)

    def get_request(self) -> tuple[Any, Any]:
        """Accept; wrap for TLS without handshaking (that happens in the connection's thread)."""
        client, address = self.socket.accept()
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Source-address allow-list, then the per-address cap on not-yet-associated connections."""
        address = client_address[0]
        if not self._address_allowed(address):
            log.warning("association.refused_address", address=address)
            return False
        pending = sum(
            1 for assoc in self.active_associations if not assoc.is_established and assoc.requestor.address == address
        )
        with self._lock:
            if pending + self._handshaking[address] >= self.limits.max_pending_per_address:
                log.warning("association.refused_pending", address=address, pending=pending)
                return False
            self._handshaking[address] += 1
        return True

    def handshake_done(self, address: str) -> None:
        with self._lock:
            self._handshaking[address] -= 1
            if self._handshaking[address] <= 0:
                del self._handshaking[address]
