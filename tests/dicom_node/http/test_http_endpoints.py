"""The operations view against a running node: health, JSON API (same objects as the CLI), associations."""

from __future__ import annotations

import json
import os
import socket

import pytest
from typer.testing import CliRunner

from dicom_node.cli import app
from dicom_node.peers import send_series
from storage.associations import recent_associations
from storage.jobs import list_jobs
from storage.models import Instance
from tests.dicom_node.conftest import wait_for
from tests.dicom_node.http.conftest import http_env, node_url, request


def test_health_and_readiness(http_node) -> None:
    url = node_url(http_node)
    assert request(f"{url}/healthz").text == "ok\n"
    ready = request(f"{url}/readyz")
    assert ready.status == 200
    checks = ready.json()["checks"]
    assert set(checks) == {"scp", "database", "disk", "workers"} and all(c["ok"] for c in checks.values())


def test_readyz_fails_with_the_reason_when_the_disk_is_below_the_watermark(start_node) -> None:
    service = start_node(**http_env(), DICOM_NODE__NODE__MIN_FREE_DISK_MB=str(10**9))  # a petabyte
    reply = request(f"{node_url(service)}/readyz")
    assert reply.status == 503
    disk = reply.json()["checks"]["disk"]
    assert not disk["ok"] and "C-STORE is refused" in disk["detail"]


def test_received_series_shows_in_api_associations_and_instances(http_node, mr_series, node_env) -> None:
    url = node_url(http_node)
    send_series(mr_series, http_node.address[1], calling_ae="MR_SCANNER")
    wait_for(lambda: list_jobs(http_node.db) and list_jobs(http_node.db)[0].state.value == "queued")

    # /api/jobs is exactly `dicom-node jobs list --json` (one serialiser)
    api = request(f"{url}/api/jobs").json()
    env = {**node_env, "DICOM_NODE_CONFIG": ""}
    cli = CliRunner().invoke(app, ["jobs", "list", "--json", "--config", "config/node.example.toml"], env=env)
    assert cli.exit_code == 0, cli.output
    assert api == json.loads(cli.output) and len(api) == 1
    job_id = api[0]["id"]
    one = request(f"{url}/api/jobs/{job_id}").json()
    shown = CliRunner().invoke(
        app, ["jobs", "show", str(job_id), "--json", "--config", "config/node.example.toml"], env=env
    )
    assert one == json.loads(shown.output)
    assert request(f"{url}/api/jobs?state=queued&patient_id={api[0]['patient_id']}").json() == api
    assert request(f"{url}/api/jobs?state=done").json() == []
    assert request(f"{url}/api/jobs/99999").status == 404
    bad = request(f"{url}/api/jobs?state=nonsense")
    assert bad.status == 422 and "state 'nonsense' is not one of received" in bad.json()["detail"]
    assert request(f"{url}/api/jobs?since=yesterday").status == 422
    today = api[0]["created_at"][:10]
    assert request(f"{url}/api/jobs?since={today}&until={today}").json() == api
    assert request(f"{url}/api/jobs?until=2000-01-01").json() == []
    # the page's filter form sends blank fields: they mean "any"
    page = request(f"{url}/jobs?state=&since=&until=&patient_id=&study_uid=&refresh=0")
    assert page.status == 200 and f'href="/jobs/{job_id}"' in page.text
    page = request(f"{url}/jobs?state=done&since=&until=&patient_id=&study_uid=")
    assert page.status == 200 and "No job matches." in page.text

    # the association: one row, with counts; every instance keeps its source address
    (association,) = wait_for(lambda: [a for a in recent_associations(http_node.db) if a.outcome != "open"])
    files = len(mr_series)
    assert (association.calling_ae_title, association.address, association.outcome) == (
        "MR_SCANNER",
        "127.0.0.1",
        "released",
    )
    assert association.instances_stored == files and association.bytes_received > 0
    with http_node.db.session() as session:
        addresses = {i.source_address for i in session.query(Instance)}
    assert addresses == {"127.0.0.1"}
    page = request(f"{url}/associations?refresh=0").text
    assert "MR_SCANNER" in page and "127.0.0.1" in page and f"{files} / 0 / 0 / 0" in page

    openapi = request(f"{url}/api/openapi.json").json()
    assert {"/api/jobs", "/api/jobs/{job_id}", "/api/jobs/{job_id}/{action}"} <= set(openapi["paths"])


def test_association_logged_at_info_with_counts(http_node, mr_series, capsys) -> None:
    from dicom_node.logging_setup import configure_logging
    from dicom_node.settings import LoggingSettings

    configure_logging(LoggingSettings(format="json", level="INFO"))
    send_series(mr_series[:3], http_node.address[1], calling_ae="MR_SCANNER")
    lines = wait_for(
        lambda: [json.loads(line) for line in capsys.readouterr().err.splitlines() if '"association.ended"' in line]
    )
    (line,) = lines
    assert line["level"] == "info" and line["calling_ae"] == "MR_SCANNER" and line["address"] == "127.0.0.1"
    assert (line["instances"], line["stored"], line["outcome"]) == (3, 3, "released")


@pytest.mark.slow  # the system page loads the model packages (torch)
def test_pages_render_without_a_job(http_node) -> None:
    url = node_url(http_node)
    for path, expected in [
        ("/jobs", "No job matches."),
        ("/held", "Held jobs"),
        ("/destinations", "TPS@127.0.0.1:11113"),
        ("/system", "mtsa"),
    ]:
        reply = request(url + path)
        assert reply.status == 200 and expected in reply.text, path
    missing = request(f"{url}/jobs/4242")
    assert missing.status == 404 and "job 4242 does not exist" in missing.text


def test_refused_associations_are_recorded_and_counted(start_node) -> None:
    from pynetdicom.sop_class import Verification

    from dicom_node.association import scu_ae

    by_ae = start_node(**http_env(), DICOM_NODE__NODE__ALLOWED_CALLING_AETS='["MR_SCANNER1"]')
    ae = scu_ae("INTRUDER", 10)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", by_ae.address[1], ae_title="DICOMNODE")
    assert assoc.is_rejected
    ae.shutdown()
    (row,) = wait_for(lambda: recent_associations(by_ae.db))
    assert (row.calling_ae_title, row.address, row.outcome, row.reason) == (
        "INTRUDER",
        "127.0.0.1",
        "rejected",
        "A-ASSOCIATE-RJ",
    )
    metrics = request(f"{node_url(by_ae)}/metrics").text
    assert 'dicom_node_associations_rejected_total{reason="policy"} 1.0' in metrics
    assert "dicom_node_associations_active 0.0" in metrics

    by_address = start_node(**http_env(), DICOM_NODE__NODE__ALLOWED_SOURCE_ADDRESSES='["10.0.0.0/8"]')
    with socket.create_connection(("127.0.0.1", by_address.address[1]), timeout=5) as sock:
        sock.settimeout(5)
        assert sock.recv(1) == b""
    # (both nodes of this test share one data directory: the first row is the one above)
    row = wait_for(lambda: [a for a in recent_associations(by_address.db) if a.calling_ae_title is None])[0]
    assert (row.address, row.outcome, row.reason) == ("127.0.0.1", "rejected", "source address not allowed")
    metrics = request(f"{node_url(by_address)}/metrics").text
    assert 'dicom_node_associations_rejected_total{reason="address"} 1.0' in metrics


@pytest.mark.slow  # a fresh interpreter imports the whole node
def test_serve_with_the_http_port_in_use_is_one_clear_error(node_env) -> None:
    import subprocess
    import sys

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "dicom_node.cli", "serve", "--config", "config/node.example.toml"],
            env={**os.environ, **node_env, "DICOM_NODE__HTTP__PORT": str(port), "COLUMNS": "200"},
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode == 2
    assert f"cannot listen for HTTP on 127.0.0.1:{port}" in result.stderr and "http.port" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_restart_settles_only_its_own_open_association_rows(start_node) -> None:
    from storage.associations import open_association

    first = start_node(**http_env())
    mine = open_association(first.db, socket.gethostname(), "MR1", "DICOMNODE", "10.0.0.7", 4000)  # as if crashed
    theirs = open_association(first.db, "other-host", "MR2", "DICOMNODE", "10.0.0.8", 4001)
    second = start_node(**http_env())  # same data directory: the restart
    outcomes = {a.id: a.outcome for a in recent_associations(second.db)}
    assert (outcomes[mine], outcomes[theirs]) == ("interrupted", "open")
