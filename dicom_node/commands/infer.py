"""`dicom-node infer`: run a model package on one DICOM series folder, offline.

A thin layer over `inference.pipeline` (imported inside the command so the CLI
starts fast). The folder's regular files are the series (hidden files and
DICOMDIR skipped); the loader says precisely what is wrong with them otherwise.
The series is screened exactly as the service screens it (the package's
`accepts`, and with `--rule` that routing rule's screening names).

Exit status: 0 outputs written; 2 nothing written: the series was refused by
the screening or could not be used, or the model package or options are
wrong, with the reason on one line (no traceback); 3 the plausibility gate
holds the result: the outputs are written (for a look), the reasons printed,
and nothing may be delivered from them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from dicom_node.commands._common import ConfigOption, fail, settings_or_exit

if TYPE_CHECKING:
    from inference.imaging.screening import NamePatterns

EXIT_REFUSED = 2  # also the status of every other error (`fail`'s default)

#: Exit status of `infer` when the plausibility gate holds the result.
EXIT_HELD = 3


def register(app: typer.Typer) -> None:
    """Add the `infer` command."""
    app.command(
        "infer",
        help=(
            "Run the model on a folder holding one T1-CE MR series; write mask.nii.gz (lesion label map "
            "in source geometry) and summary.json to --out, and with --dicom the RTSTRUCT and SR. A series the "
            "input screening refuses (or cannot use) exits with status 2 and the reason."
        ),
    )(infer)


def series_files(folder: Path) -> list[Path]:
    """Regular files under `folder`, sorted, without hidden files and DICOMDIR."""
    return sorted(
        p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".") and p.name.upper() != "DICOMDIR"
    )


def infer(
    dicom_dir: Annotated[Path, typer.Argument(help="Folder with the series' DICOM files.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder.")],
    model: Annotated[
        Path | None, typer.Option(help="Model package directory (default: $DICOM_NODE_MODEL or the demo).")
    ] = None,
    dicom: Annotated[bool, typer.Option("--dicom", help="Also write the RTSTRUCT and SR.")] = False,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:N or auto.")] = None,
    rule: Annotated[
        str | None, typer.Option(help="Screen with this routing rule's own names (rules.screening in --config).")
    ] = None,
    config: Path | None = ConfigOption,
) -> None:
    """Screen, load, preprocess, predict, postprocess; write and summarise the outputs."""
    from inference.errors import InferenceError
    from inference.model.package import default_package_path, load_package
    from inference.pipeline import run_series, write_offline_outputs

    if not dicom_dir.is_dir():
        raise fail(f"{dicom_dir} is not a folder")
    files = series_files(dicom_dir)
    if not files:
        raise fail(f"{dicom_dir} holds no files")
    names = _rule_names(rule, config) if rule else None
    try:
        package = load_package(model or default_package_path())
        result = run_series(files, package, device=device, names=names)
    except InferenceError as exc:
        raise fail(str(exc), EXIT_REFUSED) from None
    summary = write_offline_outputs(result, out)
    written = [out / "mask.nii.gz", out / "summary.json"]
    if dicom:
        from inference.outputs.dicom_outputs import write_dicom_outputs

        written += [output.path for output in write_dicom_outputs(result, out)]
    _print_summary(summary, written)
    if result.hold_reasons:
        Console(stderr=True).print(
            f"[bold red]held:[/] {'; '.join(result.hold_reasons)} (do not deliver these outputs)"
        )
        raise typer.Exit(EXIT_HELD)


def _rule_names(rule: str, config: Path | None) -> NamePatterns:
    """The screening names of the configured routing rule called `rule`."""
    from dicom_node.worker import screening_names

    names = screening_names(settings_or_exit(config).rules)
    if rule not in names:
        raise fail(f"no routing rule named {rule!r} (configured: {', '.join(names) or 'none'})")
    return names[rule]


def _print_summary(summary: dict, written: list[Path]) -> None:
    console = Console()
    console.print(f"[bold]Model:[/] {summary['model']['display']}")
    series = summary["series"]
    console.print(f"[bold]Series:[/] {series['series_instance_uid']} ({series['slices']} slices)")
    if summary["lesions"]:
        table = Table("lesion", "volume (cm3)", "max diameter (mm)", "centroid LPS (mm)")
        for lesion in summary["lesions"]:
            table.add_row(
                lesion["name"],
                f"{lesion['volume_cm3']:.3f}",
                f"{lesion['max_diameter_mm']:.1f}",
                ", ".join(f"{v:.1f}" for v in lesion["centroid_mm"]),
            )
        console.print(table)
    else:
        console.print("[bold]Lesions:[/] none found")
    egfr = summary["egfr"]
    probability = egfr["mutant_probability"]
    probability = "" if probability is None else f" (mutant probability {probability:.3f})"
    console.print(f"[bold]EGFR:[/] {egfr['call']}{probability}")
    timings = ", ".join(f"{stage} {seconds:.2f} s" for stage, seconds in summary["timings_s"].items())
    console.print(f"[bold]Stage timings:[/] {timings}")
    for path in written:
        console.print(f"wrote {path}")
