"""`dicom-node`: the command line. Each command is a thin layer over a library
function and lives in its own module under `dicom_node.commands`."""

from __future__ import annotations

import typer

from dicom_node.commands import register_all

app = typer.Typer(
    name="dicom-node",
    help="DICOM node for brain-metastasis GTV segmentation and EGFR prediction (MTSA-Net).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
register_all(app)

if __name__ == "__main__":  # pragma: no cover
    app()
