"""The Store SCP's resource limits (issue #13 items 3-5): TLS handshakes, association
slots, PDU length, trickling, instance size. Each test is a fault an outside review
reproduced; raw sockets play the misbehaving peer, pynetdicom the honest one."""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file
from pynetdicom import AE
from pynetdicom.sop_class import MRImageStorage

from dicom_node.settings import TlsSettings
from tests.dicom_node.certificates import Pki, make_pki
from tests.reliability.conftest import SUCCESS, echo_ok, pynetdicom_statuses

A_ABORT = 0x07


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def silent_connection(port: int, source: str = "127.0.0.1") -> socket.socket:
    """A TCP connection that never sends a byte (a port scanner, a stalled peer, an attacker)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    sock.settimeout(10)
    return sock


def closed_within(sock: socket.socket, seconds: float) -> bytes | None:
    """What the node sent before closing, or None if it kept the connection open for `seconds`."""
    sock.settimeout(seconds)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return received


def tls_store(port: int, pki: Pki, path: Path) -> int | None:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(MRImageStorage)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = ae.connection_timeout = 5
    from dicom_node.tls import client_ssl_context

    context = client_ssl_context(TlsSettings(enabled=True, ca_file=pki.ca_file))
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE", tls_args=(context, "127.0.0.1"))
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_store(path)
        return int(status.Status) if "Status" in status else None
    finally:
        assoc.release()


def tls_env(pki: Pki) -> dict[str, str]:
    return {
        "DICOM_NODE__NODE__TLS__ENABLED": "true",
        "DICOM_NODE__NODE__TLS__CERT_FILE": str(pki.server_cert),
        "DICOM_NODE__NODE__TLS__KEY_FILE": str(pki.server_key),
    }


def test_a_silent_tcp_connection_does_not_stop_tls_associations(start_node, pki, mr_series):
    node = start_node(**tls_env(pki), DICOM_NODE__NODE__ACSE_TIMEOUT_S="2")
    port = node.address[1]
    silent = silent_connection(port)
    try:
        started = time.monotonic()
        assert tls_store(port, pki, mr_series[0]) == SUCCESS
        assert time.monotonic() - started < 4
        # The silent one's handshake times out after acse_timeout_s and it is closed.
        assert closed_within(silent, 6) is not None
    finally:
        silent.close()


def test_the_source_address_is_checked_before_the_tls_handshake(start_node, pki):
    node = start_node(**tls_env(pki), DICOM_NODE__NODE__ALLOWED_SOURCE_ADDRESSES='["10.0.0.0/8"]')
    silent = silent_connection(node.address[1])
    try:
        assert closed_within(silent, 3) == b""  # closed at once, no handshake awaited
    finally:
        silent.close()


def test_connections_not_yet_associated_hold_no_association_slot(start_node):
    node = start_node(DICOM_NODE__NODE__MAX_ASSOCIATIONS="2")
    port = node.address[1]
    silent = [silent_connection(port, "127.0.0.2") for _ in range(2)]
    try:
        time.sleep(0.3)
        assert echo_ok(port)
        # One source address may hold at most max_associations such connections.
        third = silent_connection(port, "127.0.0.2")
        assert closed_within(third, 3) == b""
        third.close()
    finally:
        for sock in silent:
            sock.close()


def test_a_pdu_announced_larger_than_our_maximum_is_aborted_unread(start_node):
    node = start_node(DICOM_NODE__NODE__MAX_PDU_KB="64")
    with socket.create_connection(("127.0.0.1", node.address[1]), timeout=10) as sock:
        sock.sendall(struct.pack(">BBL", 0x04, 0, 300 * 1024 * 1024) + b"\x00" * 65536)
        answer = closed_within(sock, 5)
    assert answer is not None and answer[:1] == bytes([A_ABORT])
    assert echo_ok(node.address[1])


def test_an_association_trickling_fragments_is_aborted(start_node):
    node = start_node(DICOM_NODE__NODE__DIMSE_TIMEOUT_S="1", DICOM_NODE__NODE__NETWORK_TIMEOUT_S="5")
    ae = AE(ae_title="TRICKLE")
    ae.add_requested_context(MRImageStorage)
    assoc = ae.associate("127.0.0.1", node.address[1], ae_title="DICOMNODE")
    assert assoc.is_established
    context_id = assoc.accepted_contexts[0].context_id
    raw = assoc.dul.socket.socket
    fragment = struct.pack(">BBLLBB", 0x04, 0, 4 + 2 + 1, 2 + 1, context_id, 0x01) + b"\x00"  # command, not last
    started = time.monotonic()
    try:
        while assoc.is_established and time.monotonic() - started < 10:
            raw.sendall(fragment)
            time.sleep(0.3)
    except OSError:
        pass  # the node closed the connection
    assert time.monotonic() - started < 5
    deadline = time.monotonic() + 5
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not assoc.is_established
    assert echo_ok(node.address[1])


def test_an_instance_over_max_instance_mb_is_aborted_and_nothing_is_kept(start_node, tmp_path):
    import numpy as np
    import pydicom

    node = start_node(DICOM_NODE__NODE__MAX_INSTANCE_MB="1")
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.Rows = ds.Columns = 1024
    ds.PixelData = np.zeros((1024, 1024), dtype=np.uint16).tobytes()  # 2 MiB
    big = tmp_path / "big.dcm"
    ds.save_as(big)
    assert pynetdicom_statuses(node.address[1], [big]) == {big: None}
    assert not list((node.store.root / "instances").rglob("*.dcm"))
    assert echo_ok(node.address[1])
    assert not list(node.store.tmp_dir.iterdir())
