"""The job-store half of a receive: `store_instance` per instance, this tree against a baseline tree.

`bench/ingest.py` times a whole receive, where the network and pynetdicom
dominate and a change of a tenth of a millisecond per instance is lost in the
noise. This times only what the Store SCP calls once a data set has arrived:
`storage.ingest.store_instance` for an instance streamed into an
`IncomingFile` (hashed, in `tmp/`), which checks for an existing row, moves the
file into place, fsyncs it and its directory while the row commits. The first
instance of the series (which opens its job) is stored untimed; each other one
is timed: the calling thread's CPU and the wall clock, per instance.

Each measurement runs in a fresh process with its tree first on PYTHONPATH,
against SQLite (in the data directory, WAL, `synchronous=FULL`) and against
PostgreSQL (a throw-away server from `tests.helpers.postgres`, run with
`fsync=off`: its figure is round trips and CPU, not disk flushes), trees
alternating, median of `--repeats`. The baseline must have the streamed
receive (`InstanceStore.incoming`, commit 4cda199 and earlier do not).

    .venv/bin/python bench/store_instance.py --baseline /tmp/base [--repeats 3] [--slices 176]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def measure(url: str, series: Path, work: Path) -> dict[str, float]:
    """In the tree on PYTHONPATH: store every instance of `series`, the first one untimed."""
    import pydicom

    from storage.database import Database
    from storage.ingest import InstanceMeta, store_instance
    from storage.instance_store import InstanceStore

    db = Database(url)
    store = InstanceStore(work / "data")
    if not hasattr(store, "incoming"):
        raise SystemExit("the baseline has no streamed receive (InstanceStore.incoming): use a later commit")
    cpu = wall = 0.0
    files = sorted(series.iterdir())
    for number, path in enumerate(files):
        data = path.read_bytes()
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        meta = InstanceMeta(
            str(ds.SOPInstanceUID), str(ds.SOPClassUID), str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
            str(ds.file_meta.TransferSyntaxUID), patient_id=str(ds.PatientID),
        )  # fmt: skip
        incoming = store.incoming(b"")
        incoming.write(data)
        incoming.complete()
        cpu_start, wall_start = time.thread_time(), time.perf_counter()
        store_instance(db, store, meta, incoming)
        if number:
            cpu += time.thread_time() - cpu_start
            wall += time.perf_counter() - wall_start
    db.dispose()
    timed = len(files) - 1
    return {"cpu_ms": cpu / timed * 1e3, "wall_ms": wall / timed * 1e3}


def run_tree(tree: Path, url: str, series: Path) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="store-bench-") as work:
        if url.startswith("sqlite"):
            url = f"sqlite:///{work}/jobs.db"
        result = subprocess.run(
            [sys.executable, __file__, "--measure", url, "--series", str(series), "--work", work],
            env={**os.environ, "PYTHONPATH": str(tree)},
            capture_output=True,
            text=True,
        )
    if result.returncode != 0:
        raise RuntimeError(f"measurement in {tree} failed: {result.stderr[-800:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, help="a source tree of the node to compare with (module doc)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--slices", type=int, default=176)
    parser.add_argument("--matrix", type=int, default=512)
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # the child process: a job store URL
    parser.add_argument("--series", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.series, args.work)))
        return
    if args.baseline is None:
        parser.error("--baseline is required")

    sys.path.insert(0, str(REPO))
    from inference.synthetic.phantoms import generate_phantom, write_phantom_series
    from tests.helpers.postgres import PostgresServer, postgres_bin_dir, wait_ready

    trees = {"node": REPO, "node before": args.baseline.resolve()}
    with tempfile.TemporaryDirectory(prefix="store-bench-series-") as folder:
        phantom = generate_phantom(7, orientation="axial", matrix=args.matrix, slices=args.slices)
        series = Path(folder) / "series"
        write_phantom_series(phantom, series, patient_id="BENCH")
        server = None
        if postgres_bin_dir() is not None:
            server = PostgresServer()
            wait_ready(server)
        else:
            print("PostgreSQL not installed (Debian package 'postgresql'): skipped", file=sys.stderr)
        runs: dict[str, dict[str, list[dict[str, float]]]] = {}
        try:
            for _ in range(args.repeats):
                for name, tree in trees.items():
                    for database in ["sqlite", "postgresql"] if server else ["sqlite"]:
                        url = (
                            "sqlite"
                            if server is None or database == "sqlite"
                            else server.create_database(f"b{time.monotonic_ns()}")
                        )
                        runs.setdefault(database, {}).setdefault(name, []).append(run_tree(tree, url, series))
        finally:
            if server is not None:
                server.stop()
    report: dict[str, object] = {"instances_timed": args.slices - 1, "repeats": args.repeats}
    for database, by_tree in runs.items():
        medians = {
            name: {key: round(statistics.median(r[key] for r in results), 3) for key in ("cpu_ms", "wall_ms")}
            for name, results in by_tree.items()
        }
        report[database] = {
            "per_instance": medians,
            "node / node before": {
                key: round(medians["node"][key] / medians["node before"][key], 2) for key in ("cpu_ms", "wall_ms")
            },
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
