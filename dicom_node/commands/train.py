"""`dicom-node train`: train MTSA-Net on phantoms or a department's data.

A thin layer over `inference.training.trainer`; torch and the engine are imported inside
the command so the rest of the CLI starts fast.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from inference.model.config import MTSANetConfig
from inference.training.config import TrainingConfig

_NET = MTSANetConfig()  # the option defaults below are these dataclasses' defaults, defined once there
_TRAINING = TrainingConfig()

DATA_HELP = """Folder of cases: DATA/labels.csv ("case_id,egfr", egfr 0/1 or "wild type"/"mutant")
and one folder per case: image/ (a DICOM series) or image.nii.gz, plus mask.nii.gz
(GTV on the image grid, non-zero = GTV) or rtstruct.dcm (ROIs matching --roi-pattern)."""


def register(app: typer.Typer) -> None:
    """Add the `train` command."""
    app.command(
        "train",
        help=(
            "Train MTSA-Net (SPEC.md: uncertainty-weighted Dice+focal / cross-entropy, Adam 3e-4, "
            "early stopping) on generated phantoms (--phantoms) or a data folder (--data), and save "
            "the best epoch as a model package in --out. Data folder layout: " + DATA_HELP
        ),
    )(train)


def train(
    out: Annotated[Path, typer.Option(help="Directory to write the model package to.")],
    phantoms: Annotated[int | None, typer.Option(help="Train on N generated phantoms (seeds SEED..SEED+N-1).")] = None,
    data: Annotated[Path | None, typer.Option(help=DATA_HELP, exists=True, file_okay=False)] = None,
    roi_pattern: Annotated[str, typer.Option(help="Regex on RTSTRUCT ROI names that are GTV.")] = "(?i)gtv",
    seed: Annotated[int, typer.Option(help="Seed of phantoms, split, initialisation and sampling.")] = _TRAINING.seed,
    name: Annotated[str, typer.Option(help="Model name in the manifest.")] = "MTSA-Net",
    version: Annotated[str, typer.Option(help="Model version in the manifest.")] = "1.0.0",
    demo: Annotated[bool, typer.Option(help="Mark the package as a demo model (not for clinical use).")] = False,
    width: Annotated[int, typer.Option(help="Base channels w (stages w..16w); the paper size is 32.")] = _NET.width,
    transformer_dim: Annotated[int, typer.Option()] = _NET.transformer_dim,
    transformer_depth: Annotated[int, typer.Option()] = _NET.transformer_depth,
    transformer_heads: Annotated[int, typer.Option()] = _NET.transformer_heads,
    transformer_mlp_dim: Annotated[int, typer.Option()] = _NET.transformer_mlp_dim,
    classifier_hidden: Annotated[int, typer.Option()] = _NET.classifier_hidden,
    dropout: Annotated[float, typer.Option()] = _NET.dropout,
    max_epochs: Annotated[int, typer.Option(help="Upper bound on epochs.")] = _TRAINING.max_epochs,
    max_minutes: Annotated[float | None, typer.Option(help="Wall-clock budget of the training loop.")] = (
        _TRAINING.max_minutes
    ),
    patience: Annotated[int, typer.Option(help="Early stopping patience in epochs.")] = _TRAINING.patience,
    batch_size: Annotated[int, typer.Option()] = _TRAINING.batch_size,
    learning_rate: Annotated[float, typer.Option("--lr")] = _TRAINING.learning_rate,
    free_slice_ratio: Annotated[float, typer.Option(help="Tumour-free slices kept per tumour slice.")] = (
        _TRAINING.free_slice_ratio
    ),
    val_fraction: Annotated[float, typer.Option(help="Fraction of cases held out for validation.")] = (
        _TRAINING.val_fraction
    ),
    selection_loss: Annotated[
        str, typer.Option(help='Validation loss for early stopping/best epoch: "joint" (L_GTV+L_EGFR) or "gtv".')
    ] = _TRAINING.selection_loss,
    ema_decay: Annotated[
        float, typer.Option(help="Decay of the weight average that is validated and saved (0 = raw weights).")
    ] = _TRAINING.ema_decay,
    small_tumour_weight: Annotated[
        float, typer.Option(help="Oversample slices with small tumour sections up to this weight (1 = off).")
    ] = _TRAINING.small_tumour_weight,
    crop_size: Annotated[
        int | None, typer.Option(help="Every second step trains the GTV on tumour-centred crops of this size (px).")
    ] = _TRAINING.crop_size,
    phantom_lesions: Annotated[
        str | None,
        typer.Option(help='With --phantoms: lesions per phantom, "LOW-HIGH" or "N" (default: the generator\'s 1-4).'),
    ] = None,
    phantom_style: Annotated[
        str,
        typer.Option(
            help='With --phantoms: "classic" (one look, as up to demo model 0.3.0) or "randomised" '
            "(domain randomisation; never draws the held-out unseen looks)."
        ),
    ] = "classic",
    crop_dice: Annotated[
        str,
        typer.Option(help='Dice of the crop steps: "pooled" over the batch or "per-crop" (one per crop, averaged).'),
    ] = _TRAINING.crop_dice,
    init_from: Annotated[
        Path | None,
        typer.Option(
            help="Warm start from this model package's weights (same architecture options).",
            exists=True,
            file_okay=False,
        ),
    ] = None,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads (default: torch's choice).")] = None,
    device: Annotated[
        str | None, typer.Option(help="cpu, cuda, cuda:N or auto (default: $DICOM_NODE_DEVICE, else auto).")
    ] = None,
) -> None:
    """Train and save a model package."""
    if (phantoms is None) == (data is None):
        raise typer.BadParameter("give exactly one of --phantoms N or --data DIR")
    if phantom_lesions is not None and phantoms is None:
        raise typer.BadParameter("--phantom-lesions only applies to --phantoms")
    import torch

    from inference.synthetic.styles import TRAINING_STYLES

    if phantom_style not in TRAINING_STYLES:
        raise typer.BadParameter(f"--phantom-style must be one of {', '.join(TRAINING_STYLES)}, got {phantom_style!r}")

    from inference.errors import ModelPackageError
    from inference.model.predictor import select_device
    from inference.training import trainer

    if threads:
        torch.set_num_threads(threads)
    model_config = MTSANetConfig(
        width=width,
        transformer_dim=transformer_dim,
        transformer_depth=transformer_depth,
        transformer_heads=transformer_heads,
        transformer_mlp_dim=transformer_mlp_dim,
        classifier_hidden=classifier_hidden,
        dropout=dropout,
    )
    try:
        config = TrainingConfig(
            learning_rate=learning_rate,
            patience=patience,
            max_epochs=max_epochs,
            max_minutes=max_minutes,
            batch_size=batch_size,
            free_slice_ratio=free_slice_ratio,
            val_fraction=val_fraction,
            selection_loss=selection_loss,
            ema_decay=ema_decay,
            small_tumour_weight=small_tumour_weight,
            crop_size=crop_size,
            crop_dice=crop_dice,
            seed=seed,
        )
        trainer.check_crop_size(config, model_config)
        lesions = _lesion_range(phantom_lesions) if phantom_lesions else None
        torch_device = select_device(device)
        initial_state = _initial_state(init_from, model_config) if init_from is not None else None
    except (ValueError, RuntimeError, ModelPackageError) as exc:  # checked before minutes of data preparation
        raise typer.BadParameter(str(exc)) from exc
    size = model_config.input_size
    if phantoms is not None:
        cases = trainer.phantom_cases(
            phantoms, seed, size=size, free_slice_ratio=free_slice_ratio, lesions=lesions, style=phantom_style
        )
        data_info = {
            "source": "phantoms",
            "count": phantoms,
            "seeds": [seed, seed + phantoms - 1],
            "style": phantom_style,
        }
        if lesions is not None:
            data_info["lesions_per_phantom"] = list(lesions)
    else:
        assert data is not None  # checked above: --data or --phantoms
        cases = trainer.folder_cases(
            data, size=size, free_slice_ratio=free_slice_ratio, seed=seed, roi_pattern=roi_pattern
        )
        data_info = {"source": "folder", "path": str(data), "count": len(cases)}
    data_info["command"] = "dicom-node " + shlex.join(sys.argv[1:])
    if init_from is not None:
        data_info["initialised_from"] = _package_reference(init_from)
    train_cases, val_cases = trainer.split_cases(cases, val_fraction, seed)
    result = trainer.train(
        model_config,
        train_cases,
        val_cases,
        config,
        out,
        name=name,
        version=version,
        is_demo=demo,
        data_info=data_info,
        device=torch_device,
        initial_state=initial_state,
    )
    typer.echo(f"model package written to {result.package.path} (best epoch {result.best_epoch})")


def _lesion_range(text: str) -> tuple[int, int]:
    """ "3-6" -> (3, 6), "4" -> (4, 4); ValueError with the reason otherwise."""
    try:
        low, dash, high = text.partition("-")
        bounds = (int(low), int(high) if dash else int(low))
    except ValueError:
        raise ValueError(f'--phantom-lesions takes "LOW-HIGH" or "N", got {text!r}') from None
    if not 1 <= bounds[0] <= bounds[1]:
        raise ValueError(f"--phantom-lesions needs 1 <= LOW <= HIGH, got {text!r}")
    return bounds


def _initial_state(path: Path, model_config: Any) -> dict[str, Any]:
    """The package's weights, checked against the architecture asked for (ValueError naming both)."""
    from inference.model.package import load_package

    package = load_package(path)
    if package.config != model_config:
        raise ValueError(f"--init-from {path}: its architecture {package.config} differs from {model_config}")
    return package.build_model().state_dict()


def _package_reference(path: Path) -> dict[str, str]:
    """What the manifest records about a warm-start package: identity and weights checksum."""
    from inference.model.package import load_package, sha256_of

    package = load_package(path)
    return {"model": package.identity.display, "weights_sha256": sha256_of(package.weights_path)}
