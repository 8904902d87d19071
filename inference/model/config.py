"""MTSA-Net's hyper-parameters, free of torch so that the CLI can show their defaults cheaply.

The one home of the architecture defaults: `dicom-node train` reads its option
defaults from here, and model packages store a config verbatim in their manifest.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

PATCH_GRID = 4  # the bottleneck is cut into PATCH_GRID x PATCH_GRID tokens
N_STAGES = 5
DOWNSAMPLING = 2 ** (N_STAGES - 1)  # the encoder halves the size N_STAGES - 1 times


@dataclass(frozen=True)
class MTSANetConfig:
    """Hyper-parameters of MTSA-Net; stored verbatim in a model package's manifest."""

    width: int = 32
    input_size: int = 384
    transformer_dim: int = 256
    transformer_depth: int = 4
    transformer_heads: int = 8
    transformer_mlp_dim: int = 512
    classifier_hidden: int = 128
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.width < 1:
            raise ValueError(f"width must be >= 1, got {self.width}")
        if self.input_size % (DOWNSAMPLING * PATCH_GRID):
            raise ValueError(f"input_size must be a multiple of 64, got {self.input_size}")
        if self.transformer_dim % self.transformer_heads:
            raise ValueError(
                f"transformer_dim ({self.transformer_dim}) must be divisible by "
                f"transformer_heads ({self.transformer_heads})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def stage_channels(self) -> tuple[int, ...]:
        """Channels of the five encoder stages: w, 2w, 4w, 8w, 16w."""
        return tuple(self.width * 2**i for i in range(N_STAGES))

    @property
    def bottleneck_size(self) -> int:
        """Side of the bottleneck map (24 for a 384 input)."""
        return self.input_size // DOWNSAMPLING

    def to_dict(self) -> dict[str, int | float]:
        """Plain dict for JSON manifests."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> MTSANetConfig:
        """Inverse of `to_dict`; unknown keys are an error, not silently dropped."""
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown MTSANetConfig fields: {sorted(unknown)}")
        return cls(**values)
