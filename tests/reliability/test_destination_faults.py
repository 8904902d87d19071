"""Destination faults not covered by tests/dicom_node/test_exporter.py (which checks a
refused association, a failure status, a slow peer and a peer that comes up late):
a destination that drops the association in the middle of a transfer, and one that
dies while the exporter is connected. Each is retried with backoff, then `failed`
with its reason, and re-sendable (`dicom-node jobs export`)."""

from __future__ import annotations

import socket
import struct
import threading

from pynetdicom import AE, AllStoragePresentationContexts, evt

from storage.models import JobState
from tests.dicom_node.test_exporter import (
    assert_resend_delivers,
    exporter_for,
    exporting_job,
    free_port,
    run_until_settled,
)


class DroppingSCP:
    """A Store SCP that aborts the association (A-ABORT) when a C-STORE arrives, or,
    with `hard`, closes the TCP connection without any PDU."""

    def __init__(self, port: int, *, hard: bool = False):
        self.attempts = 0
        self.hard = hard
        ae = AE(ae_title="TPS")
        ae.supported_contexts = AllStoragePresentationContexts
        self.server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, self.handle)])

    def handle(self, event):
        self.attempts += 1
        if self.hard:
            sock = event.assoc.dul.socket.socket
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
            sock.close()
        else:
            threading.Thread(target=event.assoc.abort).start()
        return 0xA700  # never reaches the exporter

    def stop(self):
        self.server.shutdown()


def _check_dropped_then_resent(node, mr_series, hard: bool):
    port = free_port()
    job_id, _ = exporting_job(node, mr_series[0], ["tps"])
    scp = DroppingSCP(port, hard=hard)
    try:
        job = run_until_settled(exporter_for(node, port, give_up_after_s=2.5, dimse_timeout_s=2.0), node, job_id)
    finally:
        scp.stop()
    print(f"\nDESTINATION {'reset' if hard else 'abort'}: {job.reason}")
    assert job.state == JobState.FAILED
    assert scp.attempts >= 2 and job.exports[0].attempts >= 2  # retried
    assert "export to tps failed" in job.reason
    assert (
        "did not answer" in job.reason or "dropped" in job.reason or "could not be reached or aborted" in job.reason
    ), job.reason
    attempts = [e.message for e in job.events if e.kind.value == "export"]
    assert any("next attempt at" in m for m in attempts) and "giving up" in attempts[-1]

    assert_resend_delivers(node, job_id, port)


def test_destination_aborting_mid_transfer_is_retried_failed_and_resendable(unstarted_node, mr_series):
    _check_dropped_then_resent(unstarted_node, mr_series, hard=False)


def test_destination_resetting_the_connection_mid_transfer(unstarted_node, mr_series):
    _check_dropped_then_resent(unstarted_node, mr_series, hard=True)
