"""Ingest benchmark: the node's C-STORE receive against Orthanc, a bare pynetdicom SCP and DCMTK storescp.

One 176-slice 512x512 MR series (synthetic phantom) is sent with DCMTK
`storescu` over one association to each receiver in turn, `--repeats` times,
alternating receivers so machine noise hits all of them alike; then
`--concurrent` series are sent at once by as many `storescu` processes
(aggregate time). DCMTK runs with `TCP_NODELAY=1` (Nagle off, as in a tuned
PACS; with Nagle on both DCMTK peers wait on delayed ACKs). Each receiver runs
as its own process, so the node's peak resident memory (VmHWM) is its own.

Receivers:
- node: `dicom-node serve` with the embedded defaults (fsync'd file, directory
  fsync, committed SQLite WAL row before each success), no workers;
- Orthanc (Debian package, when installed): fsync'd storage, SQLite index;
- bare pynetdicom SCP: writes the received bytes, no fsync, no database;
- DCMTK storescp: writes files, not durable.

- node at a baseline (`--baseline DIR`, a source tree such as
  `git archive 4cda199 | tar -x -C /tmp/base`, the node when issue #18 was
  filed): the same command with that tree first on PYTHONPATH, so "node /
  node before" is measured in one run.

After each run the receiver's files must hold exactly the SOP Instance UIDs sent.
Orthanc gets `TCP_NODELAY=1` too: its network layer is DCMTK's.

Also measured (each against its reference in the same run):
- the floor of the node's durable design: its durable steps alone (write with
  sha256, fsyncs, one SQLite commit; `durable_floor`) plus the time per instance
  of `storescp --ignore` (receives, answers, stores nothing);
- memory: the node's resident memory (VmRSS) sampled while one association
  stores a `--rss-instances` series of small images, by quarter of the send;
- sending: the node's `Exporter` delivering a job's RTSTRUCT + SR to DCMTK
  `storescp`, against DCMTK `storescu` sending the same two files to it. The
  exporter sends job outputs only; there is no series forwarding to measure.

    .venv/bin/python bench/ingest.py [--repeats 3] [--concurrent 4] [--baseline /tmp/base]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import inference
from dicom_node.logging_setup import configure_logging
from dicom_node.peers import find_dcmtk, free_port, wait_listening
from dicom_node.settings import LoggingSettings
from inference.synthetic.phantoms import generate_phantom, write_phantom_series

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}

BARE_SCP = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts, evt
    folder, port = Path(sys.argv[1]), int(sys.argv[2])
    ae = AE(ae_title="BARE")
    for context in StoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    def handle(event):
        (folder / f"{event.request.AffectedSOPInstanceUID}.dcm").write_bytes(event.encoded_dataset())
        return 0x0000
    ae.maximum_associations = 16
    ae.start_server(("127.0.0.1", port), block=True, evt_handlers=[(evt.EVT_C_STORE, handle)])
    """
)


@dataclass
class Receiver:
    """A receiving process: where to send, and what it used (from /proc, while it runs)."""

    port: int
    ae: str
    process: subprocess.Popen

    def peak_rss_kb(self) -> int | None:
        try:
            for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        except OSError:
            return None
        return None

    def rss_kb(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def cpu_s(self) -> float:
        """User + system CPU seconds so far: what the receiver costs on a shared machine."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def process_receiver(command: list[str], port: int, ae: str, env: dict[str, str] | None = None) -> Receiver:
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_listening(port, 60)
    return Receiver(port, ae, process)


REPO = Path(__file__).resolve().parents[1]
if not Path(inference.__file__).resolve().is_relative_to(REPO):  # the exporter run imports this tree's node
    raise SystemExit(f"run with the virtual environment of {REPO}: its packages are imported from elsewhere")


def node(folder: Path, source: Path = REPO) -> Receiver:
    """`dicom-node serve` from the source tree `source` (this checkout by default)."""
    port = free_port()
    env = {
        **os.environ,
        "DICOM_NODE__NODE__PORT": str(port),
        "DICOM_NODE__NODE__MAX_ASSOCIATIONS": "16",
        "DICOM_NODE__NODE__MIN_FREE_DISK_MB": "1",
        "DICOM_NODE__STORAGE__DATA_DIR": str(folder),
        "DICOM_NODE__WORKER__COUNT": "0",
        "DICOM_NODE__SERIES__QUIET_PERIOD_S": "3600",
        "DICOM_NODE__LOGGING__FORMAT": "json",
        "DICOM_NODE__LOGGING__LEVEL": "WARNING",
        "PYTHONPATH": str(source),
    }
    if (source / "dicom_node" / "http").is_dir():  # a baseline from before the HTTP view has no such section
        env["DICOM_NODE__HTTP__ENABLED"] = "false"
    return process_receiver([sys.executable, "-m", "dicom_node.cli", "serve"], port, "DICOMNODE", env)


def bare(folder: Path) -> Receiver:
    port = free_port()
    return process_receiver([sys.executable, "-c", BARE_SCP, str(folder), str(port)], port, "BARE")


def storescp(folder: Path, *options: str) -> Receiver:
    port = free_port()
    binary = find_dcmtk("storescp") or "storescp"
    command = [binary, *options, "-aet", "STORESCP", "-od", str(folder), str(port)]
    return process_receiver(command, port, "STORESCP", DCMTK_ENV)


def storescp_ignoring(folder: Path) -> Receiver:
    """DCMTK storescp that receives and answers but stores nothing (`--ignore`): the network alone."""
    return storescp(folder, "--ignore")


def orthanc(folder: Path) -> Receiver:
    port, http = free_port(), free_port()
    config = {
        "StorageDirectory": str(folder / "storage"), "IndexDirectory": str(folder / "index"),
        "DicomAet": "ORTHANC", "DicomPort": port, "HttpPort": http, "RemoteAccessAllowed": False,
        "DicomAlwaysAllowStore": True, "DicomCheckCalledAet": False, "Plugins": [],
        "SyncStorageArea": True, "MaximumStorageCacheSize": 0,
    }  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "orthanc.json").write_text(json.dumps(config))
    return process_receiver(["Orthanc", str(folder / "orthanc.json")], port, "ORTHANC", DCMTK_ENV)  # DCMTK inside


def send(port: int, called: str, files: list[Path], *options: str) -> None:
    binary = find_dcmtk("storescu") or "storescu"
    result = subprocess.run(
        [binary, *options, "-aet", "BENCH", "-aec", called, "127.0.0.1", str(port), *map(str, files)],
        capture_output=True, text=True, env=DCMTK_ENV,
    )  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"storescu to {called} failed: {result.stderr[-500:]}")


@dataclass
class Run:
    seconds: float
    cpu_s: float
    peak_rss_kb: int | None


def timed_run(start: Callable[[Path], Receiver], folder: Path, batches: list[list[Path]], *, keeps: bool = True) -> Run:
    """Start a receiver, send `batches` at once (one storescu each), stop it.

    With `keeps`, raises unless the receiver's files hold exactly the SOP Instance UIDs sent
    (storescu's exit status covers refusals, not a receiver that answers Success and keeps nothing)."""
    folder.mkdir(parents=True)
    receiver = start(folder)
    try:
        cpu = receiver.cpu_s()
        began = time.perf_counter()
        with ThreadPoolExecutor(len(batches)) as pool:
            list(pool.map(lambda files: send(receiver.port, receiver.ae, files), batches))
        elapsed = time.perf_counter() - began
        run = Run(elapsed, receiver.cpu_s() - cpu, receiver.peak_rss_kb())
        receiver.stop()
        if keeps:
            sent = sorted(instance_uid(f) for files in batches for f in files)
            kept = sorted(instance_uid(f) for f in folder.rglob("*") if f.is_file() and is_dicom(f))
            if kept != sent:
                raise RuntimeError(f"{folder.name}: kept {len(kept)} instance files, not the {len(sent)} sent")
    finally:
        receiver.stop()
        shutil.rmtree(folder, ignore_errors=True)
    return run


def is_dicom(path: Path) -> bool:
    """A DICOM Part 10 file: "DICM" after the 128-byte preamble."""
    with path.open("rb") as f:
        return f.read(132)[128:] == b"DICM"


def instance_uid(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)


def durable_floor(work: Path, instance: Path, count: int = 200) -> dict[str, float]:
    """Milliseconds per instance of the node's durable steps alone, without any DICOM: write the
    bytes in 128 KiB pieces while hashing them (sha256), fsync the file, rename it and fsync its
    directory, commit one row in SQLite (WAL, synchronous=FULL). "overlapped" is what they cost
    when, as in the node, the fsyncs run while the row commits: the write, then the longer of the
    two. With `storescp --ignore`'s time (the network and DCMTK's own handling, nothing stored),
    that is the floor of this node's durable design on this machine."""
    import hashlib
    import sqlite3

    data = instance.read_bytes()
    (work / "tmp").mkdir(parents=True)
    (work / "kept").mkdir()
    db = sqlite3.connect(work / "floor.db", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE instance (uid TEXT PRIMARY KEY, path TEXT, sha256 TEXT, size INTEGER)")
    directory = os.open(work / "kept", os.O_RDONLY)
    steps: dict[str, list[float]] = {"write and sha256": [], "fsync file": [], "rename, fsync dir": [], "commit": []}
    try:
        for k in range(count):
            t0 = time.perf_counter()
            digest = hashlib.sha256()
            with open(work / "tmp" / str(k), "wb") as out:
                for offset in range(0, len(data), 128 * 1024):
                    piece = data[offset : offset + 128 * 1024]
                    out.write(piece)
                    digest.update(piece)
                out.flush()
                t1 = time.perf_counter()
                os.fsync(out.fileno())
            t2 = time.perf_counter()
            os.rename(work / "tmp" / str(k), work / "kept" / str(k))
            os.fsync(directory)
            t3 = time.perf_counter()
            db.execute("BEGIN")
            db.execute("INSERT INTO instance VALUES (?, ?, ?, ?)", (str(k), f"kept/{k}", digest.hexdigest(), len(data)))
            db.execute("COMMIT")
            t4 = time.perf_counter()
            for name, seconds in zip(steps, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                steps[name].append(seconds * 1000)
    finally:
        os.close(directory)
        db.close()
    median = {name: round(statistics.median(values), 3) for name, values in steps.items()}
    overlapped = median["write and sha256"] + max(median["fsync file"] + median["rename, fsync dir"], median["commit"])
    return {**median, "in sequence": round(sum(median.values()), 3), "overlapped": round(overlapped, 3)}


def rss_across_series(folder: Path, files: list[Path]) -> dict[str, float]:
    """The node's VmRSS (MB) sampled every 50 ms while one association stores `files`:
    the largest sample in each quarter of the send, and the first one."""
    folder.mkdir(parents=True)
    receiver = node(folder)
    samples: list[tuple[float, int]] = []
    try:
        began = time.perf_counter()
        with ThreadPoolExecutor(1) as pool:
            sending = pool.submit(send, receiver.port, receiver.ae, files)
            while not sending.done():
                samples.append((time.perf_counter() - began, receiver.rss_kb()))
                time.sleep(0.05)
            sending.result()
        elapsed = time.perf_counter() - began
    finally:
        receiver.stop()
        shutil.rmtree(folder, ignore_errors=True)
    quarters = {
        f"max in quarter {q + 1}": max(
            (kb for t, kb in samples if q * elapsed / 4 <= t < (q + 1) * elapsed / 4), default=0
        )
        / 1024
        for q in range(4)
    }
    return {"first sample": round(samples[0][1] / 1024, 1), **{k: round(v, 1) for k, v in quarters.items()}}


def exporter_vs_storescu(work: Path, series_file: Path, repeats: int) -> dict[str, object]:
    """Seconds to deliver one job's RTSTRUCT + SR: the node's Exporter vs DCMTK storescu (median)."""
    import pydicom
    from writers import in_memory_series, result_with_lesions  # bench/ is the script's directory

    from dicom_node.export_targets import ExportTargets
    from dicom_node.exporter import Exporter
    from dicom_node.settings import Destination, ExportSettings
    from dicom_node.store_scp import instance_meta
    from inference.outputs.dicom_outputs import write_dicom_outputs
    from storage.database import Database
    from storage.ingest import store_instance
    from storage.instance_store import InstanceStore
    from storage.jobs import RoutingOutcome, claim_next_job, complete_series, record_outputs

    written = write_dicom_outputs(result_with_lesions(in_memory_series(512, 176), 10), work / "outputs")
    files = [output.path for output in written]
    store = InstanceStore(work / "exporter-node")
    db = Database(f"sqlite:///{work / 'exporter-node' / 'jobs.db'}")
    ds = pydicom.dcmread(series_file, stop_before_pixels=True)
    store_instance(db, store, instance_meta(ds, ds.file_meta.TransferSyntaxUID, "BENCH"), series_file.read_bytes())
    port = free_port()
    (work / "tps").mkdir()
    tps = process_receiver(
        [find_dcmtk("storescp") or "storescp", "-aet", "TPS", "-od", str(work / "tps"), str(port)],
        port, "TPS", DCMTK_ENV,
    )  # fmt: skip
    destination = Destination(name="tps", ae_title="TPS", host="127.0.0.1", port=port)
    exporter = Exporter(db, store, [destination], ExportSettings(), "DICOMNODE")
    times: dict[str, list[float]] = {"node exporter": [], "DCMTK storescu": []}
    try:
        for _ in range(repeats):
            job_id = complete_series(db, 1, RoutingOutcome("r", "default", ["tps"], "bench"))
            claim_next_job(db, "bench")
            out_dir = store.attempt_outputs(job_id, 1)
            out_dir.mkdir(parents=True)
            outputs = []
            for path in files:
                copy = Path(shutil.copy(path, out_dir / path.name))
                header = pydicom.dcmread(copy, stop_before_pixels=True)
                outputs.append(
                    (str(header.SOPInstanceUID), str(header.SOPClassUID), copy.relative_to(store.root).as_posix())
                )
            relative_dir = out_dir.relative_to(store.root).as_posix()
            record_outputs(db, job_id, relative_dir, {"outputs": outputs}, ExportTargets([]).rows(["tps"], outputs))
            began = time.perf_counter()
            if exporter.run_once() != len(files):
                raise RuntimeError("the exporter did not send both outputs")
            times["node exporter"].append(time.perf_counter() - began)
            began = time.perf_counter()
            send(port, "TPS", files, "--required")  # only the contexts the files need, as the exporter
            times["DCMTK storescu"].append(time.perf_counter() - began)
    finally:
        tps.stop()
        db.dispose()
    median = {name: statistics.median(values) for name, values in times.items()}
    return {
        "objects": f"RTSTRUCT + SR, {sum(f.stat().st_size for f in files) / 1e6:.2f} MB",
        "median_s": {k: round(v, 3) for k, v in median.items()},
        "exporter_time_ratio_vs_storescu": round(median["node exporter"] / median["DCMTK storescu"], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrent", type=int, default=4)
    parser.add_argument("--matrix", type=int, default=512)
    parser.add_argument("--slices", type=int, default=176)
    parser.add_argument("--rss-instances", type=int, default=1000, help="small instances for the RSS run (0: skip)")
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="NAME",
        help="run only the receivers whose name contains one of these words (the node, and the baseline "
        "when given, always run)",
    )
    parser.add_argument("--baseline", type=Path, help="a source tree of the node to compare with (module doc)")
    args = parser.parse_args()
    configure_logging(LoggingSettings(format="json", level="WARNING"))  # stdout is the report alone
    work = Path(tempfile.mkdtemp(prefix="ingest-bench-"))
    try:
        print(json.dumps(run_all(args, work), indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_all(args: argparse.Namespace, work: Path) -> dict[str, object]:
    """Every measurement of the module doc; the report as a dict."""
    series = []
    for k in range(max(1, args.concurrent)):
        phantom = generate_phantom(7 + k, orientation="axial", matrix=args.matrix, slices=args.slices)
        series.append(write_phantom_series(phantom, work / f"series-{k}", patient_id=f"BENCH{k}"))
    megabytes = sum(f.stat().st_size for f in series[0]) / 1e6
    receivers: dict[str, Callable[[Path], Receiver]] = {"node": node}
    if args.baseline is not None:
        baseline = args.baseline.resolve()
        receivers["node before"] = lambda folder: node(folder, baseline)
    if shutil.which("Orthanc"):
        receivers["Orthanc"] = orthanc
    else:
        print("Orthanc not installed (Debian package 'orthanc'): skipped", file=sys.stderr)
    receivers |= {"bare pynetdicom SCP": bare, "DCMTK storescp": storescp}
    if args.only:
        wanted = [word.lower() for word in args.only]  # a word of the name is enough: --only bare orthanc
        receivers = {
            name: start
            for name, start in receivers.items()
            if name.startswith("node") or any(word in name.lower() for word in wanted)
        }

    one: dict[str, list[Run]] = {name: [] for name in receivers}
    for repeat in range(args.repeats):
        for name, start in receivers.items():
            one[name].append(timed_run(start, work / f"{name.replace(' ', '_')}-{repeat}", [series[0]]))
    many: dict[str, Run] = {}
    if args.concurrent > 1:
        for name, start in receivers.items():
            many[name] = timed_run(start, work / f"{name.replace(' ', '_')}-many", series)

    median = {name: statistics.median(run.seconds for run in runs) for name, runs in one.items()}
    cpu = {name: statistics.median(run.cpu_s for run in runs) for name, runs in one.items()}
    peaks = {name: max(run.peak_rss_kb or 0 for run in runs) for name, runs in one.items()}
    report: dict[str, object] = {
        "series": f"{len(series[0])} slices {args.matrix}x{args.matrix}, {megabytes:.1f} MB; DCMTK TCP_NODELAY=1",
        "one_series_median_s": {k: round(v, 3) for k, v in median.items()},
        "instances_per_s": {k: round(len(series[0]) / v, 1) for k, v in median.items()},
        "node_time_ratio": {f"vs {k}": round(median["node"] / v, 2) for k, v in median.items() if k != "node"},
        "receiver_cpu_s_median": {k: round(v, 2) for k, v in cpu.items()},
        "node_cpu_ratio": {f"vs {k}": round(cpu["node"] / v, 2) for k, v in cpu.items() if k != "node" and v},
        "peak_rss_mb": {k: round(v / 1024, 1) for k, v in peaks.items() if v},
    }
    if many:
        report[f"{args.concurrent}_concurrent_series_s"] = {k: round(v.seconds, 3) for k, v in many.items()}
        report["node_time_ratio_concurrent"] = {
            f"vs {k}": round(many["node"].seconds / v.seconds, 2) for k, v in many.items() if k != "node"
        }
        report["peak_rss_mb_concurrent"] = {k: round((v.peak_rss_kb or 0) / 1024, 1) for k, v in many.items()}
    per_instance = {k: v * 1000 / len(series[0]) for k, v in median.items()}
    report["ms_per_instance"] = {k: round(v, 2) for k, v in per_instance.items()}
    if find_dcmtk("storescp"):
        ignoring = [timed_run(storescp_ignoring, work / f"ignore-{k}", [series[0]], keeps=False) for k in range(3)]
        network = statistics.median(run.seconds for run in ignoring) * 1000 / len(series[0])
        floor = durable_floor(work / "floor", series[0][0])
        lowest = network + floor["overlapped"]
        report["durable_steps_ms_per_instance"] = floor
        report["node_vs_floor"] = {
            "storescp --ignore ms": round(network, 2),
            "floor ms (storescp --ignore + durable steps overlapped)": round(lowest, 2),
            "node / floor": round(per_instance["node"] / lowest, 2),
            "half of node before / floor": (
                round(per_instance["node before"] / 2 / lowest, 2) if "node before" in per_instance else None
            ),
        }
    if args.rss_instances:
        small = generate_phantom(3, orientation="axial", matrix=64, slices=args.rss_instances)
        files = write_phantom_series(small, work / "small", patient_id="RSS")
        report[f"node_rss_mb_across_{args.rss_instances}_instances"] = rss_across_series(work / "rss", files)
    report["sending"] = exporter_vs_storescu(work / "sending", series[0][0], args.repeats)
    return report


if __name__ == "__main__":
    main()
