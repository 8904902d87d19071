"""Tiny, untrained MTSA-Net packages for tests: the real engine in about a second on a CPU.

Their outputs are meaningless; the tests that use them check the node's handling
of jobs, or (with `gtv_gain`/`gtv_bias`) what the node does with a model that
fires everywhere.
"""

from __future__ import annotations

import json
from pathlib import Path

TINY_CONFIG = {
    "width": 4,
    "input_size": 64,
    "transformer_dim": 16,
    "transformer_depth": 1,
    "transformer_heads": 2,
    "transformer_mlp_dim": 32,
    "classifier_hidden": 8,
}

#: The smallest network the unit tests build (width 2, no dropout): packages, evaluation plumbing.
MINIMAL_CONFIG = {**TINY_CONFIG, "width": 2, "transformer_dim": 8, "transformer_mlp_dim": 16, "dropout": 0.0}


def make_tiny_package(
    folder: Path,
    *,
    name: str = "tiny-test",
    gtv_bias: float | None = None,
    gtv_gain: float | None = None,
    thresholds: dict[str, float] | None = None,
) -> Path:
    """A tiny untrained package in `folder` (64 px input, no N4), seeded, so it is the same every time.

    `gtv_bias`: the GTV head's logit bias (large: every voxel is "lesion"); `gtv_gain`: the GTV head's
    weights multiplied by it (large, with a zero bias: a speckle that follows the image's texture).
    """
    import torch

    from inference.model.config import MTSANetConfig
    from inference.model.mtsa_net import MTSANet
    from inference.model.package import MANIFEST_NAME, save_package

    torch.manual_seed(0)
    config = MTSANetConfig(**TINY_CONFIG)  # type: ignore[arg-type]
    model = MTSANet(config)
    with torch.no_grad():
        if gtv_gain is not None:
            model.gtv_out.weight.mul_(gtv_gain)
            model.gtv_out.bias.fill_(0.0)
        if gtv_bias is not None:
            model.gtv_out.bias.fill_(gtv_bias)
    save_package(model, config, folder, name, "0.0.1", True, thresholds=thresholds)
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    manifest["input"]["n4"] = False
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return folder
