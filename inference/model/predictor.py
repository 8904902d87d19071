"""Slice-wise MTSA-Net inference: batched, no autograd, GPU when there is one.

Decisions:
- `torch.inference_mode` and `model.eval()` (BatchNorm running statistics,
  dropout off): the output depends only on the input and the weights.
- On CUDA, autocast to bfloat16 where the GPU supports it, else float16; the
  probabilities are returned as float32. On CPU, plain float32 (CPU autocast is
  slower than fp32 for these small convolutions and changes the numbers).
- Reproducibility (DESIGN.md: same input + same model = same masks): cuDNN
  benchmarking off and deterministic kernels requested with
  `torch.use_deterministic_algorithms(True, warn_only=True)`; the RNG is seeded
  although eval mode draws no random numbers. Identical output is promised for
  the same input, device and batch size; another device or batch size may
  differ in the last float bits (different kernels), not in the masks beyond
  pixels at exactly the threshold.
- The device comes from `select_device()`: `DICOM_NODE_DEVICE` = cpu | cuda |
  auto (default auto: CUDA if available).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from inference.model.mtsa_net import MTSANet

DEVICE_ENV_VAR = "DICOM_NODE_DEVICE"
SEED = 0


def select_device(preference: str | None = None) -> torch.device:
    """`preference` or `$DICOM_NODE_DEVICE` (cpu|cuda|cuda:N|auto); auto picks CUDA when present."""
    choice = (preference or os.environ.get(DEVICE_ENV_VAR) or "auto").strip().lower()
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cpu":
        return torch.device("cpu")
    if choice == "cuda" or (choice.startswith("cuda:") and choice[5:].isdigit()):
        index = int(choice[5:]) if ":" in choice else 0
        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            raise RuntimeError(f"device {choice!r} requested but no such CUDA device is available")
        return torch.device(choice)
    raise ValueError(f"device must be cpu, cuda, cuda:N or auto, got {choice!r}")


def _make_deterministic() -> None:
    torch.manual_seed(SEED)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def predict_slices(
    model: MTSANet,
    slices: np.ndarray,
    *,
    batch_size: int = 8,
    device: torch.device | str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """GTV probability maps `(n, H, W)` and EGFR mutant probabilities `(n,)`, both float32.

    `slices` are pre-processed model-grid slices `(n, H, W)` float32 with
    `H == W == model.config.input_size`.
    """
    size = model.config.input_size
    if slices.ndim != 3 or slices.shape[1:] != (size, size):
        raise ValueError(f"slices must have shape (n, {size}, {size}), got {slices.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device) if device is not None else select_device()
    _make_deterministic()
    # channels-last is about 3x faster for this network's depth-wise convolutions on
    # CPU (measured: 16 slices 2.25 s -> 0.76 s, outputs equal within 5e-6).
    model = model.to(device=device, memory_format=torch.channels_last).eval()  # type: ignore[call-overload]
    amp_dtype = _autocast_dtype(device)
    gtv = np.empty(slices.shape, dtype=np.float32)
    mutant = np.empty(slices.shape[0], dtype=np.float32)
    with (
        torch.inference_mode(),
        torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=amp_dtype is not None),
    ):
        for start in range(0, slices.shape[0], batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(slices[start : start + batch_size], dtype=np.float32))
            batch = batch.unsqueeze(1).to(device).contiguous(memory_format=torch.channels_last)
            gtv_logits, egfr_logits = model(batch)
            stop = start + batch.shape[0]
            gtv[start:stop] = torch.sigmoid(gtv_logits.float())[:, 0].cpu().numpy()
            mutant[start:stop] = torch.softmax(egfr_logits.float(), dim=1)[:, 1].cpu().numpy()
    return gtv, mutant
