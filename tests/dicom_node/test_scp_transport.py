"""The receive path's speed mechanisms (issue #18) keep their contracts.

- `file_meta_bytes` writes what pynetdicom's encoder writes, and refuses non-UIDs;
- `IncomingFile.place` (rename, then file and directory fsync'd together):
  the file is complete under its name, nothing is left in `tmp/`, and a
  failure removes it from its target, and disk full in the network thread is
  kept for the handler;
- a plain C-STORE-RSP is written on the socket by the association's thread
  (not queued to the DUL reactor), as the same PDU pynetdicom would send;
- the fast insert path keeps the per-series count exact over parallel
  associations, and a series re-sent after evaluation opens a new job.
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE, evt
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import create_file_meta, encode, encode_file_meta
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import MRImageStorage
from sqlalchemy import func, select, update

from dicom_node import status_codes
from dicom_node.association import request_association, scu_ae
from dicom_node.scp_transport import GuardedSocket, file_meta_bytes, store_response_command
from storage.instance_store import InstanceStore, InvalidUIDError, sha256_file
from storage.models import Instance, Job, JobState, Series, utcnow
from tests.dicom_node.conftest import storescu

MR = "1.2.840.10008.5.1.4.1.1.4"


@pytest.mark.parametrize(
    ("sop_instance_uid", "transfer_syntax"),
    [
        ("1.2.3.4", "1.2.840.10008.1.2.1"),
        ("1.2.3.45", "1.2.840.10008.1.2"),
        ("2.25." + "9" * 59, "1.2.840.10008.1.2.4.90"),
    ],
)
def test_file_meta_bytes_are_pynetdicoms_encoding(sop_instance_uid, transfer_syntax):
    expected = encode_file_meta(
        create_file_meta(sop_class_uid=MR, sop_instance_uid=sop_instance_uid, transfer_syntax=transfer_syntax)
    )
    assert file_meta_bytes(MR, sop_instance_uid, transfer_syntax) == bytes(expected)


@pytest.mark.parametrize(
    ("sop_instance_uid", "message_id", "status"),
    [("1.2.3.4", 1, 0x0000), ("1.2.3.45", 65535, 0xA700), ("2.25." + "9" * 59, 7, 0xC000)],
)
def test_store_response_command_is_pynetdicoms_encoding(sop_instance_uid, message_id, status):
    """The C-STORE-RSP command set encoded without pydicom (issue #18) is byte for byte pynetdicom's."""
    response = C_STORE()
    response.MessageIDBeingRespondedTo = message_id
    response.AffectedSOPClassUID = MR
    response.AffectedSOPInstanceUID = sop_instance_uid
    response.Status = status
    message = C_STORE_RSP()
    message.primitive_to_message(response)
    assert store_response_command(response) == encode(message.command_set, True, True)


@pytest.mark.parametrize(
    ("sop_class_uid", "sop_instance_uid", "error_comment"),
    [(MR, "1.2.3", "why"), (None, "1.2.3", None), (MR, None, None)],
)
def test_store_response_command_leaves_other_responses_to_pynetdicom(sop_class_uid, sop_instance_uid, error_comment):
    """An error comment, or a UID the request lacked (pynetdicom leaves it out): pynetdicom encodes it."""
    response = C_STORE()
    response.MessageIDBeingRespondedTo, response.Status = 1, 0xC000
    if sop_class_uid is not None:
        response.AffectedSOPClassUID = sop_class_uid
    if sop_instance_uid is not None:
        response.AffectedSOPInstanceUID = sop_instance_uid
    if error_comment is not None:
        response.ErrorComment = error_comment
    assert store_response_command(response) is None


@pytest.mark.parametrize("bad", ["", "1.2.3.", "1.2.x", "../1", "1." + "2" * 70])
def test_file_meta_bytes_refuse_values_that_are_not_uids(bad):
    with pytest.raises(InvalidUIDError):
        file_meta_bytes(MR, bad, "1.2.840.10008.1.2.1")


def test_place_makes_the_file_complete_under_its_name(tmp_path):
    store = InstanceStore(tmp_path / "data")
    incoming = store.incoming(b"header")
    for _ in range(64):
        incoming.write(os.urandom(8192))
    digest = incoming.sha256
    store.place(incoming, "instances/1.2/1.2.3/1.2.3.4.dcm")
    target = store.absolute("instances/1.2/1.2.3/1.2.3.4.dcm")
    assert target.stat().st_size == len(b"header") + 64 * 8192
    assert sha256_file(target) == digest
    assert list(store.tmp_dir.iterdir()) == []
    incoming.discard()  # what the caller's `finally` does: the placed file stays
    assert target.exists()


class _DiskFullHandle:
    """A file handle on a full disk: the buffered bytes cannot be flushed, so close fails too."""

    def __init__(self, handle):
        self._handle = handle

    def write(self, chunk):
        raise OSError(28, "No space left on device (simulated)")

    def flush(self):
        raise OSError(28, "No space left on device (simulated)")

    def close(self):
        self._handle.close()
        raise OSError(28, "No space left on device (simulated)")


def test_a_full_disk_in_the_network_thread_is_kept_for_the_handler_not_raised(tmp_path):
    """An outside review: disk full at a write made the close in `discard` re-raise it in the network
    thread, which died; the sender got no response and tmp/ kept the file."""
    store = InstanceStore(tmp_path / "data")
    incoming = store.incoming(b"header")
    incoming._handle = _DiskFullHandle(incoming._handle)
    incoming.write(b"more")  # does not raise
    assert isinstance(incoming.error, OSError) and incoming.error.errno == 28
    with pytest.raises(OSError, match="No space left"):
        incoming.complete()  # where the handler finds it, and answers Out of Resources
    assert list(store.tmp_dir.iterdir()) == []


def test_place_that_fails_leaves_nothing_under_the_target(tmp_path):
    store = InstanceStore(tmp_path / "data")
    incoming = store.incoming(b"x" * 100)
    blocker = store.root / "instances" / "1.2"
    blocker.write_text("a file where the study folder should be")  # the rename target's parent is not a folder
    with pytest.raises(OSError):
        store.place(incoming, "instances/1.2/1.2.3/1.2.3.4.dcm")
    incoming.discard()
    assert list(store.tmp_dir.iterdir()) == []
    assert blocker.read_text().startswith("a file")


def test_a_store_response_is_written_directly_as_the_pdu_pynetdicom_would_send(start_node, mr_series, monkeypatch):
    """Each C-STORE-RSP reaches a pynetdicom SCU as one P-DATA-TF, byte for byte what pynetdicom's
    DUL would have sent, written by the association's thread (`GuardedSocket.send_now`)."""
    direct: list[bytes] = []
    real_send_now = GuardedSocket.send_now

    def spied(self: GuardedSocket, pdu: bytes) -> bool:
        direct.append(pdu)
        return real_send_now(self, pdu)

    monkeypatch.setattr(GuardedSocket, "send_now", spied)
    node = start_node()
    received: list[bytes] = []
    message_ids: list[int] = []
    ae = AE(ae_title="DIRECT")
    ae.add_requested_context(MRImageStorage)
    assoc = ae.associate(
        "127.0.0.1",
        node.address[1],
        ae_title="DICOMNODE",
        evt_handlers=[
            (evt.EVT_DATA_RECV, lambda event: received.append(bytes(event.data))),
            (evt.EVT_DIMSE_SENT, lambda event: message_ids.append(int(event.message.command_set.MessageID))),
        ],
    )
    assert assoc.is_established
    try:
        requests = [pydicom.dcmread(path) for path in mr_series[:3]]
        statuses = [assoc.send_c_store(ds).Status for ds in requests]
        context_id = assoc.accepted_contexts[0].context_id
    finally:
        assoc.release()
    assert statuses == [0x0000] * 3
    responses = [pdu for pdu in received if pdu[0] == 0x04]  # the P-DATA-TFs (not the A-RELEASE-RP)
    expected = []
    for message_id, ds in zip(message_ids, requests, strict=True):
        response = C_STORE()
        response.MessageIDBeingRespondedTo = message_id
        response.AffectedSOPClassUID, response.AffectedSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
        response.Status = 0x0000
        message = C_STORE_RSP()
        message.primitive_to_message(response)
        [primitive] = message.encode_msg(context_id, 16382)
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        expected.append(pdu.encode())
    assert responses == expected
    assert direct == expected


def test_both_ends_of_a_node_association_turn_nagle_off(start_node, mr_series, monkeypatch):
    """TCP_NODELAY on the node's accepted socket and on its SCU socket (`request_association`):
    with Nagle on, a C-STORE's data set written after its command waited for the peer's
    delayed ACK (the exporter took 0.113 s instead of 0.026-0.036 s for RTSTRUCT + SR)."""
    accepted: list[GuardedSocket] = []
    real_init = GuardedSocket.__init__

    def recording(self: GuardedSocket, *args, **kwargs) -> None:
        real_init(self, *args, **kwargs)
        accepted.append(self)

    monkeypatch.setattr(GuardedSocket, "__init__", recording)
    node = start_node()
    ae = scu_ae("NAGLE", 10)
    ae.add_requested_context(MRImageStorage)
    request = request_association(ae, "127.0.0.1", node.address[1], ae_title="DICOMNODE")
    assert request.assoc.is_established
    try:
        assert request.assoc.send_c_store(mr_series[0]).Status == 0x0000
        sockets = {"SCU": request.assoc.dul.socket.socket, "SCP": accepted[0].socket}
        nodelay = {end: sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for end, sock in sockets.items()}
    finally:
        request.assoc.release()
    assert len(accepted) == 1
    assert nodelay["SCU"] and nodelay["SCP"], nodelay


def _send(port: int, files: list[Path], statuses: list[int]) -> None:
    ae = AE(ae_title="PARALLEL")
    ae.add_requested_context(MRImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert assoc.is_established
    try:
        for path in files:
            statuses.append(assoc.send_c_store(path).Status)
    finally:
        assoc.release()


def test_parallel_associations_into_one_series_count_every_instance(start_node, mr_series):
    """Four associations store one series' instances at once: rows, count and files agree."""
    node = start_node()
    port = node.address[1]
    statuses: list[int] = []
    threads = [threading.Thread(target=_send, args=(port, mr_series[k::4], statuses)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert statuses == [status_codes.SUCCESS] * len(mr_series)
    with node.db.session() as session:
        series = session.scalars(select(Series)).one()
        rows = session.scalar(select(func.count()).select_from(Instance))
        jobs = session.scalar(select(func.count()).select_from(Job))
        paths = list(session.scalars(select(Instance.path)))
    assert rows == series.instance_count == len(mr_series)
    assert jobs == 1
    assert all(node.store.absolute(path).is_file() for path in paths)


def test_instances_after_evaluation_open_a_new_job(start_node, mr_series):
    """The fast path steps aside for a new delivery: the ORM path opens its job."""
    node = start_node()
    port = node.address[1]
    assert storescu(port, mr_series[:4]).returncode == 0
    with node.db.session() as session:
        session.execute(update(Series).values(evaluated_at=utcnow()))  # what the watcher does,
        session.execute(update(Job).values(state=JobState.REJECTED))  # with a rule that matched nothing
    assert storescu(port, mr_series[4:8]).returncode == 0
    with node.db.session() as session:
        series = session.scalars(select(Series)).one()
        jobs = session.scalar(select(func.count()).select_from(Job))
    assert series.instance_count == 8
    assert jobs == 2


def test_an_evaluated_series_re_sent_over_two_associations_at_once_opens_one_job(start_node, mr_series, monkeypatch):
    """Both associations' first instance of the new delivery look for its job before either opens one
    (staged: each waits after its look for the other's), and still one job is opened (schema revision 0005)."""
    import storage.ingest as ingest

    node = start_node()
    port = node.address[1]
    assert storescu(port, mr_series[:4]).returncode == 0
    with node.db.session() as session:
        session.execute(update(Series).values(evaluated_at=utcnow()))  # what the watcher does,
        session.execute(update(Job).values(state=JobState.REJECTED))  # with a rule that matched nothing
    barrier, met, first = threading.Barrier(2, timeout=20), [], threading.local()
    real = ingest.open_job_on_first_instance

    def looking_together(*args):
        job = real(*args)
        if not getattr(first, "done", False):
            first.done = True
            barrier.wait()
            met.append(threading.current_thread().name)
        return job

    monkeypatch.setattr(ingest, "open_job_on_first_instance", looking_together)
    statuses: list[int] = []
    # Each association's first instance on its own stripe of the per-UID lock (str hashes vary per
    # process): on one, the second would wait for the first, which waits at the barrier for it.
    rest = list(mr_series[4:])
    stripe = {
        p: hash(str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)) % len(ingest._LOCKS) for p in rest
    }
    second = next(p for p in rest[1:] if stripe[p] != stripe[rest[0]])
    rest.remove(second)
    batches = [[rest[0], *rest[2::2]], [second, *rest[1::2]]]
    threads = [threading.Thread(target=_send, args=(port, batch, statuses)) for batch in batches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert statuses == [status_codes.SUCCESS] * (len(mr_series) - 4)
    assert len(met) == 2  # the two first instances raced
    with node.db.session() as session:
        series = session.scalars(select(Series)).one()
        states = sorted(j.state.value for j in session.scalars(select(Job)))
    assert series.instance_count == len(mr_series)
    assert states == ["received", "rejected"]
