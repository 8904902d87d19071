"""Scale-out: jobs per minute with 1 and with 2 `dicom-node worker` processes, as a ratio (issue #16).

For each job store (SQLite in the data dir; a throw-away PostgreSQL server when
installed) and each worker count: `dicom-node serve` (SCP, watcher, exporter, no
workers) and N `dicom-node worker --device cpu` processes on one data dir, a DCMTK
storescp as the TPS (tests/helpers/node_processes.py). The workers are started
and paused (SIGSTOP, between transactions), the series are sent over real
associations and queued, then the workers are resumed together: the clock runs
from the resume to the moment no job is queued or running any more (inference and
outputs written, the workers' share), and on to the last job `done` (exported).
The model is the tiny test package (64 px input, no N4), so a job costs about a
second of CPU and the figure is the node's own overhead plus that.

    nice -n 10 env PYTHONPATH=. .venv/bin/python bench/workers.py [--series 20] [--databases sqlite,postgresql]
"""

from __future__ import annotations

import argparse
import os
import signal
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
    inferred_s: float  # resume -> no job queued or running
    done_s: float  # resume -> every job done (exported)
    jobs_per_min: float  # from inferred_s
    split: list[int]  # jobs per worker


def run(work: Path, model: Path, series: list[list[Path]], url: str, workers: int) -> Figures:
    """One measurement: `workers` worker processes, `series` queued while they are paused."""
    nodes = Cluster(work, model, 60, url)
    try:
        nodes.serve(local_workers=0)
        started = nodes.workers(*(f"worker-{k}" for k in range(workers)))
        for process in started:
            nodes.freeze(process)
        for files in series:
            send_series(files, nodes.port)
        wait_for(
            lambda: len(nodes.jobs()) == len(series) and all(j.state == JobState.QUEUED for j in nodes.jobs()),
            timeout=300,
            interval=0.2,
        )
        start = time.monotonic()
        for process in started:
            os.kill(process.pid, signal.SIGCONT)
        busy = {JobState.QUEUED, JobState.RUNNING}
        wait_for(lambda: not any(j.state in busy for j in nodes.jobs()), timeout=900, interval=0.1)
        inferred = time.monotonic() - start
        jobs = nodes.wait_all_done(len(series), timeout=300)
        delivered = time.monotonic() - start
        failed = [j for j in jobs if j.state != JobState.DONE or j.attempts != 1]
        assert not failed, [(j.id, j.state.value, j.attempts, j.reason) for j in failed]
        by_worker = sorted(sum(1 for j in jobs if j.claimed_by.split(":")[1] == str(p.pid)) for p in started)
        return Figures(inferred, delivered, 60 * len(series) / inferred, by_worker)
    finally:
        nodes.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--series", type=int, default=20)
    parser.add_argument("--slices", type=int, default=12)
    parser.add_argument("--matrix", type=int, default=64)
    parser.add_argument("--databases", default="sqlite,postgresql")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="workers-bench-"))
    model = make_contouring_model(work / "model")
    series = [
        write_phantom_series(
            generate_phantom(9000 + k, orientation="axial", matrix=args.matrix, slices=args.slices, n_lesions=1),
            work / f"series-{k}",
            patient_id=f"BENCH{k:02d}",
            series_description="T1 CE AX",
        )
        for k in range(args.series)
    ]
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
            figures = {}
            for workers in (1, 2):
                folder = work / f"{database}-{workers}"
                folder.mkdir()
                if database == "postgresql":
                    assert server is not None
                    url = server.create_database(f"bench_{workers}")
                else:
                    url = f"sqlite:///{folder}/var/dicom-node.db"
                figures[workers] = run(folder, model, series, url, workers)
                f = figures[workers]
                print(
                    f"{database}: {workers} worker(s): {args.series} jobs inferred in {f.inferred_s:.1f} s"
                    f" ({f.jobs_per_min:.1f} jobs/min), all done in {f.done_s:.1f} s; jobs per worker {f.split}",
                    flush=True,
                )
            ratio = figures[2].jobs_per_min / figures[1].jobs_per_min
            print(f"{database}: jobs/min 2 workers / 1 worker = {ratio:.2f}", flush=True)
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
