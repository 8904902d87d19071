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
  `git archive d8709be | tar -x -C /tmp/base`): the same command with that
  tree first on PYTHONPATH, so "node / node before" is measured in one run.

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

from dicom_node.peers import find_dcmtk, free_port, wait_listening
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
        "DICOM_NODE__HTTP__ENABLED": "false",
        "PYTHONPATH": str(source),
    }
    return process_receiver([sys.executable, "-m", "dicom_node.cli", "serve"], port, "DICOMNODE", env)


def bare(folder: Path) -> Receiver:
    port = free_port()
    return process_receiver([sys.executable, "-c", BARE_SCP, str(folder), str(port)], port, "BARE")


def storescp(folder: Path) -> Receiver:
    port = free_port()
    binary = find_dcmtk("storescp") or "storescp"
    return process_receiver([binary, "-aet", "STORESCP", "-od", str(folder), str(port)], port, "STORESCP", DCMTK_ENV)


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
    return process_receiver(["Orthanc", str(folder / "orthanc.json")], port, "ORTHANC")


def send(port: int, called: str, files: list[Path]) -> None:
    binary = find_dcmtk("storescu") or "storescu"
    result = subprocess.run(
        [binary, "-aet", "BENCH", "-aec", called, "127.0.0.1", str(port), *map(str, files)],
        capture_output=True, text=True, env=DCMTK_ENV,
    )  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"storescu to {called} failed: {result.stderr[-500:]}")


@dataclass
class Run:
    seconds: float
    cpu_s: float
    peak_rss_kb: int | None


def timed_run(start: Callable[[Path], Receiver], folder: Path, batches: list[list[Path]]) -> Run:
    """Start a receiver, send `batches` at once (one storescu each), stop it."""
    folder.mkdir(parents=True)
    receiver = start(folder)
    try:
        cpu = receiver.cpu_s()
        began = time.perf_counter()
        with ThreadPoolExecutor(len(batches)) as pool:
            list(pool.map(lambda files: send(receiver.port, receiver.ae, files), batches))
        elapsed = time.perf_counter() - began
        run = Run(elapsed, receiver.cpu_s() - cpu, receiver.peak_rss_kb())
    finally:
        receiver.stop()
        shutil.rmtree(folder, ignore_errors=True)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrent", type=int, default=4)
    parser.add_argument("--matrix", type=int, default=512)
    parser.add_argument("--slices", type=int, default=176)
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these receivers (node always)")
    parser.add_argument("--baseline", type=Path, help="a source tree of the node to compare with (module doc)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ingest-bench-"))
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
        receivers = {name: start for name, start in receivers.items() if name == "node" or name in args.only}

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
    print(json.dumps(report, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
