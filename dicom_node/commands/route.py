"""`dicom-node route DICOM_DIR`: dry run of the routing rules on a folder.

Reads headers only (no pixel data), groups the files by Series Instance UID and
routes each series by its first file (sorted by path), as the series watcher
does with a completed series. Files that are not DICOM, or have no Series
Instance UID, are listed as skipped. ``--json`` prints one stable object:
``{"series": [{series_uid, study_uid, modality, series_description, instances,
matched, rule, model, destinations, reason, rules: [{name, matched, detail}]}],
"skipped": [{path, reason}]}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from dicom_node.commands._common import ConfigOption, fail, settings_or_exit

console = Console(highlight=False, soft_wrap=True)


@dataclass
class _Series:
    header: Any  # pydicom Dataset of the first file
    files: list[Path] = field(default_factory=list)


def route(
    dicom_dir: Path = typer.Argument(..., help="Folder with DICOM files (searched recursively)."),
    config: Path | None = ConfigOption,
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
) -> None:
    """Show which routing rule each series in a folder would match, and why not the others."""
    from dicom_node.routing import compile_rules, route_series

    if not dicom_dir.is_dir():
        raise fail(f"{dicom_dir}: not a directory")
    rules = compile_rules(settings_or_exit(config).rules)
    series, skipped = _scan(dicom_dir)
    report = []
    for uid, found in series.items():
        decision = route_series(rules, found.header)
        report.append(
            {
                "series_uid": uid,
                "study_uid": str(found.header.get("StudyInstanceUID", "")),
                "modality": str(found.header.get("Modality", "")),
                "series_description": str(found.header.get("SeriesDescription", "")),
                "instances": len(found.files),
                "matched": decision.matched,
                "rule": decision.rule.name if decision.rule else None,
                "model": decision.rule.model if decision.rule else None,
                "destinations": list(decision.rule.destinations) if decision.rule else [],
                "reason": decision.reason,
                "rules": [{"name": o.rule.name, "matched": o.matched, "detail": o.detail} for o in decision.outcomes],
            }
        )
    if as_json:
        print(json.dumps({"series": report, "skipped": skipped}, indent=2))
        return
    _print(report, skipped)


def _scan(folder: Path) -> tuple[dict[str, _Series], list[dict[str, str]]]:
    from pydicom import dcmread

    series: dict[str, _Series] = {}
    skipped: list[dict[str, str]] = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            header = dcmread(path, stop_before_pixels=True)
        except Exception as exc:  # pydicom raises many kinds; a dry run reports, never crashes
            first_sentence = str(exc).split(". ")[0]
            skipped.append({"path": str(path), "reason": f"not readable as DICOM: {first_sentence}"})
            continue
        uid = str(header.get("SeriesInstanceUID", ""))
        if not uid:
            skipped.append({"path": str(path), "reason": "no SeriesInstanceUID"})
            continue
        series.setdefault(uid, _Series(header)).files.append(path)
    return series, skipped


def _print(report: list[dict[str, Any]], skipped: list[dict[str, str]]) -> None:
    if not report:
        console.print("[yellow]no DICOM series found[/]")
    for item in report:
        console.print(
            f"[bold]series {item['series_uid']}[/] {item['modality']}"
            f" '{item['series_description']}', {item['instances']} instance(s)"
        )
        if item["matched"]:
            targets = ", ".join(item["destinations"]) or "no destination"
            console.print(f"  [green]-> rule {item['rule']}[/]: model {item['model']}, send to {targets}")
        else:
            console.print("  [red]-> rejected[/]: no rule matched")
        for outcome in item["rules"]:
            mark = "[green]match[/]" if outcome["matched"] else "[red]no match[/]"
            console.print(f"    {mark} rule {outcome['name']}: {outcome['detail']}")
    for entry in skipped:
        console.print(f"[yellow]skipped[/] {entry['path']}: {entry['reason']}")


def register(app: typer.Typer) -> None:
    app.command("route")(route)
