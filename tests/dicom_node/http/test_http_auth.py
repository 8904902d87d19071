"""Authentication and roles: refusal without credentials off loopback, actions only for physicists."""

from __future__ import annotations

import pytest

from dicom_node.http.auth import hash_secret, verify_secret
from dicom_node.peers import send_series
from dicom_node.settings import ConfigError, load_settings
from storage.jobs import list_jobs, load_job, transition
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
    transition(http_node.db, job.id, JobState.FAILED, "failed: test", reason="test")

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
    assert again.status == 409 and "only done, failed or rejected" in again.json()["detail"]
    unknown = request(f"{url}/api/jobs/{job.id}/explode", method="POST", auth=basic("alice"))
    assert unknown.status == 404
