"""Held and cancelled jobs and the attempt cap, on a real SQLite job store."""

from __future__ import annotations

import pytest

from storage.database import Database
from storage.exports import resend
from storage.jobs import (
    InvalidTransition,
    RoutingOutcome,
    cancel_job,
    claim_next_job,
    complete_series,
    fail_job,
    hold_outputs,
    load_job,
    record_outputs,
    release_job,
    requeue_jobs_of,
    retry_after_error,
    retry_job,
)
from storage.models import SETTLED_STATES, TERMINAL_STATES, EventKind, JobState, Series, Study

PROCESS = "host-a:101:aa"  # host:pid:nonce of a worker process that died
WORKER = f"{PROCESS}:worker-0"
OUTPUTS = [
    ["1.2.3.1", "1.2.840.10008.5.1.4.1.1.481.3", "outputs/job-1/attempt-1/RTSTRUCT_1.2.3.1.dcm"],
    ["1.2.3.2", "1.2.840.10008.5.1.4.1.1.88.34", "outputs/job-1/attempt-1/SR_1.2.3.2.dcm"],
]


@pytest.fixture
def db(tmp_path) -> Database:
    database = Database(f"sqlite:///{tmp_path / 'jobs.sqlite'}")
    yield database
    database.dispose()


def queued_job(db: Database, destinations: tuple[str, ...] = ("tps", "pacs")) -> int:
    with db.session() as session:
        number = len(session.query(Series).all()) + 10
        study = Study(study_uid=f"1.2.3.{number}", patient_id="P1")
        series = Series(series_uid=f"1.2.3.{number}.1", study=study, instance_count=1)
        session.add_all([study, series])
        session.flush()
        series_id = series.id
    return complete_series(db, series_id, RoutingOutcome("brain-mr", "default", list(destinations), "test"))


def held_job(db: Database) -> int:
    job_id = queued_job(db)
    assert claim_next_job(db, WORKER) == job_id
    hold_outputs(db, job_id, "outputs/job-1/attempt-1", {"outputs": OUTPUTS}, ["321 lesions, limit 30"])
    return job_id


def state_messages(db: Database, job_id: int) -> list[tuple[str, str]]:
    return [(e.state.value, e.message) for e in load_job(db, job_id).events if e.kind == EventKind.STATE]


def test_held_is_settled_but_not_finished():
    assert JobState.HELD in SETTLED_STATES and JobState.HELD not in TERMINAL_STATES
    assert JobState.CANCELLED in TERMINAL_STATES


def test_a_held_job_has_no_exports_until_released(db):
    job_id = held_job(db)
    job = load_job(db, job_id)
    assert job.state == JobState.HELD and job.reason == "held: 321 lesions, limit 30"
    assert job.exports == [] and job.finished_at is None
    assert job.summary["outputs"] == OUTPUTS
    with pytest.raises(ValueError, match="is held"):
        resend(db, job_id, None, [tuple(o) for o in OUTPUTS])  # `jobs export` does not bypass the hold
    with pytest.raises(InvalidTransition, match="release or cancel a held job"):
        retry_job(db, job_id)

    assert release_job(db, job_id, "dr.physicist", "checked the 321 on the overlay") == 4
    job = load_job(db, job_id)
    assert job.state == JobState.EXPORTING and job.reason is None
    assert sorted((e.destination, e.sop_instance_uid) for e in job.exports) == [
        ("pacs", "1.2.3.1"),
        ("pacs", "1.2.3.2"),
        ("tps", "1.2.3.1"),
        ("tps", "1.2.3.2"),
    ]
    assert state_messages(db, job_id)[-1] == (
        "exporting",
        "released by dr.physicist: checked the 321 on the overlay; exporting 4 object(s) to pacs, tps",
    )
    with pytest.raises(InvalidTransition, match="only a held job can be released"):
        release_job(db, job_id, "dr.physicist")


def test_release_without_destinations_is_done(db):
    job_id = queued_job(db, destinations=())
    claim_next_job(db, WORKER)
    hold_outputs(db, job_id, "outputs/job-1/attempt-1", {"outputs": OUTPUTS}, ["total GTV 250.0 cm3, limit 100 cm3"])
    assert release_job(db, job_id, "me") == 0
    assert load_job(db, job_id).state == JobState.DONE


def test_cancel_ends_held_queued_and_failed_jobs_but_not_running_ones(db):
    held = held_job(db)
    cancel_job(db, held, "dr.physicist", "speckle along the field of view")
    job = load_job(db, held)
    assert job.state == JobState.CANCELLED and job.finished_at is not None and job.exports == []
    assert job.reason == "cancelled by dr.physicist: speckle along the field of view"
    assert state_messages(db, held)[-1] == ("cancelled", job.reason)
    with pytest.raises(InvalidTransition, match="only a held job can be released"):
        release_job(db, held, "dr.physicist")

    queued = queued_job(db)
    cancel_job(db, queued, "ops")
    assert load_job(db, queued).state == JobState.CANCELLED
    assert claim_next_job(db, WORKER) is None  # a cancelled job is never claimed

    running = queued_job(db)
    assert claim_next_job(db, WORKER) == running
    with pytest.raises(InvalidTransition, match="let it finish"):
        cancel_job(db, running, "ops")
    fail_job(db, running, "the series has a gap between slices 4 and 6")
    cancel_job(db, running, "ops")
    assert load_job(db, running).state == JobState.CANCELLED

    retry_job(db, running)  # a person may change their mind
    assert load_job(db, running).state == JobState.QUEUED


def test_a_worker_that_dies_mid_job_is_retried_until_the_cap(db):
    job_id = queued_job(db)
    for attempt in (1, 2):
        assert claim_next_job(db, WORKER) == job_id
        assert requeue_jobs_of(db, PROCESS, max_attempts=3) == [job_id]  # the restart after a crash
        job = load_job(db, job_id)
        assert job.state == JobState.QUEUED and job.attempts == attempt
    assert claim_next_job(db, WORKER) == job_id
    assert requeue_jobs_of(db, PROCESS, max_attempts=3) == []
    job = load_job(db, job_id)
    assert job.state == JobState.FAILED and job.finished_at is not None
    assert job.reason == (f"gave up after 3 attempts: interrupted run: {WORKER} is no longer running")
    assert [m for s, m in state_messages(db, job_id) if s == "queued"][1:] == [
        f"re-queued (attempt 1 of 3 ended: interrupted run: {WORKER} is no longer running)",
        f"re-queued (attempt 2 of 3 ended: interrupted run: {WORKER} is no longer running)",
    ]
    # a person's retry is one more attempt, and the cap stops the next crash loop at once
    retry_job(db, job_id)
    assert claim_next_job(db, WORKER) == job_id
    assert requeue_jobs_of(db, PROCESS, max_attempts=3) == []
    assert load_job(db, job_id).reason.startswith("gave up after 4 attempts")


def test_another_processs_running_job_is_left_alone(db):
    job_id = queued_job(db)
    claim_next_job(db, "host-b:7:bb:worker-0")
    assert requeue_jobs_of(db, PROCESS, max_attempts=1) == []
    assert load_job(db, job_id).state == JobState.RUNNING


def test_internal_errors_are_retried_until_the_cap(db):
    job_id = queued_job(db)
    for _ in range(2):
        claim_next_job(db, WORKER)
        assert retry_after_error(db, job_id, "internal error: RuntimeError: CUDA out of memory", 3) is True
    claim_next_job(db, WORKER)
    assert retry_after_error(db, job_id, "internal error: RuntimeError: CUDA out of memory", 3) is False
    job = load_job(db, job_id)
    assert job.state == JobState.FAILED
    assert job.reason == "gave up after 3 attempts: internal error: RuntimeError: CUDA out of memory"
    assert sum(e.kind == EventKind.ERROR for e in job.events) == 3


def test_a_cancelled_held_result_cannot_be_exported_later(db):
    """Review reproduction: hold -> cancel -> retry -> the new attempt fails: the held outputs stay unsent."""
    job_id = held_job(db)
    cancel_job(db, job_id, "dr.physicist", "implausible")
    with pytest.raises(ValueError, match="is cancelled"):
        resend(db, job_id, None, [tuple(o) for o in OUTPUTS])
    retry_job(db, job_id)
    assert claim_next_job(db, WORKER) == job_id
    job = load_job(db, job_id)
    assert job.output_dir is None and job.summary is None  # the new attempt carries nothing of the held one
    fail_job(db, job_id, "the series has a gap between slices 4 and 6")
    with pytest.raises(ValueError, match="no outputs to send"):
        resend(db, job_id, None, [tuple(o) for o in OUTPUTS])
    assert load_job(db, job_id).exports == []


def test_a_running_rerun_does_not_send_the_previous_result(db):
    """Review reproduction: a done job retried and claimed must not re-send its old outputs meanwhile."""
    job_id = queued_job(db)
    claim_next_job(db, WORKER)
    record_outputs(db, job_id, "outputs/job-1/attempt-1", {"outputs": OUTPUTS}, [])
    assert load_job(db, job_id).state == JobState.DONE
    retry_job(db, job_id)
    claim_next_job(db, WORKER)
    with pytest.raises(ValueError, match="no outputs to send|is running"):
        resend(db, job_id, None, [tuple(o) for o in OUTPUTS])
    assert load_job(db, job_id).state == JobState.RUNNING
