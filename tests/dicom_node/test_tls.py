"""TLS contexts: real handshakes with a certificate made in the test (mutual TLS,
missing client certificate, wrong CA, wrong host name) and a C-ECHO over TLS."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicom_node.echo_scu import send_echo
from dicom_node.settings import ConfigError, TlsSettings
from dicom_node.tls import client_ssl_context, server_ssl_context
from tests.dicom_node.certificates import Pki, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def server_tls(pki: Pki, *, require_client_cert: bool = True) -> TlsSettings:
    return TlsSettings(
        enabled=True,
        cert_file=pki.server_cert,
        key_file=pki.server_key,
        ca_file=pki.ca_file,
        require_client_cert=require_client_cert,
    )


def client_tls(pki: Pki, *, with_cert: bool = True, ca_file: Path | None = None) -> TlsSettings:
    return TlsSettings(
        enabled=True,
        ca_file=ca_file or pki.ca_file,
        cert_file=pki.client_cert if with_cert else None,
        key_file=pki.client_key if with_cert else None,
    )


def handshake(server: ssl.SSLContext, client: ssl.SSLContext, hostname: str = "127.0.0.1") -> tuple[object, object]:
    """Run both sides over a socket pair; each result is the peer certificate
    subject seen (server side) / True (client side), or the exception raised."""
    server_sock, client_sock = socket.socketpair()
    results: dict[str, object] = {}

    def serve() -> None:
        try:
            with server.wrap_socket(server_sock, server_side=True) as tls:
                peer = tls.getpeercert()
                results["server"] = dict(x[0] for x in peer["subject"]) if peer else None
                tls.sendall(b"ok")
        except (ssl.SSLError, OSError) as exc:
            results["server"] = exc

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with client.wrap_socket(client_sock, server_hostname=hostname) as tls:
            tls.settimeout(5)
            results["client"] = tls.recv(2) == b"ok"  # TLS 1.3: a refused client cert shows here
    except (ssl.SSLError, OSError) as exc:
        results["client"] = exc
    finally:
        thread.join(10)
    return results["server"], results["client"]


def test_disabled_means_no_context() -> None:
    assert server_ssl_context(TlsSettings()) is None
    assert client_ssl_context(TlsSettings()) is None


def test_tls_1_2_minimum(pki: Pki) -> None:
    assert server_ssl_context(server_tls(pki)).minimum_version == ssl.TLSVersion.TLSv1_2
    assert client_ssl_context(client_tls(pki)).minimum_version == ssl.TLSVersion.TLSv1_2


def test_mutual_tls(pki: Pki) -> None:
    server, client = handshake(server_ssl_context(server_tls(pki)), client_ssl_context(client_tls(pki)))
    assert server == {"commonName": "modality"}
    assert client is True


def test_client_certificate_required(pki: Pki) -> None:
    server, client = handshake(
        server_ssl_context(server_tls(pki)), client_ssl_context(client_tls(pki, with_cert=False))
    )
    assert isinstance(server, ssl.SSLError) and "certificate" in str(server).lower()
    assert client is not True


def test_client_certificate_optional_when_not_required(pki: Pki) -> None:
    server, client = handshake(
        server_ssl_context(server_tls(pki, require_client_cert=False)),
        client_ssl_context(client_tls(pki, with_cert=False)),
    )
    assert server is None and client is True


def test_client_rejects_server_from_another_ca(pki: Pki, tmp_path: Path) -> None:
    other = make_pki(tmp_path / "other", ca_name="Other CA")
    server, client = handshake(
        server_ssl_context(server_tls(pki)), client_ssl_context(client_tls(pki, ca_file=other.ca_file))
    )
    assert isinstance(client, ssl.SSLCertVerificationError)


def test_client_checks_the_host_name(pki: Pki) -> None:
    _, client = handshake(
        server_ssl_context(server_tls(pki)), client_ssl_context(client_tls(pki)), hostname="pacs.example.org"
    )
    assert isinstance(client, ssl.SSLCertVerificationError) and "pacs.example.org" in str(client)


def test_unloadable_key_is_a_config_error(pki: Pki, tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.key"
    bogus.write_text("-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
    settings = TlsSettings(enabled=True, cert_file=pki.server_cert, key_file=bogus)
    with pytest.raises(ConfigError, match="cannot load certificate .*server.crt with key .*bogus.key"):
        server_ssl_context(settings)


@pytest.fixture
def tls_echo_scp(pki: Pki) -> Iterator[int]:
    """A pynetdicom Verification SCP behind the node's server context (mutual TLS)."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title="TLSSCP")
    ae.add_supported_context(Verification)
    server = ae.start_server(("127.0.0.1", 0), block=False, ssl_context=server_ssl_context(server_tls(pki)))
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()


def test_c_echo_over_mutual_tls(pki: Pki, tls_echo_scp: int) -> None:
    result = send_echo(
        "127.0.0.1", tls_echo_scp, calling_ae_title="ECHOSCU", called_ae_title="TLSSCP", tls=client_tls(pki)
    )
    assert result.ok and result.status == 0x0000, result.message


def test_c_echo_without_client_certificate_fails(pki: Pki, tls_echo_scp: int) -> None:
    result = send_echo(
        "127.0.0.1",
        tls_echo_scp,
        calling_ae_title="ECHOSCU",
        called_ae_title="TLSSCP",
        tls=client_tls(pki, with_cert=False),
        timeout_s=5,
    )
    assert not result.ok and result.status is None


def test_echo_command_over_tls(pki: Pki, tls_echo_scp: int) -> None:
    from typer.testing import CliRunner

    from dicom_node.cli import app

    args = ["echo", "127.0.0.1", str(tls_echo_scp), "--aec", "TLSSCP", "--tls-ca", str(pki.ca_file)]
    result = CliRunner().invoke(app, [*args, "--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key)])
    assert result.exit_code == 0, result.output
    assert "success" in result.output
