"""Scale-out: jobs per minute with 1 and with 2 `dicom-node worker` processes, as a ratio (issue #16).

For each job store (SQLite in the data dir; a throw-away PostgreSQL server when
installed) and each worker count: `dicom-node serve` (SCP, watcher, exporter, no
workers) and N `dicom-node worker --device cpu` processes on one data dir, a DCMTK
storescp as the TPS (tests/helpers/node_processes.py). First a warm-up round of
one job per worker (a worker's first job builds its model and pays torch's
first-call costs, seconds that would otherwise swamp 20 cheap jobs; reported
apart). Then the workers are paused (SIGSTOP, between transactions), the series
are sent over real associations and queued, and the workers are resumed
together: the clock runs from the resume to the moment no job is queued or
running any more (inference and outputs written, the workers' share), and on to
the last job `done` (exported).
The model is the tiny test package (64 px input, no N4), so a job costs about a
second of CPU and the figure is the node's own overhead plus that.

    nice -n 10 env PYTHONPATH=. .venv/bin/python bench/workers.py [--series 20] [--repeats 3] [--databases sqlite,postgresql]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from dicom_node.peers import send_series
from inference.synthetic.phantoms import generate_phantom, write_phantom_series
from storage.models import JobState
from tests.dicom_node.conftest import wait_for
from tests.helpers.node_processes import Cluster, make_contouring_model
from tests.helpers.postgres import PostgresServer, postgres_bin_dir, wait_ready


@dataclass(frozen=True)
class Figures:
    warm_up_s: float  # resume -> each worker's first job (model built, first forward pass) finished
    inferred_s: float  # resume -> no job queued or running (the measured series)
    done_s: float  # resume -> every measured job done (exported)
    jobs_per_min: float  # from inferred_s
    split: list[int]  # measured jobs per worker


def run(
    work: Path, model: Path, warm_up: list[list[Path]], series: list[list[Path]], url: str, workers: int
) -> Figures:
    """One measurement with `workers` worker processes: a warm-up round of one job per worker, then `series`
    queued while the workers are paused and timed from their resume."""
    nodes = Cluster(work, model, 60, url)
    busy = {JobState.QUEUED, JobState.RUNNING}

    def queue_paused(batch: list[list[Path]], total: int) -> None:
        for process in started:
            nodes.freeze(process)
        for files in batch:
            send_series(files, nodes.port)
        wait_for(
            lambda: len(nodes.jobs()) == total and sum(j.state == JobState.QUEUED for j in nodes.jobs()) == len(batch),
            timeout=300,
            interval=0.2,
        )

    def resume_until_idle() -> float:
        start = time.monotonic()
        for process in started:
            os.kill(process.pid, signal.SIGCONT)
        wait_for(lambda: not any(j.state in busy for j in nodes.jobs()), timeout=900, interval=0.1)
        return time.monotonic() - start

    try:
        nodes.serve(local_workers=0)
        started = nodes.workers(*(f"worker-{k}" for k in range(workers)))
        # Each worker's first job builds its model and pays torch's first-call costs (seconds): one job each,
        # queued while all are paused, so every worker takes exactly one (the first lasts far longer than a claim).
        queue_paused(warm_up[:workers], workers)
        warm_up_s = resume_until_idle()
        warmed = {j.claimed_by.split(":")[1] for j in nodes.jobs()}
        assert warmed == {str(p.pid) for p in started}, f"a worker missed the warm-up: {warmed}"
        queue_paused(series, workers + len(series))
        start = time.monotonic()
        inferred = resume_until_idle()
        jobs = nodes.wait_all_done(workers + len(series), timeout=300)
        delivered = time.monotonic() - start
        failed = [j for j in jobs if j.state != JobState.DONE or j.attempts != 1]
        assert not failed, [(j.id, j.state.value, j.attempts, j.reason) for j in failed]
        measured = jobs[workers:]
        by_worker = sorted(sum(1 for j in measured if j.claimed_by.split(":")[1] == str(p.pid)) for p in started)
        return Figures(warm_up_s, inferred, delivered, 60 * len(series) / inferred, by_worker)
    finally:
        nodes.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--series", type=int, default=20)
    parser.add_argument("--slices", type=int, default=12)
    parser.add_argument("--matrix", type=int, default=64)
    parser.add_argument("--databases", default="sqlite,postgresql")
    parser.add_argument("--repeats", type=int, default=1, help="1- and 2-worker runs alternated; medians reported")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="workers-bench-"))
    model = make_contouring_model(work / "model")
    phantoms = [
        write_phantom_series(
            generate_phantom(9000 + k, orientation="axial", matrix=args.matrix, slices=args.slices, n_lesions=1),
            work / f"series-{k}",
            patient_id=f"BENCH{k:02d}",
            series_description="T1 CE AX",
        )
        for k in range(args.series + 2)
    ]
    warm_up, series = phantoms[:2], phantoms[2:]
    databases = args.databases.split(",")
    server = None
    if "postgresql" in databases and postgres_bin_dir() is None:
        print("PostgreSQL not installed: SQLite only")
        databases.remove("postgresql")
    try:
        for database in databases:
            if database == "postgresql" and server is None:
                server = PostgresServer()
                wait_ready(server)
            rates: dict[int, list[float]] = {1: [], 2: []}
            for repeat in range(args.repeats):
                for workers in (1, 2):  # alternated, so that a change in the machine's load hits both
                    folder = work / f"{database}-{workers}-{repeat}"
                    folder.mkdir()
                    if database == "postgresql":
                        assert server is not None
                        url = server.create_database(f"bench_{workers}_{repeat}")
                    else:
                        url = f"sqlite:///{folder}/var/dicom-node.db"
                    f = run(folder, model, warm_up, series, url, workers)
                    rates[workers].append(f.jobs_per_min)
                    print(
                        f"{database}: {workers} worker(s): warm-up {f.warm_up_s:.1f} s; {args.series} jobs inferred in"
                        f" {f.inferred_s:.1f} s ({f.jobs_per_min:.1f} jobs/min), all done in {f.done_s:.1f} s;"
                        f" jobs per worker {f.split}",
                        flush=True,
                    )
                print(f"{database}: run {repeat + 1}: 2 / 1 = {rates[2][-1] / rates[1][-1]:.2f}", flush=True)
            one, two = statistics.median(rates[1]), statistics.median(rates[2])
            print(
                f"{database}: median jobs/min {one:.1f} (1 worker), {two:.1f} (2 workers): 2 / 1 = {two / one:.2f}",
                flush=True,
            )
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
