"""Jobs of one source series run one at a time, so a re-run never writes the same revision twice.

Real job stores (SQLite and PostgreSQL through `job_store_url`); two claimers, also racing in threads.
"""

from __future__ import annotations

import threading

import pytest

from storage.database import Database
from storage.jobs import RoutingOutcome, claim_next_job, complete_series, record_outputs
from storage.models import Series, Study

ROUTED = RoutingOutcome("brain-mr", "default", ["tps"], "test")


@pytest.fixture
def db(job_store_url: str):
    database = Database(job_store_url)
    yield database
    database.dispose()


def new_series(db: Database, series_uid: str) -> int:
    with db.session() as session:
        study = session.query(Study).filter_by(study_uid="1.2.3").one_or_none() or Study(
            study_uid="1.2.3", patient_id="P1"
        )
        series = Series(series_uid=series_uid, study=study, instance_count=1)
        session.add_all([study, series])
        session.flush()
        return series.id


def test_a_second_job_of_a_series_waits_while_the_first_runs_and_other_series_do_not(db) -> None:
    series = new_series(db, "1.2.3.1")
    first = complete_series(db, series, ROUTED)
    second = complete_series(db, series, ROUTED)  # a late delivery of more slices: a second job
    other = complete_series(db, new_series(db, "1.2.3.2"), ROUTED)

    assert claim_next_job(db, "host:1:aa:worker-0") == first
    assert claim_next_job(db, "host:1:aa:worker-1") == other  # not `second`: its series is running
    assert claim_next_job(db, "host:1:aa:worker-2") is None
    record_outputs(db, first, "outputs/x", {}, [])  # the first ends `running` (done, nothing to send)
    assert claim_next_job(db, "host:1:aa:worker-2") == second


@pytest.mark.slow
def test_two_claimers_racing_never_run_two_jobs_of_one_series(db) -> None:
    for round_ in range(15):
        series = new_series(db, f"1.2.3.9.{round_}")
        jobs = {complete_series(db, series, ROUTED), complete_series(db, series, ROUTED)}
        barrier = threading.Barrier(2)
        claimed: list[int | None] = []

        def claim(worker: str, barrier: threading.Barrier, claimed: list[int | None]) -> None:
            barrier.wait()
            claimed.append(claim_next_job(db, worker))

        threads = [threading.Thread(target=claim, args=(f"host:1:aa:worker-{n}", barrier, claimed)) for n in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        got = [job for job in claimed if job is not None]
        assert len(got) == 1 and got[0] in jobs, (round_, claimed)
        record_outputs(db, got[0], "outputs/x", {}, [])
        assert claim_next_job(db, "host:1:aa:worker-9") == (jobs - set(got)).pop()
        record_outputs(db, (jobs - set(got)).pop(), "outputs/x", {}, [])
