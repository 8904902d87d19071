"""Security: TLS on the Store SCP (optionally mutual), TLS exports, calling-AE and
source-address allow-lists, and no patient names in the logs of a full run.

Certificates are made in the test (tests/dicom_node/certificates.py). The systemd
unit's unprivileged user is checked by tests/dicom_node/test_systemd_unit.py.
"""

from __future__ import annotations

import io
import socket
import subprocess
import time

import pydicom
import pytest
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import MRImageStorage

from dicom_node.exporter import Exporter
from dicom_node.logging_setup import configure_logging
from dicom_node.peers import free_port
from dicom_node.settings import Destination, ExportSettings, LoggingSettings, TlsSettings
from dicom_node.tls import client_ssl_context, server_ssl_context
from storage.jobs import load_job
from storage.models import JobState
from tests.dicom_node.certificates import Pki, make_pki
from tests.dicom_node.conftest import exporting_job, run_until_settled
from tests.reliability.conftest import NO_DESTINATION_RULES, SUCCESS, audit_store, echo_ok, require_tool, settled


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_env(pki: Pki, *, require_client_cert: bool = False) -> dict[str, str]:
    env = {
        "DICOM_NODE__NODE__TLS__ENABLED": "true",
        "DICOM_NODE__NODE__TLS__CERT_FILE": str(pki.server_cert),
        "DICOM_NODE__NODE__TLS__KEY_FILE": str(pki.server_key),
    }
    if require_client_cert:
        env |= {
            "DICOM_NODE__NODE__TLS__CA_FILE": str(pki.ca_file),
            "DICOM_NODE__NODE__TLS__REQUIRE_CLIENT_CERT": "true",
        }
    return env


def store_over(port: int, path, *, tls: TlsSettings | None) -> int | None:
    """One C-STORE, over TLS when `tls` is given; None if no association was established."""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(MRImageStorage)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 5
    context = client_ssl_context(tls) if tls else None
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE", tls_args=(context, "127.0.0.1") if context else None)
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_store(pydicom.dcmread(path))
        return int(status.Status) if status and "Status" in status else None
    finally:
        if assoc.is_established:
            assoc.release()


def test_tls_scp_stores_for_a_tls_client_and_refuses_plain_tcp(start_node, pki, phantom_factory):
    node = start_node(**tls_env(pki))
    port = node.address[1]
    files = phantom_factory(8301, "SEC01")
    assert store_over(port, files[0], tls=TlsSettings(enabled=True, ca_file=pki.ca_file)) == SUCCESS
    assert store_over(port, files[1], tls=None) is None
    # DCMTK without TLS fails as well.
    plain = subprocess.run(
        [require_tool("echoscu"), "-to", "5", "-aec", "DICOMNODE", "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert plain.returncode != 0
    assert len(audit_store(node.db, node.store.root)) == 1
    # The plain attempts did not hurt the TLS service.
    assert store_over(port, files[2], tls=TlsSettings(enabled=True, ca_file=pki.ca_file)) == SUCCESS


def test_client_from_an_untrusted_server_ca_does_not_send(start_node, pki, phantom_factory, tmp_path):
    """The modality's view: a node presenting a certificate from another CA is not trusted."""
    node = start_node(**tls_env(make_pki(tmp_path / "rogue", ca_name="Rogue CA")))
    files = phantom_factory(8302, "SEC02")
    # The TLS handshake fails client-side (certificate verify failed): no association.
    assert store_over(node.address[1], files[0], tls=TlsSettings(enabled=True, ca_file=pki.ca_file)) is None
    assert not audit_store(node.db, node.store.root)


def test_required_client_certificate(start_node, pki, phantom_factory):
    node = start_node(**tls_env(pki, require_client_cert=True))
    port = node.address[1]
    files = phantom_factory(8303, "SEC03")
    without = TlsSettings(enabled=True, ca_file=pki.ca_file)
    with_cert = TlsSettings(enabled=True, ca_file=pki.ca_file, cert_file=pki.client_cert, key_file=pki.client_key)
    try:
        refused = store_over(port, files[0], tls=without)
    except OSError:  # TLS 1.2: the handshake itself fails client-side
        refused = None
    assert refused is None
    assert store_over(port, files[1], tls=with_cert) == SUCCESS
    rows = audit_store(node.db, node.store.root)
    assert set(rows) == {str(pydicom.dcmread(files[1]).SOPInstanceUID)}


class TlsReceiver:
    """A pynetdicom Store SCP behind TLS (the destination PACS/TPS)."""

    def __init__(self, pki: Pki, port: int):
        self.received: list[str] = []
        ae = AE(ae_title="TPS")
        ae.supported_contexts = AllStoragePresentationContexts
        tls = TlsSettings(enabled=True, cert_file=pki.server_cert, key_file=pki.server_key)
        self.server = ae.start_server(
            ("127.0.0.1", port),
            block=False,
            ssl_context=server_ssl_context(tls),
            evt_handlers=[(evt.EVT_C_STORE, self.handle)],
        )

    def handle(self, event):
        self.received.append(str(event.dataset.SOPInstanceUID))
        return SUCCESS

    def stop(self):
        self.server.shutdown()


def tls_exporter(node, port: int, ca_file) -> Exporter:
    destination = Destination(
        name="tps", ae_title="TPS", host="127.0.0.1", port=port, tls=TlsSettings(enabled=True, ca_file=ca_file)
    )
    settings = ExportSettings(retry_initial_s=0.1, retry_max_interval_s=0.2, give_up_after_s=2)
    return Exporter(node.db, node.store, [destination], settings, "DICOMNODE", 5)


def test_tls_export_to_a_tls_destination(unstarted_node, pki, phantom_factory):
    node = unstarted_node
    port = free_port()
    files = phantom_factory(8304, "SEC04")
    job_id, output = exporting_job(node, files[0], ["tps"])
    receiver = TlsReceiver(pki, port)
    try:
        job = run_until_settled(tls_exporter(node, port, pki.ca_file), node, job_id)
    finally:
        receiver.stop()
    assert job.state == JobState.DONE, job.reason
    assert receiver.received == [str(pydicom.dcmread(output).SOPInstanceUID)]


def test_tls_export_to_an_untrusted_destination_fails_with_reason(unstarted_node, pki, phantom_factory, tmp_path):
    node = unstarted_node
    port = free_port()
    files = phantom_factory(8305, "SEC05")
    job_id, _ = exporting_job(node, files[0], ["tps"])
    receiver = TlsReceiver(make_pki(tmp_path / "rogue", ca_name="Rogue CA"), port)
    try:
        job = run_until_settled(tls_exporter(node, port, pki.ca_file), node, job_id)
    finally:
        receiver.stop()
    assert job.state == JobState.FAILED
    # pynetdicom swallows the handshake error (certificate verify failed), so the stored
    # reason cannot name the certificate; it says the destination could not be reached.
    assert "export to tps failed" in job.reason and "could not be reached" in job.reason
    assert receiver.received == []


@pytest.mark.timeout(60)  # before the fix this hung until the peer closed
def test_tls_destination_that_never_answers_the_handshake_does_not_stall_the_exporter(
    unstarted_node, pki, phantom_factory
):
    """A peer that accepts TCP and then says nothing (wrong port, hung proxy) must cost one
    timeout per attempt; an unbounded TLS handshake would hold the exporter, and with it every
    destination, until the peer hangs up."""
    node = unstarted_node
    files = phantom_factory(8306, "SEC06")
    job_id, _ = exporting_job(node, files[0], ["tps"])
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        exporter = tls_exporter(node, port, pki.ca_file)  # DIMSE/connection timeout 5 s
        started = time.monotonic()
        attempts = exporter.run_once()
        elapsed = time.monotonic() - started
    assert attempts == 1 and 4 < elapsed < 15, elapsed  # the 5 s timeout ended it, nothing else
    assert "could not be reached" in load_job(node.db, job_id).exports[0].last_error


def test_calling_ae_allow_list(start_node, phantom_factory):
    node = start_node(DICOM_NODE__NODE__ALLOWED_CALLING_AETS='["MR_SCANNER1", "PACS"]')
    port = node.address[1]
    files = phantom_factory(8306, "SEC06")
    refused = subprocess.run(
        [require_tool("storescu"), "-aet", "INTRUDER", "-aec", "DICOMNODE", "127.0.0.1", str(port), str(files[0])],
        capture_output=True,
        text=True,
        timeout=60,
    )
    said = (refused.stdout + refused.stderr).lower()
    assert refused.returncode != 0 and "calling ae title not recognized" in said
    assert not audit_store(node.db, node.store.root)
    allowed = subprocess.run(
        [require_tool("storescu"), "-aet", "MR_SCANNER1", "-aec", "DICOMNODE", "127.0.0.1", str(port), str(files[0])],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert allowed.returncode == 0, allowed.stderr
    assert len(audit_store(node.db, node.store.root)) == 1


def test_source_address_allow_list(start_node, phantom_factory):
    refusing = start_node(DICOM_NODE__NODE__ALLOWED_SOURCE_ADDRESSES='["10.0.0.0/8"]')
    port = refusing.address[1]
    stream = io.StringIO()
    configure_logging(LoggingSettings(format="json", level="INFO"), stream=stream)
    try:
        assert not echo_ok(port)
        # The TCP connection is closed before any PDU is read.
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.settimeout(5)
            assert sock.recv(1) == b""
    finally:
        configure_logging(LoggingSettings(format="json", level="WARNING"))
    assert '"association.refused_address"' in stream.getvalue() and "127.0.0.1" in stream.getvalue()
    assert not audit_store(refusing.db, refusing.store.root)
    admitting = start_node(DICOM_NODE__NODE__ALLOWED_SOURCE_ADDRESSES='["10.0.0.0/8", "127.0.0.0/8"]')
    assert echo_ok(admitting.address[1])


PATIENT_NAME = "Zyxwvutsky^Quenbertha"


@pytest.mark.parametrize("log_patient_names", [False, True])
def test_no_patient_name_in_the_logs_of_a_full_run(
    start_node, with_tiny_model, phantom_factory, tmp_path, log_patient_names
):
    """Store a series with a distinctive name, let its job run, then grep every log line
    (DEBUG, JSON, our loggers and the libraries') for any part of the name. The code
    never logs patient names, so with `log_patient_names = true` they stay out too; the
    masking itself is covered in tests/dicom_node/test_logging_setup.py."""
    config = tmp_path / "node.toml"
    config.write_text(NO_DESTINATION_RULES)
    node = start_node(config, DICOM_NODE__WORKER__COUNT="1", DICOM_NODE__WORKER__POLL_INTERVAL_S="0.2")
    stream = io.StringIO()
    configure_logging(LoggingSettings(format="json", level="DEBUG", log_patient_names=log_patient_names), stream=stream)
    try:
        files = phantom_factory(8307, "SEC07", patient_name=PATIENT_NAME)
        result = subprocess.run(
            [require_tool("storescu"), "-aec", "DICOMNODE", "127.0.0.1", str(node.address[1]), *map(str, files)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        (job,) = settled(node, 1)
        assert job.state == JobState.DONE, job.reason
        # A failing job too: its reason and trace are logged.
        broken = files[0].parent.parent / "broken"
        broken.mkdir(exist_ok=True)
        one = broken / "one.dcm"
        ds = pydicom.dcmread(files[0])
        ds.SeriesInstanceUID = pydicom.uid.generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.save_as(one)
        assert (
            subprocess.run(
                [require_tool("storescu"), "-aec", "DICOMNODE", "127.0.0.1", str(node.address[1]), str(one)],
                capture_output=True,
                timeout=60,
            ).returncode
            == 0
        )
        jobs = settled(node, 2)
        assert jobs[1].state in (JobState.FAILED, JobState.REJECTED)  # one slice: screening refuses it
    finally:
        logs = stream.getvalue()
        configure_logging(LoggingSettings(format="json", level="WARNING"))
    with node.db.session() as session:  # the name was received and is in the job store
        from storage.models import Study

        assert PATIENT_NAME in {s.patient_name for s in session.query(Study).all()}
    assert "store.ok" in logs and "job.inference_done" in logs
    assert "job.failed" in logs or "job.rejected" in logs
    for part in PATIENT_NAME.split("^"):
        assert part.lower() not in logs.lower(), f"patient name part {part!r} found in the logs"
    assert load_job(node.db, job.id).summary is not None
