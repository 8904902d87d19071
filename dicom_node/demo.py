"""The demo: the whole product on one machine, with nothing configured.

Starts a receiving node standing in for the TPS (DCMTK `storescp` when
installed, else a pynetdicom Store SCP), starts this node with the embedded
defaults on free loopback ports, generates a synthetic T1-CE study (a phantom
seed the demo model never saw), sends it with C-STORE (DCMTK `storescu` when
installed, else pynetdicom), waits for the job and prints what a physicist
wants to see. The overlay PNG is drawn from the RTSTRUCT *as received by the
TPS*, not from the node's internal mask, so it shows what the TPS imports.
"""

from __future__ import annotations

import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pydicom
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from dicom_node import peers
from dicom_node.overlay import overlay_png
from dicom_node.peers import ReceivingNode, free_port
from dicom_node.service import NodeService
from dicom_node.settings import Destination, RoutingRule, Settings
from storage.jobs import list_jobs, load_job
from storage.models import SETTLED_STATES, EventKind, Job, JobState

DEMO_SEED = 90210  # never used for training (see inference/model/shipped/mtsa-demo/MODEL_CARD.md)


def send_series(files: list[Path], port: int, console: Console) -> str:
    """C-STORE every file to the node, with a progress bar; returns the sender's name."""
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        task = progress.add_task("C-STORE to DICOMNODE", total=len(files))
        return peers.send_series(files, port, on_sent=lambda n: progress.advance(task, n))


def wait_for_job(service: NodeService, console: Console, timeout_s: float = 900) -> Job:
    """Follow the job's events live until it ends."""
    deadline = time.monotonic() + timeout_s
    seen = 0
    with console.status("waiting for the series to complete (quiet period)...") as status:
        while time.monotonic() < deadline:
            jobs = list_jobs(service.db)
            if jobs:
                job = load_job(service.db, jobs[0].id)
                for event in job.events[seen:]:
                    duration = f" ({event.duration_s:.1f} s)" if event.duration_s is not None else ""
                    console.print(
                        f"  [dim]{event.at:%H:%M:%S}[/] {event.kind.value:6} {event.message}{duration}", highlight=False
                    )
                    status.update(f"job {job.id}: {job.state.value}...")
                seen = len(job.events)
                if job.state in SETTLED_STATES:
                    return job
            time.sleep(0.2)
    raise TimeoutError("the job did not finish in time")


def print_report(job: Job, receiver: ReceivingNode, console: Console) -> None:
    summary = job.summary or {}
    model = summary.get("model", {})
    console.rule(f"Job {job.id}: {job.state.value}")
    if job.reason:
        console.print(f"[red]reason:[/] {job.reason}")
    stages = Table("stage", "duration (s)", title="Stage timings")
    for event in job.events:
        if event.kind == EventKind.STAGE:
            stages.add_row(event.message, f"{event.duration_s:.2f}")
    console.print(stages)
    lesions = Table("lesion", "volume (cm3)", "max diameter (mm)", title="Lesions (GTV)")
    for lesion in summary.get("lesions", []):
        lesions.add_row(lesion["name"], f"{lesion['volume_cm3']:.3f}", f"{lesion['max_diameter_mm']:.1f}")
    console.print(lesions)
    egfr = summary.get("egfr", {})
    probability = egfr.get("mutant_probability")
    console.print(
        f"EGFR: [bold]{egfr.get('call', '?')}[/]"
        + (f" (mutant probability {probability:.3f})" if probability is not None else "")
    )
    console.print(
        f"Model: {model.get('name', '?')} {model.get('version', '')}"
        + ("  [bold red]DEMO MODEL - synthetic data - NOT FOR CLINICAL USE[/]" if model.get("is_demo") else "")
    )
    console.print(f"Received by the TPS ({receiver.kind}, AE {receiver.ae_title} on port {receiver.port}):")
    for path in receiver.received():
        header = pydicom.dcmread(path, stop_before_pixels=True)
        console.print(f"  {header.Modality:8} {header.SeriesDescription}  ->  {path}", highlight=False)


@dataclass
class DemoResult:
    job: Job
    received: list[Path]
    overlay: Path | None


def run_demo(
    out_dir: Path,
    *,
    seed: int = DEMO_SEED,
    matrix: int | None = None,
    slices: int | None = None,
    console: Console | None = None,
    keep_running: bool = False,
) -> DemoResult:
    """Run the whole demo in `out_dir` (wiped first); see the module docstring.

    The node serves its operations view on a free loopback port, with a
    one-off physicist login so the actions can be tried; `keep_running`
    leaves everything up until Ctrl-C so a newcomer can click through the job.
    """
    from dicom_node.http.auth import hash_secret, new_token
    from dicom_node.settings.schema import HttpUser
    from inference.synthetic.phantoms import generate_phantom, write_phantom_series

    console = console or Console()
    out_dir = out_dir.resolve()
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    tps_port = free_port()
    receiver = ReceivingNode(out_dir / "tps-received", tps_port)
    console.print(f"[bold]1.[/] receiving node (the TPS): {receiver.kind}, AE TPS on 127.0.0.1:{tps_port}")
    settings = Settings(
        destinations=[Destination(name="tps", ae_title="TPS", host="127.0.0.1", port=tps_port)],
        rules=[RoutingRule(name="brain-mr", model="default", match={"Modality": "MR"}, destinations=["tps"])],
    ).model_copy(deep=True)
    settings.node.port = free_port()
    settings.storage.data_dir = out_dir / "node-data"
    settings.series.quiet_period_s = 3
    settings.series.check_interval_s = 0.5
    settings.export.retry_initial_s = 1
    password = new_token()[:16]
    settings.http.enabled = True
    settings.http.port = free_port()
    settings.http.users = [HttpUser(name="demo", role="physicist", password_hash=hash_secret(password))]
    service = NodeService(settings)
    try:
        host, port = service.start()
        assert service.http is not None  # the demo's settings enable it
        console.print(f"[bold]2.[/] this node: AE DICOMNODE on {host}:{port}, data in {settings.storage.data_dir}")
        console.print(
            f"   dashboard: [bold]{service.http.url}[/] (actions: log in as demo / {password})", highlight=False
        )
        with console.status("generating a synthetic T1-CE study (MNI template + metastases)..."):
            phantom = generate_phantom(seed, orientation="axial", matrix=matrix, slices=slices)
            files = write_phantom_series(phantom, out_dir / "study", patient_name="DEMO^PHANTOM", patient_id="DEMO0001")
        console.print(
            f"[bold]3.[/] synthetic study: {len(files)} slices, {len(phantom.lesion_diameters_mm)} "
            f"simulated lesion(s) {phantom.lesion_diameters_mm} mm, in {out_dir / 'study'}"
        )
        sender = send_series(files, port, console)
        console.print(f"[bold]4.[/] sent with {sender}; following the job:")
        job = wait_for_job(service, console)
        if job.state == JobState.DONE:
            deadline = time.monotonic() + 10
            while len(receiver.received()) < len(job.exports) and time.monotonic() < deadline:
                time.sleep(0.2)
        print_report(job, receiver, console)
        rtstructs = [
            p for p in receiver.received() if pydicom.dcmread(p, stop_before_pixels=True).Modality == "RTSTRUCT"
        ]
        overlay = None
        if rtstructs:
            overlay = overlay_png(
                files, rtstructs[0], out_dir / "overlay.png", caption="contours from the RTSTRUCT received by the TPS"
            )
            console.print(f"Overlay of the received contours on key slices: [bold]{overlay}[/]")
        console.print(
            f"Follow it later: dicom-node jobs show {job.id} "
            f"(with DICOM_NODE__STORAGE__DATA_DIR={settings.storage.data_dir})"
        )
        if keep_running:
            console.print(
                f"[bold]The node keeps running:[/] open {service.http.url}jobs/{job.id} "
                f"(log in as demo / {password} to retry or re-export). Ctrl-C stops it.",
                highlight=False,
            )
            _wait_for_ctrl_c()
        return DemoResult(job=job, received=receiver.received(), overlay=overlay)
    finally:
        service.stop()
        receiver.stop()


def _wait_for_ctrl_c() -> None:
    """Until SIGINT (Ctrl-C) or SIGTERM. The handlers are installed here, because a process can
    inherit SIGINT as ignored (started in the background by a shell, or by a test runner's worker)."""
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    while not stop.wait(3600):
        pass
