"""`dicom-node jobs ...` as a physicist or a script uses it: a real process on a real job store."""

from __future__ import annotations

import json

import pydicom
import pytest

from storage.jobs import claim_next_job, fail_job
from tests.dicom_node.conftest import cli, jobs_by_state, storescu, wait_for


def test_jobs_list_show_retry_json_contract(start_node, node_env, mr_series):
    node = start_node()
    assert storescu(node.address[1], mr_series).returncode == 0
    wait_for(lambda: jobs_by_state(node).get("queued"))

    listed = cli(node_env, "jobs", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    jobs = json.loads(listed.stdout)
    assert len(jobs) == 1
    job = jobs[0]
    assert {"id", "state", "study_uid", "series_uid", "created_at", "reason"} <= job.keys()
    assert job["state"] == "queued"
    assert job["series_uid"] == pydicom.dcmread(mr_series[0]).SeriesInstanceUID

    assert json.loads(cli(node_env, "jobs", "list", "--json", "--state", "done").stdout) == []
    by_patient = cli(node_env, "jobs", "list", "--json", "--patient-id", job["patient_id"])
    assert [j["id"] for j in json.loads(by_patient.stdout)] == [job["id"]]
    assert json.loads(cli(node_env, "jobs", "list", "--json", "--since", "2999-01-01").stdout) == []

    claim_next_job(node.db, "test-worker")
    fail_job(node.db, job["id"], "the series has a gap between slices 4 and 6")
    shown = json.loads(cli(node_env, "jobs", "show", str(job["id"]), "--json").stdout)
    assert shown["state"] == "failed" and "gap" in shown["reason"]
    assert [e["state"] for e in shown["events"] if e["kind"] == "state"] == ["received", "queued", "running", "failed"]

    human = cli(node_env, "jobs", "show", str(job["id"]))
    assert human.returncode == 0 and "gap between slices" in human.stdout

    assert cli(node_env, "jobs", "retry", str(job["id"])).returncode == 0
    assert json.loads(cli(node_env, "jobs", "show", str(job["id"]), "--json").stdout)["state"] == "queued"


@pytest.mark.slow
def test_jobs_errors_are_one_line_not_tracebacks(node_env):
    missing = cli(node_env, "jobs", "show", "999")
    assert missing.returncode == 2
    assert "job 999 does not exist" in missing.stderr and "Traceback" not in missing.stderr
    bad_state = cli(node_env, "jobs", "list", "--state", "exploded")
    assert bad_state.returncode == 2 and "Traceback" not in bad_state.stderr


def test_markup_in_patient_data_is_printed_as_text(start_node, node_env, mr_series, tmp_path):
    """A PatientID such as `PAT[/]01` crashed Rich (closing tag with nothing open)."""
    copies = []
    for source in mr_series:
        ds = pydicom.dcmread(source)
        ds.PatientID = "PAT[/]01"
        copies.append(tmp_path / source.name)
        ds.save_as(copies[-1])
    node = start_node()
    assert storescu(node.address[1], copies).returncode == 0
    [job] = wait_for(lambda: jobs_by_state(node).get("queued"))
    claim_next_job(node.db, "test-worker")
    fail_job(node.db, job.id, "[bold]SeriesDescription[/bold] 'T1 [red]CE[/]' is odd")

    listed = cli(node_env, "jobs", "list")
    assert listed.returncode == 0, listed.stderr
    assert "PAT[/]01" in listed.stdout
    shown = cli(node_env, "jobs", "show", str(job.id))
    assert shown.returncode == 0, shown.stderr
    assert "PAT[/]01" in shown.stdout and "[bold]SeriesDescription[/bold] 'T1 [red]CE[/]'" in shown.stdout
