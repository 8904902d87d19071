"""`dicom-node phantom`: write synthetic T1-CE phantom series (DICOM) with their truth.

A thin layer over `inference.synthetic.phantoms` (imported inside the command). Phantom
`seed` goes to `OUT_DIR/phantom-<seed>/dicom/` with `mask.nii.gz` and
`truth.json` next to it; the same seed always gives the same files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    """Add the `phantom` command."""
    app.command(
        "phantom",
        help=(
            "Generate synthetic T1-CE brain phantoms (MNI template + enhancing metastases, random geometry) "
            "as DICOM MR series with ground-truth masks and a synthetic genotype (no clinical meaning)."
        ),
    )(phantom)


def phantom(
    out_dir: Annotated[Path, typer.Argument(help="Output folder.")],
    seed: Annotated[int, typer.Option(help="Seed of the first phantom.")] = 0,
    count: Annotated[int, typer.Option(min=1, help="Number of phantoms (seeds SEED..SEED+COUNT-1).")] = 1,
    orientation: Annotated[
        str | None, typer.Option(help="axial, sagittal, coronal or oblique (default: random).")
    ] = None,
    matrix: Annotated[int | None, typer.Option(help="In-plane matrix (default: random 160-256).")] = None,
    slices: Annotated[int | None, typer.Option(help="Number of slices (default: random 30-80).")] = None,
    n_lesions: Annotated[int | None, typer.Option(help="Number of lesions (default: random 1-4).")] = None,
    patient_name: Annotated[str, typer.Option(help="Patient's Name (DICOM PN).")] = "PHANTOM^DEMO",
    style: Annotated[
        str, typer.Option(help="Phantom style: classic, randomised (training) or unseen (held-out evaluation).")
    ] = "classic",
) -> None:
    """Generate and write the phantoms."""
    from inference.synthetic.phantoms import ORIENTATIONS, generate_phantom, write_phantom_series, write_phantom_truth
    from inference.synthetic.styles import STYLES

    if orientation is not None and orientation not in ORIENTATIONS:
        raise typer.BadParameter(f"must be one of {', '.join(ORIENTATIONS)}", param_hint="--orientation")
    if style not in STYLES:
        raise typer.BadParameter(f"must be one of {', '.join(STYLES)}", param_hint="--style")
    for phantom_seed in range(seed, seed + count):
        result = generate_phantom(
            phantom_seed, style=style, orientation=orientation, matrix=matrix, slices=slices, n_lesions=n_lesions
        )
        folder = out_dir / f"phantom-{phantom_seed}"
        files = write_phantom_series(result, folder / "dicom", patient_name=patient_name)
        write_phantom_truth(result, folder)
        diameters = ", ".join(f"{d:.1f}" for d in result.lesion_diameters_mm) or "none"
        typer.echo(
            f"phantom {phantom_seed}: {result.orientation}, {len(files)} slices, genotype {result.genotype}, "
            f"lesions (mm) {diameters} -> {folder}"
        )
