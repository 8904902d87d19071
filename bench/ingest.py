"""Ingest benchmark: node C-STORE throughput vs. a bare pynetdicom SCP and DCMTK storescp.

One 176-slice 512x512 MR series (synthetic phantom) is sent with DCMTK
`storescu` (one association) to each receiver in turn, `--repeats` times,
alternating receivers so machine noise hits all of them alike. Reported:
median seconds per series, instances per second, and the node's ratio to
each baseline. The node does everything a clinical receive needs (header
parse, UID validation, fsync'd file, directory fsync, committed SQLite row);
the bare SCP only writes the received bytes to a file.

    .venv/bin/python bench/ingest.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts, evt

from dicom_node.logging_setup import configure_logging
from dicom_node.peers import free_port
from dicom_node.service import NodeService
from dicom_node.settings import LoggingSettings, Settings
from inference.synthetic.phantoms import generate_phantom, write_phantom_series


def send(port: int, files: list[Path], called: str) -> float:
    start = time.perf_counter()
    result = subprocess.run(
        ["storescu", "-aet", "BENCH", "-aec", called, "127.0.0.1", str(port), *map(str, files)],
        capture_output=True,
        text=True,
    )
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(result.stderr)
    return elapsed


def bare_scp(folder: Path):
    ae = AE(ae_title="BARE")
    for context in StoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)

    def handle(event):
        (folder / f"{event.request.AffectedSOPInstanceUID}.dcm").write_bytes(event.encoded_dataset())
        return 0x0000

    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, handle)])
    return port, server.shutdown


def dcmtk_scp(folder: Path):
    port = free_port()
    process = subprocess.Popen(["storescp", "-aet", "STORESCP", "-od", str(folder), str(port)])
    time.sleep(0.5)
    return port, lambda: (process.terminate(), process.wait())


def node_scp(folder: Path):
    settings = Settings()
    settings.node.port = 0
    settings.storage.data_dir = folder
    settings.worker.count = 0
    settings.node.min_free_disk_mb = 1
    service = NodeService(settings)
    _, port = service.start()
    return port, service.stop


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--matrix", type=int, default=512)
    parser.add_argument("--slices", type=int, default=176)
    args = parser.parse_args()
    configure_logging(LoggingSettings(format="json", level="ERROR"))
    work = Path(tempfile.mkdtemp(prefix="ingest-bench-"))
    phantom = generate_phantom(7, orientation="axial", matrix=args.matrix, slices=args.slices)
    files = write_phantom_series(phantom, work / "series")
    megabytes = sum(f.stat().st_size for f in files) / 1e6
    receivers = {
        "node": (node_scp, "DICOMNODE"),
        "bare pynetdicom SCP": (bare_scp, "BARE"),
        "DCMTK storescp": (dcmtk_scp, "STORESCP"),
    }
    times: dict[str, list[float]] = {name: [] for name in receivers}
    for repeat in range(args.repeats):
        for name, (start, called) in receivers.items():
            folder = work / f"{name.replace(' ', '_')}-{repeat}"
            folder.mkdir()
            port, stop = start(folder)
            try:
                times[name].append(send(port, files, called))
            finally:
                stop()
            shutil.rmtree(folder)
    median = {name: statistics.median(values) for name, values in times.items()}
    report = {
        "series": f"{len(files)} slices {args.matrix}x{args.matrix}, {megabytes:.1f} MB",
        "median_s": {k: round(v, 3) for k, v in median.items()},
        "instances_per_s": {k: round(len(files) / v, 1) for k, v in median.items()},
        "node_time_ratio_vs_bare_pynetdicom": round(median["node"] / median["bare pynetdicom SCP"], 2),
        "node_time_ratio_vs_dcmtk_storescp": round(median["node"] / median["DCMTK storescp"], 2),
    }
    print(json.dumps(report, indent=2))
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
