"""`dicom-node evaluate`: score a model package on freshly generated phantoms.

A thin layer over `inference.evaluation.evaluate`; the engine is imported inside the
command so the rest of the CLI starts fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    """Add the `evaluate` command."""
    app.command(
        "evaluate",
        help=(
            "Run a model package through the full DICOM pipeline on N generated phantoms per style "
            "(seeds SEED..SEED+N-1; use seeds never used for training) and report, per style, lesion Dice "
            "(lesions >= 5 mm), detection sensitivity for lesions >= 10 mm, false-positive lesions per case "
            "and outside the brain, HD95, voxel precision/recall and patient EGFR accuracy/AUC, with issue 12's "
            "goals. Styles: randomised (own, the training style), unseen (held-out looks), classic."
        ),
    )(evaluate)


def evaluate(
    phantoms: Annotated[int, typer.Option(help="Number of phantoms per style.")] = 10,
    seed: Annotated[int, typer.Option(help="First phantom seed.")] = 90000,
    styles: Annotated[
        str, typer.Option(help="Comma-separated phantom styles: randomised (own), unseen, classic.")
    ] = "randomised,unseen",
    model: Annotated[
        Path | None, typer.Option(help="Model package directory (default: $DICOM_NODE_MODEL or the demo).")
    ] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda or auto.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write summary and per-phantom scores here.")] = None,
    sweep: Annotated[
        str | None,
        typer.Option(help="Comma-separated GTV thresholds: report segmentation per threshold instead (calibration)."),
    ] = None,
    sweep_min_volumes: Annotated[
        str | None,
        typer.Option(
            help="With --sweep: comma-separated minimum lesion volumes (mm3) to try (default: the package's)."
        ),
    ] = None,
) -> None:
    """Evaluate and print the summary of each style."""
    from inference.evaluation.evaluate import evaluate_package, goals_met, scores_as_dicts, threshold_sweep
    from inference.model.package import default_package_path, load_package
    from inference.synthetic.styles import STYLES

    thresholds = _numbers(sweep, "--sweep") if sweep else None
    min_volumes = _numbers(sweep_min_volumes, "--sweep-min-volumes") if sweep_min_volumes else None
    if min_volumes is not None and thresholds is None:
        raise typer.BadParameter("--sweep-min-volumes needs --sweep")
    style_names = [name.strip() for name in styles.split(",") if name.strip()]
    unknown = [name for name in style_names if name not in STYLES]
    if unknown or not style_names:
        raise typer.BadParameter(f"styles must be some of {', '.join(STYLES)}, got {styles!r}", param_hint="--styles")
    package = load_package(model or default_package_path())
    seeds = range(seed, seed + phantoms)
    report: dict = {"model": package.identity.display, "seeds": [seed, seed + phantoms - 1], "styles": {}}
    for style in style_names:
        options = {"style": style}
        if thresholds is not None:
            results = threshold_sweep(
                package, seeds, thresholds, min_volumes_mm3=min_volumes, device=device, phantom_options=options
            )
            typer.echo(f"{package.identity.display}: threshold sweep on {style} phantoms {seed}..{seed + phantoms - 1}")
            for (threshold, min_volume), summary in results.items():
                typer.echo(
                    f"  threshold {threshold:.2f}, min volume {min_volume:g} mm3: "
                    + ", ".join(f"{k} {v}" for k, v in summary.items())
                )
            report["styles"][style] = [
                {"threshold": t, "min_lesion_volume_mm3": v, **summary} for (t, v), summary in results.items()
            ]
            continue
        summary, scores = evaluate_package(package, seeds, device=device, phantom_options=options)
        typer.echo(f"{package.identity.display} on {style} phantoms {seed}..{seed + phantoms - 1}")
        for key, value in summary.items():
            typer.echo(f"  {key:32s} {value}")
        goals = goals_met(style, summary)
        for goal, met in goals:
            typer.echo(f"  goal {goal}: {'met' if met else 'NOT met'}")
        report["styles"][style] = {
            "summary": summary,
            "goals": {goal: met for goal, met in goals},
            "phantoms": scores_as_dicts(scores),
        }
    if json_out is not None:
        json_out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


def _numbers(text: str, option: str) -> list[float]:
    """Comma-separated numbers, or a usage error naming the option."""
    try:
        return [float(value) for value in text.split(",")]
    except ValueError:
        raise typer.BadParameter(f"{option} takes comma-separated numbers, got {text!r}") from None
