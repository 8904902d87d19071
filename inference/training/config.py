"""Training settings, free of torch so that `dicom-node train` shows their defaults cheaply.

The one home of the training defaults (learning rate and patience are SPEC.md's);
the CLI's option defaults are read from `TrainingConfig()`.
"""

from __future__ import annotations

from dataclasses import dataclass

from inference.model.config import DOWNSAMPLING

SELECTION_LOSSES = ("joint", "gtv")
CROP_DICE_MODES = ("pooled", "per-crop")


@dataclass(frozen=True)
class TrainingConfig:
    """Optimisation settings; learning rate and patience are SPEC.md's."""

    learning_rate: float = 3e-4
    patience: int = 20
    max_epochs: int = 300
    max_minutes: float | None = None
    batch_size: int = 8
    free_slice_ratio: float = 0.5
    val_fraction: float = 0.2
    selection_loss: str = "joint"  # "joint" (L_GTV + L_EGFR) or "gtv" (L_GTV)
    ema_decay: float = 0.995  # weight averaging (module docstring); 0 = off
    small_tumour_weight: float = 1.0  # oversampling of small tumour sections (module docstring); 1 = off
    crop_size: int | None = None  # tumour-centred crop steps (module docstring); None = off
    crop_dice: str = "pooled"  # Dice of crop steps: "pooled" over the batch or "per-crop" (module docstring)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.selection_loss not in SELECTION_LOSSES:
            raise ValueError(f"selection_loss must be one of {SELECTION_LOSSES}, got {self.selection_loss!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.crop_dice not in CROP_DICE_MODES:
            raise ValueError(f"crop_dice must be one of {CROP_DICE_MODES}, got {self.crop_dice!r}")
        if self.crop_dice != "pooled" and self.crop_size is None:
            raise ValueError(f"crop_dice {self.crop_dice!r} needs crop steps (crop_size)")
        if self.small_tumour_weight < 1.0:
            raise ValueError(f"small_tumour_weight must be >= 1, got {self.small_tumour_weight}")
        if self.crop_size is not None and (self.crop_size < 2 * DOWNSAMPLING or self.crop_size % DOWNSAMPLING):
            raise ValueError(
                f"crop_size must be a multiple of {DOWNSAMPLING} and at least {2 * DOWNSAMPLING}, got {self.crop_size}"
            )
