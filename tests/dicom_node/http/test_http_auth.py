"""Authentication and roles: refusal without credentials off loopback, actions only for physicists."""

from __future__ import annotations

import tomllib
import urllib.error
import urllib.request

import pytest

from dicom_node.http.auth import hash_secret, verify_secret
from dicom_node.peers import send_series
from dicom_node.settings import ConfigError, load_settings
from storage.jobs import claim_next_job, fail_job, list_jobs, load_job
from storage.models import JobState
from tests.dicom_node.conftest import EXAMPLE_CONFIG, wait_for
from tests.dicom_node.http.conftest import TOKEN, basic, http_env, node_url, request

PROTECTED = ["/jobs", "/api/jobs", "/metrics", "/readyz", "/system", "/associations", "/api/openapi.json"]


def test_secret_hashes_verify_only_the_secret() -> None:
    stored = hash_secret("correct horse", n=2**10)
    assert stored.startswith("scrypt$1024$8$1$") and "correct horse" not in stored
    assert verify_secret("correct horse", stored)
    assert not verify_secret("correct hors", stored)
    assert not verify_secret("correct horse", "scrypt$broken")


def test_non_loopback_binding_without_users_is_a_config_error(node_env) -> None:
    with pytest.raises(ConfigError, match="http.*not a loopback address: configure users"):
        load_settings(EXAMPLE_CONFIG, env={**node_env, "DICOM_NODE__HTTP__HOST": "0.0.0.0"})


def test_non_loopback_refuses_everything_but_healthz_without_auth(start_node) -> None:
    service = start_node(**http_env(host="0.0.0.0"))
    url = f"http://127.0.0.1:{service.http.url.rsplit(':', 1)[1].strip('/')}"
    assert request(f"{url}/healthz").status == 200
    for path in PROTECTED:
        reply = request(url + path)
        assert reply.status == 401, path
        assert reply.headers["www-authenticate"].startswith("Basic")
        assert request(url + path, auth="Basic " + "YWxpY2U6d3Jvbmc=").status == 401, path  # alice:wrong
    assert request(f"{url}/api/jobs", auth=basic("victor")).status == 200
    assert request(f"{url}/metrics", auth=f"Bearer {TOKEN}").status == 200
    assert request(f"{url}/metrics", auth="Bearer not-the-token").status == 401


def test_actions_need_a_physicist_and_are_recorded_with_the_name(http_node, mr_series) -> None:
    url = node_url(http_node)
    send_series(mr_series, http_node.address[1], calling_ae="MR_SCANNER")
    (job,) = wait_for(lambda: [j for j in list_jobs(http_node.db) if j.state == JobState.QUEUED])
    claim_next_job(http_node.db, "test:1:aa:worker-0")
    fail_job(http_node.db, job.id, "failed: test")

    # loopback: reading is open, acting is not
    assert request(f"{url}/jobs/{job.id}").status == 200
    anonymous = request(f"{url}/jobs/{job.id}/retry", method="POST", data=b"")
    assert anonymous.status == 401 and "log in" in anonymous.text
    viewer = request(f"{url}/api/jobs/{job.id}/retry", method="POST", auth=basic("victor"))
    assert viewer.status == 403 and "role viewer" in viewer.json()["detail"]
    forged = request(
        f"{url}/jobs/{job.id}/retry", method="POST", auth=basic("alice"), data=b"", headers={"Origin": "http://evil"}
    )
    assert forged.status == 403
    assert load_job(http_node.db, job.id).state == JobState.FAILED

    done = request(f"{url}/jobs/{job.id}/retry", method="POST", auth=basic("alice"), data=b"")
    assert done.status == 303 and done.headers["location"].startswith(f"/jobs/{job.id}?message=")
    job = load_job(http_node.db, job.id)
    assert job.state == JobState.QUEUED
    assert job.events[-1].message == "retry by alice (physicist) from the web view: queued again"

    again = request(f"{url}/api/jobs/{job.id}/retry", method="POST", auth=basic("alice"))
    assert again.status == 409 and "only done, failed, rejected or cancelled" in again.json()["detail"]
    unknown = request(f"{url}/api/jobs/{job.id}/explode", method="POST", auth=basic("alice"))
    assert unknown.status == 422 and "retry" in unknown.text


def test_https_with_the_node_certificate(start_node, tmp_path) -> None:
    import ssl

    from tests.dicom_node.certificates import make_pki

    pki = make_pki(tmp_path / "pki")
    service = start_node(
        **http_env(),
        DICOM_NODE__HTTP__TLS="true",
        DICOM_NODE__NODE__TLS__ENABLED="true",
        DICOM_NODE__NODE__TLS__CERT_FILE=str(pki.server_cert),
        DICOM_NODE__NODE__TLS__KEY_FILE=str(pki.server_key),
    )
    assert service.http.url.startswith("https://")
    port = service.http.url.rstrip("/").rsplit(":", 1)[1]
    context = ssl.create_default_context(cafile=str(pki.ca_file))
    context.check_hostname = False  # the test certificate names no host
    with urllib.request.urlopen(f"https://127.0.0.1:{port}/healthz", context=context, timeout=30) as reply:
        assert reply.status == 200
    with pytest.raises(urllib.error.URLError):  # the system trust store does not know the test CA
        urllib.request.urlopen(f"https://127.0.0.1:{port}/healthz", timeout=30)


def test_http_tls_needs_the_node_certificate(node_env) -> None:
    with pytest.raises(ConfigError, match="http.tls uses the node's certificate"):
        load_settings(EXAMPLE_CONFIG, env={**node_env, "DICOM_NODE__HTTP__TLS": "true"})


def test_hash_password_and_new_token_commands() -> None:
    from typer.testing import CliRunner

    from dicom_node.cli import app

    result = CliRunner().invoke(
        app, ["http", "hash-password", "--name", "bob", "--role", "admin", "--password", "pw-12345678"]
    )
    assert result.exit_code == 0, result.output
    entry = tomllib.loads(result.output)["http"]["users"][0]
    assert entry["name"] == "bob" and entry["role"] == "admin" and verify_secret("pw-12345678", entry["password_hash"])
    bad = CliRunner().invoke(app, ["http", "hash-password", "--name", "bob", "--role", "root", "--password", "x" * 9])
    assert bad.exit_code == 2 and "not one of viewer, physicist, admin" in bad.output
    token = CliRunner().invoke(app, ["http", "new-token", "--name", "prometheus"])
    secret = token.output.split("shown once): ", 1)[1].split()[0]
    assert verify_secret(secret, tomllib.loads(token.output)["http"]["tokens"][0]["token_hash"])


def test_destination_echo_from_the_page_says_what_happened(start_node) -> None:
    from dicom_node.peers import free_port

    nobody = free_port()  # nothing listens there
    url = node_url(start_node(**http_env(), DICOM_NODE__DESTINATIONS__0__PORT=str(nobody)))
    assert request(f"{url}/destinations/tps/echo", method="POST", auth=basic("victor")).status == 403
    reply = request(f"{url}/destinations/tps/echo", method="POST", auth=basic("alice"))
    assert reply.status == 303
    page = request(f"{url}/destinations").text
    assert "by alice" in page and f"no association with TPS@127.0.0.1:{nobody}" in page
