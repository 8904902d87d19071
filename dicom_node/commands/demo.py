"""`dicom-node demo`: the whole product end to end on loopback, nothing configured."""

from __future__ import annotations

from pathlib import Path

import typer


def demo(
    out: Path = typer.Option(Path("demo-output"), "--out", help="Working folder (wiped first)."),
    seed: int = typer.Option(90210, help="Phantom seed (the demo model never saw it)."),
    matrix: int | None = typer.Option(None, help="In-plane matrix of the synthetic series (default: random)."),
    slices: int | None = typer.Option(None, help="Number of slices (default: random)."),
    keep_running: bool = typer.Option(
        False, "--keep-running", help="Leave the node and its dashboard running until Ctrl-C."
    ),
) -> None:
    """Start a TPS stand-in and this node, send a synthetic study, show the results arriving."""
    from dicom_node.demo import run_demo
    from dicom_node.logging_setup import configure_logging
    from dicom_node.settings import LoggingSettings
    from storage.models import JobState

    configure_logging(LoggingSettings(format="console", level="ERROR"))
    result = run_demo(out, seed=seed, matrix=matrix, slices=slices, keep_running=keep_running)
    if result.job.state != JobState.DONE:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
