"""End-to-end latency: last C-STORE response -> RTSTRUCT arriving at the receiving node.

One 176-slice 512x512 synthetic series is sent with DCMTK `storescu` to the
node (demo model, one CPU worker); a pynetdicom Store SCP stands in for the
TPS and timestamps each arrival. The series-completion wait (quiet period
and check interval) is part of the latency and is reported separately, with
the job's stage breakdown from its events. Without `--quiet-period` and
`--check-interval` the `[series]` defaults apply (what a department gets out
of the box). `--settle S` waits S seconds between the node's start and the
send, as a node in service has been running before a study arrives (its
worker warms its model up meanwhile); by default the series is sent at once.
`--no-warm-up` replaces the worker's warm-up with nothing, to measure what it saves.

    .venv/bin/python bench/end_to_end.py [--quiet-period S] [--check-interval S] [--settle S] [--no-warm-up]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

from pynetdicom import AE, AllStoragePresentationContexts, evt

from dicom_node.logging_setup import configure_logging
from dicom_node.peers import find_dcmtk, free_port
from dicom_node.service import NodeService
from dicom_node.settings import Destination, LoggingSettings, RoutingRule, Settings
from dicom_node.worker import InferenceWorker
from inference.synthetic.phantoms import generate_phantom, write_phantom_series
from storage.jobs import list_jobs, load_job
from storage.models import EventKind, JobState, utcnow


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--matrix", type=int, default=512)
    parser.add_argument("--slices", type=int, default=176)
    parser.add_argument("--quiet-period", type=float, default=None, help="default: the [series] default")
    parser.add_argument("--check-interval", type=float, default=None, help="default: the [series] default")
    parser.add_argument("--settle", type=float, default=0.0, help="seconds between the node's start and the send")
    parser.add_argument("--no-warm-up", action="store_true", help="the worker takes its first job cold")
    args = parser.parse_args()
    if args.no_warm_up:
        InferenceWorker.warm_up = lambda self: None  # type: ignore[method-assign]
    configure_logging(LoggingSettings(format="json", level="ERROR"))
    work = Path(tempfile.mkdtemp(prefix="e2e-bench-"))
    files = write_phantom_series(
        generate_phantom(12, orientation="axial", matrix=args.matrix, slices=args.slices, n_lesions=3), work / "series"
    )
    arrivals: dict[str, float] = {}

    def on_store(event):
        arrivals[str(event.dataset.Modality)] = time.perf_counter()
        return 0x0000

    tps = AE(ae_title="TPS")
    tps.supported_contexts = AllStoragePresentationContexts
    tps_port = free_port()
    server = tps.start_server(("127.0.0.1", tps_port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    settings = Settings(
        destinations=[Destination(name="tps", ae_title="TPS", host="127.0.0.1", port=tps_port)],
        rules=[RoutingRule(name="mr", match={"Modality": "MR"}, destinations=["tps"])],
    )
    settings.node.port = 0
    settings.storage.data_dir = work / "node"
    if args.quiet_period is not None:
        settings.series.quiet_period_s = args.quiet_period
    if args.check_interval is not None:
        settings.series.check_interval_s = args.check_interval
    service = NodeService(settings)
    _, port = service.start()
    try:
        time.sleep(args.settle)
        send_start = time.perf_counter()
        subprocess.run(
            [find_dcmtk("storescu"), "-aec", "DICOMNODE", "127.0.0.1", str(port), *map(str, files)],
            check=True,
            capture_output=True,
        )
        last_response, last_response_at = time.perf_counter(), utcnow()
        while "RTSTRUCT" not in arrivals and time.perf_counter() - last_response < 900:
            time.sleep(0.05)
        job = load_job(service.db, list_jobs(service.db)[0].id)
        queued_at = next(e.at for e in job.events if e.state == JobState.QUEUED)
    finally:
        service.stop()
        server.shutdown()
    latency = arrivals["RTSTRUCT"] - last_response
    wait = (queued_at - last_response_at).total_seconds()  # series completion: quiet period + check interval
    stages = {e.message: round(e.duration_s, 2) for e in job.events if e.kind == EventKind.STAGE}
    print(
        json.dumps(
            {
                "series": f"{len(files)} slices {args.matrix}x{args.matrix}",
                "send_s": round(last_response - send_start, 2),
                "latency_last_store_to_rtstruct_s": round(latency, 2),
                "quiet_period_s": settings.series.quiet_period_s,
                "check_interval_s": settings.series.check_interval_s,
                "completion_wait_s": round(wait, 2),
                "latency_without_completion_wait_s": round(latency - wait, 2),
                "sr_after_rtstruct_s": round(arrivals.get("SR", float("nan")) - arrivals["RTSTRUCT"], 2),
                "job_state": job.state.value,
                "stages_s": stages,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
