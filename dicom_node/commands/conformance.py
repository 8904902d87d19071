"""`dicom-node conformance`: rewrite (or `--check`) the generated tables of docs/CONFORMANCE.md.

The tables are rendered for the built-in defaults, so the shipped document does
not depend on whoever runs the command; `--config` renders a site's own
configuration (e.g. to hand to a PACS administrator). Exit status 1 when
`--check` finds the document stale, 2 on a bad option or a missing document.
"""

from __future__ import annotations

from pathlib import Path

import typer

from dicom_node.commands._common import fail, settings_or_exit

DEFAULT_DOCUMENT = Path(__file__).resolve().parents[2] / "docs" / "CONFORMANCE.md"


def conformance(
    document: Path = typer.Option(DEFAULT_DOCUMENT, "--doc", help="The Conformance Statement to rewrite."),
    check: bool = typer.Option(False, "--check", help="Only check that the document is up to date (exit 1 if not)."),
    config: Path | None = typer.Option(None, "--config", "-c", help="Render for this configuration, not the defaults."),
) -> None:
    """Regenerate the presentation-context tables of the DICOM Conformance Statement from the code."""
    from dicom_node.conformance import rewrite
    from dicom_node.settings import NodeSettings

    settings = settings_or_exit(config).node if config is not None else NodeSettings()
    try:
        text = document.read_text(encoding="utf-8")
        updated = rewrite(text, settings)
    except (OSError, ValueError) as exc:
        raise fail(f"{document}: {exc}") from None
    if check:
        if updated != text:
            raise fail(f"{document} is out of date with the code: run `dicom-node conformance`", code=1)
        typer.echo(f"{document} matches the code")
        return
    if updated != text:
        document.write_text(updated, encoding="utf-8")
    typer.echo(f"{document} {'rewritten' if updated != text else 'already up to date'}")


def register(app: typer.Typer) -> None:
    app.command()(conformance)
