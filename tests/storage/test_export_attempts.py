"""Export rows belong to an attempt: a retry is judged by its own rows, and re-sent by attempt (issue 14).

Real job stores (SQLite and PostgreSQL through `job_store_url`), the bookkeeping the exporter calls.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import text

from storage.database import Database, make_engine
from storage.exports import RetryPolicy, record_attempt, resend
from storage.jobs import RoutingOutcome, claim_next_job, complete_series, load_job, record_outputs, retry_job
from storage.models import ExportState, JobState, Series, Study
from storage.outputs import WrittenObject, latest_in_series, newer_revisions_of
from storage.schema import _config

POLICY = RetryPolicy(initial_s=1, max_interval_s=1, give_up_after_s=3600)
RTSTRUCT, SR = "1.2.840.10008.5.1.4.1.1.481.3", "1.2.840.10008.5.1.4.1.1.88.34"
SERIES = {"RTSTRUCT": "2.25.101", "SR": "2.25.102"}


@pytest.fixture
def db(job_store_url: str):
    database = Database(job_store_url)
    yield database
    database.dispose()


def queued_job(db: Database) -> int:
    with db.session() as session:
        study = Study(study_uid="1.2.3", patient_id="P1")
        series = Series(series_uid="1.2.3.1", study=study, instance_count=1)
        session.add_all([study, series])
        session.flush()
        series_id = series.id
    return complete_series(db, series_id, RoutingOutcome("brain-mr", "default", ["tps"], "test"))


def run_attempt(db: Database, job_id: int) -> list[WrittenObject]:
    """Claim the job and record two outputs for its new attempt, exported to `tps` (as the worker does)."""
    assert claim_next_job(db, "host:1:aa:worker-0") == job_id
    attempt = load_job(db, job_id).attempts
    folder = f"outputs/job-{job_id}/attempt-{attempt}"
    objects = [
        WrittenObject(kind, SERIES[kind], f"2.25.{job_id}{attempt}{n}", cls, f"{folder}/{kind}.dcm")
        for n, (kind, cls) in enumerate((("RTSTRUCT", RTSTRUCT), ("SR", SR)))
    ]
    outputs = [(o.sop_instance_uid, o.sop_class_uid, o.path) for o in objects]
    exports = [("tps", *output) for output in outputs]
    record_outputs(db, job_id, folder, {"outputs": outputs}, exports, objects=objects)
    return objects


def settle_all(db: Database, job_id: int, delivered: bool) -> JobState:
    for export in load_job(db, job_id).exports:
        if export.state == ExportState.PENDING:
            record_attempt(db, export.id, delivered, "test", POLICY, permanent=not delivered)
    return load_job(db, job_id).state


def pending(db: Database, job_id: int) -> list[tuple[int, str]]:
    return sorted((e.attempt, e.sop_instance_uid) for e in load_job(db, job_id).exports if e.state == "pending")


def test_a_retry_is_settled_by_its_own_exports_not_the_failed_ones_of_the_attempt_before(db) -> None:
    """The bug: attempt 2 delivered everything, yet the job failed on attempt 1's failed rows."""
    job_id = queued_job(db)
    run_attempt(db, job_id)
    assert settle_all(db, job_id, delivered=False) == JobState.FAILED
    retry_job(db, job_id)
    second = run_attempt(db, job_id)
    assert {e.attempt for e in load_job(db, job_id).exports if e.state == "pending"} == {2}
    assert settle_all(db, job_id, delivered=True) == JobState.DONE
    job = load_job(db, job_id)
    assert {(e.attempt, e.state.value) for e in job.exports} == {(1, "failed"), (2, "done")}
    assert job.reason is None and {e.sop_instance_uid for e in job.exports if e.attempt == 2} == {
        o.sop_instance_uid for o in second
    }


def test_export_resends_the_latest_attempt_unless_another_is_named(db) -> None:
    job_id = queued_job(db)
    first = run_attempt(db, job_id)
    assert settle_all(db, job_id, delivered=True) == JobState.DONE
    retry_job(db, job_id)
    second = run_attempt(db, job_id)
    assert settle_all(db, job_id, delivered=True) == JobState.DONE

    assert resend(db, job_id) == 2
    assert pending(db, job_id) == sorted((2, o.sop_instance_uid) for o in second)
    assert settle_all(db, job_id, delivered=True) == JobState.DONE

    assert resend(db, job_id, attempt=1) == 2
    assert pending(db, job_id) == sorted((1, o.sop_instance_uid) for o in first)
    with pytest.raises(ValueError, match="still sending attempt 1"):
        resend(db, job_id, attempt=2)
    assert settle_all(db, job_id, delivered=False) == JobState.FAILED  # judged by attempt 1's rows, now failed

    with pytest.raises(ValueError, match="no attempt 3"):
        resend(db, job_id, attempt=3)
    # A destination added since gets rows for the attempt asked for only.
    assert resend(db, job_id, ["pacs"], attempt=1) == 2
    assert {(e.attempt, e.sop_instance_uid) for e in load_job(db, job_id).exports if e.destination == "pacs"} == {
        (1, o.sop_instance_uid) for o in first
    }


def test_the_latest_output_of_a_series_is_what_a_rerun_supersedes(db) -> None:
    job_id = queued_job(db)
    assert latest_in_series(db, SERIES.values()) == {}
    run_attempt(db, job_id)
    settle_all(db, job_id, delivered=True)
    retry_job(db, job_id)
    second = run_attempt(db, job_id)
    latest = latest_in_series(db, [*SERIES.values(), "2.25.999"])
    assert set(latest) == set(SERIES.values())
    sr = latest[SERIES["SR"]]
    assert (sr.sop_instance_uid, sr.attempt, sr.job_id, sr.revision) == (second[1].sop_instance_uid, 2, job_id, 2)
    assert sr.study_uid == "1.2.3" and sr.sop_class_uid == SR


def test_resending_a_superseded_attempt_records_a_warning_naming_the_newer_revision(db) -> None:
    job_id = queued_job(db)
    run_attempt(db, job_id)
    settle_all(db, job_id, delivered=True)
    retry_job(db, job_id)
    run_attempt(db, job_id)
    settle_all(db, job_id, delivered=True)
    assert newer_revisions_of(db, job_id, 2) is None
    resend(db, job_id)  # the newest: no warning
    settle_all(db, job_id, delivered=True)
    assert not [e for e in load_job(db, job_id).events if e.message.startswith("warning:")]
    resend(db, job_id, attempt=1)
    [warning] = [e.message for e in load_job(db, job_id).events if e.message.startswith("warning:")]
    assert warning.startswith(
        f"warning: job {job_id} attempt 1 is not the newest result of its output series: "
        f"RTSTRUCT r1 < r2 (job {job_id}, attempt 2); SR r1 < r2 (job {job_id}, attempt 2);"
    )


def test_the_upgrade_gives_old_export_rows_the_attempt_of_their_path(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path}/old.db")
    now = "2026-11-01 10:00:00+00:00"
    with engine.begin() as connection:
        command.upgrade(_config(connection), "0002")
        connection.execute(
            text("INSERT INTO studies (id, study_uid, created_at) VALUES (1, '1.2', :now)"), {"now": now}
        )
        connection.execute(
            text(
                "INSERT INTO series (id, series_uid, study_id, instance_count, first_received_at, last_received_at)"
                " VALUES (1, '1.2.1', 1, 1, :now, :now)"
            ),
            {"now": now},
        )
        connection.execute(
            text(
                "INSERT INTO jobs (id, series_id, study_uid, series_uid, state, destinations, attempts,"
                " instance_count, created_at, updated_at) VALUES (1, 1, '1.2', '1.2.1', 'done', '[]', 2, 1, :now, :now)"
            ),
            {"now": now},
        )
        for number, attempt in ((1, 1), (2, 2)):
            connection.execute(
                text(
                    "INSERT INTO exports (id, job_id, destination, sop_instance_uid, sop_class_uid, path, state,"
                    " attempts, created_at, next_attempt_at) VALUES (:id, 1, 'tps', :uid, '1.2.840.10008.5.1.4.1.1.88.34',"
                    " :path, 'done', 1, :now, :now)"
                ),
                {"id": number, "uid": f"2.25.{number}", "path": f"outputs/job-1/attempt-{attempt}/SR.dcm", "now": now},
            )
        command.upgrade(_config(connection), "head")
        rows = connection.execute(text("SELECT id, attempt FROM exports ORDER BY id")).all()
    engine.dispose()
    assert [tuple(row) for row in rows] == [(1, 1), (2, 2)]
