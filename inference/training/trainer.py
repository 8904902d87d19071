"""The MTSA-Net training loop behind `dicom-node train`.

The paper's weights are not public, so a department trains its own model with
this module (or uses the demo model trained by it on phantoms). Everything a
trained model sees goes through `inference.imaging.preprocess`, the same code the node
runs at inference, so training and deployment cannot drift apart.

Data sources:

- Phantoms: `phantom_cases(n, seed)` generates `n` synthetic series with seeds
  `seed, seed + 1, ..., seed + n - 1` (`inference.synthetic.phantoms`).
- A folder (`folder_cases(data_dir)`), laid out as::

      DATA_DIR/
        labels.csv                 header "case_id,egfr"; egfr is 0/1 or
                                   "wild type"/"mutant" (case-insensitive)
        <case_id>/
          image/                   the DICOM series (one series, any file names)
            or image.nii.gz | image.nii
          mask.nii.gz | mask.nii   GTV mask on the image grid (non-zero = GTV)
            or rtstruct.dcm        RT Structure Set on the DICOM series; the ROIs
                                   whose name matches `roi_pattern` (default
                                   "(?i)gtv") are rasterised and united

  Every case in `labels.csv` must exist; a case folder without a label is an
  error too (a silent skip would shrink the data without anyone noticing).

Decisions:

- Slices: every model slice with tumour plus tumour-free slices drawn once per
  case (`free_slice_ratio` of the tumour-slice count, at least one), cached in
  memory as float16. The deployed model sees every slice, so it must learn to
  stay silent on tumour-free ones (SPEC.md); the segmentation loss uses all of
  them, the EGFR loss only the tumour slices (`UncertaintyWeightedLoss`).
- Split: by patient (case), `val_fraction` of the cases (at least one) for
  validation, drawn with the seed; never slices of one patient on both sides.
- Validation loss for early stopping and best-epoch choice
  (`TrainingConfig.selection_loss`): "joint" (default) is the unweighted
  `L_GTV + L_EGFR` (EGFR on tumour slices only), averaged over validation
  batches; the uncertainty-weighted total also moves when s1, s2 move, so it
  would reward the weighting rather than the network. "gtv" uses `L_GTV`
  alone. Why the choice exists: all slices of a patient share one EGFR label,
  so with few validation patients the EGFR cross-entropy is patient noise; in
  the first demo run (6 validation phantoms, EGFR head still at chance) it
  picked an epoch with validation Dice 0.71 over one with 0.92. Both losses
  are logged every epoch whichever one selects.
- Budgets: early stopping with `patience` epochs (20, SPEC.md), `max_epochs`,
  and `max_minutes` of wall clock for the training loop (pre-processing not
  counted): an epoch is not started when the previous epoch's duration says it
  would end after the budget.
- Augmentation (training only), one random affine per slice applied to image
  (bilinear) and mask (nearest) together: left-right flip (p = 0.5), rotation
  in [-10, 10] degrees, zoom in [0.85, 1.2] (lesion sizes and head sizes the
  phantoms did not draw); then intensity `x * a + b`, a in [0.9, 1.1],
  b in [-0.1, 0.1] (inputs are z-scores). All of it is cheap next to the
  network's step.
- Speed on CPU: model and batches in `torch.channels_last` memory format; on
  a 2-core CPU it made a width-8 training step about 2-3x faster (the
  depth-wise convolutions' backward pass is slow in the default layout).
- Small-tumour oversampling (`small_tumour_weight`, default 1 = off): an
  epoch draws as many slices as it holds, with replacement, each with weight
  `clip(sqrt(SMALL_TUMOUR_AREA_PX / tumour area), 1, small_tumour_weight)`
  (tumour-free slices weight 1). Slices through a small metastasis, or
  through the tip of a large one, are few and carry little of a pooled Dice,
  and small metastases are what an under-trained model misses first.
  SMALL_TUMOUR_AREA_PX = 300 model pixels is a cross-section of about 11 mm
  on a typical 220 mm field of view.
- Tumour-centred crops (`crop_size`, default None = off): every second
  training step is a crop step. It draws as many slices as hold the pixels of
  one full-slice batch (`batch_size * (input_size / crop_size)^2`, with the
  epoch's sampling weights), augments them at full size and cuts one
  `crop_size` square from each: with probability `CROP_ON_TUMOUR` around a
  random tumour pixel (about in the crop's middle half, less at the image
  border), otherwise
  anywhere. The GTV loss alone is applied (`MTSANet.segment`: the encoder and
  decoder are fully convolutional; the EGFR head needs a whole slice, so it
  learns on the full-slice steps). Why: on a 2-core CPU the budget, not the
  data, limits training; a crop step costs what a full-slice step costs but
  shows the network four times as many tumours, which is what the small,
  missed metastases need. Validation and deployment always use full slices.
  Side effects, accepted: the focal term is a per-image sum, so on a crop
  step it covers a quarter of the pixels and weighs less against the Dice
  term; BatchNorm statistics (and their average) also see the crops, which
  hold less air than whole slices; an epoch keeps its number of steps, so
  only half of its drawn batches are used as whole slices.
- Dice of the crop steps (`crop_dice`): "pooled" (default, as on full slices)
  or "per-crop", one Dice per crop averaged (`inference.training.losses`): pooled, a
  small metastasis sharing a crop batch with a large one carries almost none
  of the Dice term, and small ring-enhancing metastases (a dark dot with a
  faint rim) are what demo model 0.3.0 misses. Full-slice steps and
  validation keep the pooled Dice.
- Weight averaging: an exponential moving average of the weights and the
  BatchNorm statistics (`ema_decay`, default 0.995, i.e. about the last 200
  optimiser steps; `torch.optim.swa_utils.AveragedModel`) is what is
  validated and saved. With small batches the raw weights and BatchNorm
  statistics jump from step to step (a phantom run's validation Dice swung
  0.80-0.93 between epochs); the average does not change the optimiser
  (Adam, lr 3e-4). 0.999 lagged too far behind a 25-minute run (validation
  Dice 0.00 for its first 3 epochs of 950 steps). 0 turns it off.
- Seeds: Python, numpy and torch are seeded from `TrainingConfig.seed`; with
  the same data, seed and thread count the run is repeatable on CPU.
- Device (`train(device=...)`, default the CPU; `dicom-node train --device`,
  default as for inference: `$DICOM_NODE_DEVICE`, else CUDA when present): model, loss weights
  and optimiser state live there; slices stay cached in host memory, and
  sampling, augmentation and crops run on the CPU with the seeded generator,
  so a batch moves to the device just before its step. No mixed precision in
  training. The CUDA path has not been run here (no GPU in any session); the
  tests run it on the CPU.
- The best epoch's weights (lowest validation loss) are saved as a model
  package with the full training record in the manifest's `training` field.
"""

from __future__ import annotations

import copy
import csv
import math
import random
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from inference.imaging import preprocess
from inference.model.config import MTSANetConfig
from inference.model.mtsa_net import MTSANet
from inference.model.package import ModelPackage, save_package
from inference.synthetic.phantoms import generate_phantom
from inference.synthetic.styles import TRAINING_STYLES
from inference.training.config import TrainingConfig
from inference.training.losses import UncertaintyWeightedLoss, egfr_loss, gtv_loss

MAX_ROTATION_DEG = 10.0
SMALL_TUMOUR_AREA_PX = 300.0
ZOOM_RANGE = (0.85, 1.2)
CROP_ON_TUMOUR = 0.8  # share of crops of tumour slices that are placed around tumour
EGFR_NAMES = {"0": 0, "1": 1, "wild type": 0, "wildtype": 0, "wild-type": 0, "mutant": 1}


@dataclass
class CaseSlices:
    """One patient's cached model-grid slices and its EGFR label."""

    case_id: str
    images: np.ndarray  # (n, S, S) float16 pre-processed slices
    masks: np.ndarray  # (n, S, S) bool GTV on the model grid
    egfr: int  # 0 wild type, 1 mutant


@dataclass(frozen=True)
class EpochRecord:
    """What one epoch achieved; printed as a line and kept in the manifest."""

    epoch: int
    train_loss: float
    val_loss: float  # the selection loss (see TrainingConfig.selection_loss)
    val_gtv_loss: float
    val_egfr_loss: float
    val_dice: float
    val_egfr_accuracy: float
    s1: float
    s2: float
    seconds: float

    def line(self) -> str:
        return (
            f"epoch {self.epoch:3d}  train {self.train_loss:.4f}  val {self.val_loss:.4f} "
            f"(GTV {self.val_gtv_loss:.4f}, EGFR {self.val_egfr_loss:.4f})  "
            f"val Dice {self.val_dice:.3f}  val EGFR acc {self.val_egfr_accuracy:.3f}  "
            f"s1 {self.s1:.3f}  s2 {self.s2:.3f}  ({self.seconds:.0f} s)"
        )


@dataclass
class TrainingResult:
    """The saved package and how training went."""

    package: ModelPackage
    history: list[EpochRecord]
    best_epoch: int
    stop_reason: str
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)


def check_crop_size(config: TrainingConfig, model_config: MTSANetConfig) -> None:
    """Raise ValueError unless crops (if any) are smaller than the model's slices."""
    if config.crop_size is not None and config.crop_size >= model_config.input_size:
        raise ValueError(f"crop_size ({config.crop_size}) must be smaller than input_size ({model_config.input_size})")


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def case_slices(
    case_id: str,
    image: sitk.Image,
    mask: sitk.Image,
    egfr: int,
    *,
    size: int,
    free_slice_ratio: float,
    rng: np.random.Generator,
) -> CaseSlices:
    """Pre-process one case as the node would and keep tumour + sampled tumour-free slices."""
    model_input = preprocess.prepare_model_input(image, size=size)
    images = model_input.slices
    masks = preprocess.to_model_grid(mask, model_input, nearest=True) > 0
    tumour = np.flatnonzero(masks.any(axis=(1, 2)))
    free = np.setdiff1d(np.arange(len(images)), tumour)
    n_free = min(len(free), max(1, math.ceil(free_slice_ratio * len(tumour))))
    keep = np.sort(np.concatenate([tumour, rng.choice(free, size=n_free, replace=False)]))
    return CaseSlices(case_id, images[keep].astype(np.float16), masks[keep], int(egfr))


def phantom_cases(
    n: int,
    seed: int,
    *,
    size: int,
    free_slice_ratio: float,
    lesions: tuple[int, int] | None = None,
    style: str = "classic",
    progress: bool = True,
) -> list[CaseSlices]:
    """`n` phantoms with seeds `seed .. seed + n - 1`, pre-processed and cached.

    `lesions` (lowest, highest) draws each phantom's lesion count uniformly from that
    range instead of the generator's own 1-4 (more lesions per phantom: more lesion
    examples for the same pre-processing time); everything else about a phantom
    stays what its seed gives. `style` is the phantom style drawn from
    (`inference.synthetic.styles`; "randomised" for domain randomisation).
    """
    if lesions is not None and not 1 <= lesions[0] <= lesions[1]:
        raise ValueError(f"phantom lesion counts must be 1 <= lowest <= highest, got {lesions}")
    if style not in TRAINING_STYLES:  # the unseen looks are for evaluation only
        raise ValueError(f"training phantoms are drawn from {', '.join(TRAINING_STYLES)}, not {style!r}")
    rng = np.random.default_rng(seed)
    counts = np.random.default_rng([seed, 1]).integers(lesions[0], lesions[1] + 1, size=n) if lesions else [None] * n
    cases = []
    for phantom_seed, count in tqdm(zip(range(seed, seed + n), counts), total=n, desc="phantoms", disable=not progress):
        phantom = generate_phantom(phantom_seed, style=style, n_lesions=None if count is None else int(count))
        cases.append(
            case_slices(
                f"phantom-{phantom_seed}",
                phantom.image,
                phantom.mask,
                phantom.genotype,
                size=size,
                free_slice_ratio=free_slice_ratio,
                rng=rng,
            )
        )
    return cases


def read_labels(csv_path: Path) -> dict[str, int]:
    """`case_id,egfr` rows; egfr 0/1 or "wild type"/"mutant"."""
    labels: dict[str, int] = {}
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or {"case_id", "egfr"} - set(reader.fieldnames):
            raise ValueError(f"{csv_path} must have the header 'case_id,egfr'")
        for row_number, row in enumerate(reader, start=2):
            value = (row["egfr"] or "").strip().lower()
            if value not in EGFR_NAMES:
                raise ValueError(f"{csv_path} line {row_number}: egfr {row['egfr']!r} is not 0/1/wild type/mutant")
            labels[row["case_id"].strip()] = EGFR_NAMES[value]
    return labels


def _read_case_image(case_dir: Path) -> tuple[sitk.Image, Any]:
    """The case image and, for DICOM, the loaded series (needed to rasterise an RTSTRUCT)."""
    for name in ("image.nii.gz", "image.nii"):
        if (case_dir / name).is_file():
            return sitk.Cast(sitk.ReadImage(str(case_dir / name)), sitk.sitkFloat32), None
    series_dir = case_dir / "image"
    if series_dir.is_dir():
        from inference.imaging.volume_loader import load_series

        series = load_series(sorted(p for p in series_dir.rglob("*") if p.is_file()))
        return series.image, series
    raise ValueError(f"{case_dir}: no image/ DICOM folder and no image.nii(.gz)")


def _read_case_mask(case_dir: Path, image: sitk.Image, series: Any, roi_pattern: str) -> sitk.Image:
    """The GTV mask on the image grid, from NIfTI or an RTSTRUCT."""
    for name in ("mask.nii.gz", "mask.nii"):
        if (case_dir / name).is_file():
            mask = sitk.ReadImage(str(case_dir / name))
            if mask.GetSize() != image.GetSize() or not np.allclose(mask.GetOrigin(), image.GetOrigin(), atol=1e-3):
                raise ValueError(f"{case_dir / name} is not on the image grid")
            return sitk.Cast(mask != 0, sitk.sitkUInt8)
    rtstruct_path = case_dir / "rtstruct.dcm"
    if not rtstruct_path.is_file():
        raise ValueError(f"{case_dir}: no mask.nii(.gz) and no rtstruct.dcm")
    if series is None:
        raise ValueError(f"{case_dir}: an RTSTRUCT needs the DICOM series in image/, not a NIfTI image")
    return _rasterise_rtstruct(pydicom.dcmread(rtstruct_path), series, roi_pattern, rtstruct_path)


def _rasterise_rtstruct(rtstruct: pydicom.Dataset, series: Any, roi_pattern: str, path: Path) -> sitk.Image:
    from inference.outputs.rtstruct_raster import rasterise_roi

    pattern = re.compile(roi_pattern)
    numbers = [int(roi.ROINumber) for roi in rtstruct.StructureSetROISequence if pattern.search(str(roi.ROIName))]
    if not numbers:
        raise ValueError(f"{path}: no ROI name matches {roi_pattern!r}")
    union = np.zeros(sitk.GetArrayViewFromImage(series.image).shape, bool)
    for number in numbers:
        union |= rasterise_roi(rtstruct, number, series)
    mask = sitk.GetImageFromArray(union.astype(np.uint8))
    mask.CopyInformation(series.image)
    return mask


def folder_cases(
    data_dir: Path,
    *,
    size: int,
    free_slice_ratio: float,
    seed: int,
    roi_pattern: str = "(?i)gtv",
    progress: bool = True,
) -> list[CaseSlices]:
    """Every case of a data folder (layout in the module docstring), pre-processed and cached."""
    data_dir = Path(data_dir)
    labels = read_labels(data_dir / "labels.csv")
    folders = {p.name for p in data_dir.iterdir() if p.is_dir()}
    if missing := sorted(set(labels) - folders):
        raise ValueError(f"{data_dir}: labels.csv lists cases without a folder: {', '.join(missing)}")
    if unlabelled := sorted(folders - set(labels)):
        raise ValueError(f"{data_dir}: case folders without an EGFR label: {', '.join(unlabelled)}")
    rng = np.random.default_rng(seed)
    cases = []
    for case_id in tqdm(sorted(labels), desc="cases", disable=not progress):
        image, series = _read_case_image(data_dir / case_id)
        mask = _read_case_mask(data_dir / case_id, image, series, roi_pattern)
        cases.append(
            case_slices(case_id, image, mask, labels[case_id], size=size, free_slice_ratio=free_slice_ratio, rng=rng)
        )
    return cases


def split_cases(
    cases: Sequence[CaseSlices], val_fraction: float, seed: int
) -> tuple[list[CaseSlices], list[CaseSlices]]:
    """Patient-level split: (training cases, validation cases)."""
    if len(cases) < 2:
        raise ValueError(f"need at least 2 cases (1 training, 1 validation), got {len(cases)}")
    order = np.random.default_rng(seed).permutation(len(cases))
    n_val = min(len(cases) - 1, max(1, round(val_fraction * len(cases))))
    val = [cases[i] for i in sorted(order[:n_val])]
    train = [cases[i] for i in sorted(order[n_val:])]
    return train, val


def _stack(cases: Sequence[CaseSlices]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All cached slices as tensors: images float16, masks uint8, per-slice EGFR labels."""
    images = torch.from_numpy(np.concatenate([c.images for c in cases]))
    masks = torch.from_numpy(np.concatenate([c.masks for c in cases]).astype(np.uint8))
    labels = torch.from_numpy(np.concatenate([np.full(len(c.images), c.egfr, np.int64) for c in cases]))
    return images, masks, labels


def _batches(n: int, batch_size: int, generator: torch.Generator | None) -> Iterator[torch.Tensor]:
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    yield from order.split(batch_size)


def slice_weights(masks: torch.Tensor, max_weight: float) -> torch.Tensor:
    """Sampling weight per slice: 1 without tumour, up to `max_weight` for small tumour sections."""
    area = masks.flatten(1).sum(1).float()
    weights = torch.ones(len(masks))
    tumour = area > 0
    weights[tumour] = (SMALL_TUMOUR_AREA_PX / area[tumour]).sqrt().clamp(1.0, max_weight)
    return weights


def _epoch_batches(masks: torch.Tensor, config: TrainingConfig, generator: torch.Generator) -> list[torch.Tensor]:
    """An epoch's batches: a permutation, or weighted draws with replacement when oversampling."""
    if config.small_tumour_weight == 1.0:
        return list(_batches(len(masks), config.batch_size, generator))
    weights = slice_weights(masks, config.small_tumour_weight)
    return list(torch.multinomial(weights, len(masks), replacement=True, generator=generator).split(config.batch_size))


def _augment(
    images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random flip, rotation and zoom (one affine, shared by image and mask), then intensity."""
    n = images.shape[0]
    angle = torch.deg2rad((2 * torch.rand(n, generator=generator) - 1) * MAX_ROTATION_DEG)
    zoom = ZOOM_RANGE[0] + (ZOOM_RANGE[1] - ZOOM_RANGE[0]) * torch.rand(n, generator=generator)
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    zero = torch.zeros(n)
    # affine_grid maps output to input coordinates: input = R(angle) diag(flip, 1) output / zoom.
    theta = torch.stack([torch.stack([cos * flip, -sin, zero], 1), torch.stack([sin * flip, cos, zero], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    masks = F.grid_sample(masks, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    scale = 0.9 + 0.2 * torch.rand(n, 1, 1, 1, generator=generator)
    shift = -0.1 + 0.2 * torch.rand(n, 1, 1, 1, generator=generator)
    return images * scale + shift, masks


def _crop(
    images: torch.Tensor, masks: torch.Tensor, crop: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """One `crop` x `crop` square per slice, the same for image and mask (module docstring)."""
    size = images.shape[-1]
    corners = []
    for mask in masks[:, 0]:
        tumour = mask.nonzero()
        if len(tumour) and float(torch.rand(1, generator=generator)) < CROP_ON_TUMOUR:
            centre = tumour[int(torch.randint(len(tumour), (1,), generator=generator))]
            offset = torch.randint(crop // 4, 3 * crop // 4 + 1, (2,), generator=generator)
            corner = (centre - offset).clamp(0, size - crop)
        else:
            corner = torch.randint(0, size - crop + 1, (2,), generator=generator)
        corners.append(corner.tolist())
    pick = [(slice(None), slice(r, r + crop), slice(c, c + crop)) for r, c in corners]
    return (
        torch.stack([image[p] for image, p in zip(images, pick)]),
        torch.stack([mask[p] for mask, p in zip(masks, pick)]),
    )


def _crop_step_loss(
    model: MTSANet,
    weighting: UncertaintyWeightedLoss,
    data: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    weights: torch.Tensor,
    config: TrainingConfig,
    generator: torch.Generator,
) -> torch.Tensor:
    """The uncertainty-weighted GTV loss of one batch of tumour-centred crops."""
    images, masks, _ = data
    assert config.crop_size is not None  # crop steps run only with a crop size
    crop = int(config.crop_size)
    count = config.batch_size * max(1, round((images.shape[-1] / crop) ** 2))
    index = torch.multinomial(weights, count, replacement=True, generator=generator)
    x, y = _augment(images[index].float()[:, None], masks[index].float()[:, None], generator)
    x, y = _to_device(*_crop(x, y, crop, generator), device=_device_of(model))
    logits = model.segment(x.contiguous(memory_format=torch.channels_last))
    return weighting.combine(gtv_loss(logits, y, per_sample_dice=config.crop_dice == "per-crop"), None)


def _train_epoch(
    model: MTSANet,
    averaged: AveragedModel,
    weighting: UncertaintyWeightedLoss,
    optimizer: torch.optim.Optimizer,
    data: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    config: TrainingConfig,
    generator: torch.Generator,
    progress: bool,
    description: str,
) -> float:
    """One epoch (as many steps as batches of the training slices); returns the mean joint loss of
    its full-slice steps. With `crop_size`, every second step is a crop step instead."""
    images, masks, labels = data
    model.train()
    crop_weights = slice_weights(masks, config.small_tumour_weight) if config.crop_size is not None else None
    total, count = 0.0, 0
    bar = tqdm(_epoch_batches(masks, config, generator), desc=description, leave=False, disable=not progress)
    for step, index in enumerate(bar):
        if config.crop_size is not None and step % 2:
            assert crop_weights is not None  # computed whenever crop steps run
            loss = _crop_step_loss(model, weighting, data, crop_weights, config, generator)
        else:
            x, y = _augment(images[index].float()[:, None], masks[index].float()[:, None], generator)
            x, y, batch_labels = _to_device(x, y, labels[index], device=_device_of(model))
            gtv_logits, egfr_logits = model(x.contiguous(memory_format=torch.channels_last))
            loss, _, _ = weighting(gtv_logits, egfr_logits, y, batch_labels)
            total += loss.item() * len(index)
            count += len(index)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        averaged.update_parameters(model)
        bar.set_postfix(loss=f"{total / max(count, 1):.4f}")
    return total / max(count, 1)


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _to_device(*tensors: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Batches move to the model's device only after sampling, augmentation and cropping, which
    stay on the CPU with the seeded CPU generator (the cached slices stay in host memory)."""
    return tuple(t.to(device, non_blocking=True) for t in tensors)


@torch.inference_mode()
def _validate(
    model: MTSANet, data: tuple[torch.Tensor, torch.Tensor, torch.Tensor], batch_size: int
) -> tuple[float, float, float, float]:
    """(L_GTV, L_EGFR on tumour slices, pooled voxel Dice at 0.5, slice EGFR accuracy), batch means."""
    images, masks, labels = data
    model.eval()
    gtv_sum, egfr_sum, count = 0.0, 0.0, 0
    intersection = predicted = true = 0
    correct = tumour_slices = 0
    for index in _batches(len(images), batch_size, None):
        x, y, batch_labels = _to_device(
            images[index].float()[:, None], masks[index].float()[:, None], labels[index], device=_device_of(model)
        )
        gtv_logits, egfr_logits = model(x.contiguous(memory_format=torch.channels_last))
        has_tumour = y.flatten(1).amax(1) > 0
        gtv_sum += float(gtv_loss(gtv_logits, y)) * len(index)
        count += len(index)
        if has_tumour.any():
            tumour_labels = batch_labels[has_tumour]
            egfr_sum += float(egfr_loss(egfr_logits[has_tumour], tumour_labels)) * int(has_tumour.sum())
            correct += int((egfr_logits[has_tumour].argmax(1) == tumour_labels).sum())
            tumour_slices += int(has_tumour.sum())
        prediction = gtv_logits > 0
        intersection += int((prediction & (y > 0)).sum())
        predicted += int(prediction.sum())
        true += int((y > 0).sum())
    dice = 2 * intersection / (predicted + true) if predicted + true else 1.0
    egfr = egfr_sum / tumour_slices if tumour_slices else 0.0
    accuracy = correct / tumour_slices if tumour_slices else math.nan
    return gtv_sum / max(count, 1), egfr, dice, accuracy


def train(
    model_config: MTSANetConfig,
    train_cases: Sequence[CaseSlices],
    val_cases: Sequence[CaseSlices],
    config: TrainingConfig,
    out_dir: Path,
    *,
    name: str,
    version: str,
    is_demo: bool,
    data_info: dict[str, Any],
    progress: bool = True,
    log: Callable[[str], None] = tqdm.write,
    device: torch.device | str = "cpu",
    initial_state: dict[str, torch.Tensor] | None = None,
) -> TrainingResult:
    """Train MTSA-Net with the uncertainty-weighted joint loss on `device`; save the best epoch as a package.

    `initial_state` (a state_dict of the same architecture) warm-starts the network:
    a CPU budget buys more from a trained model than from a random one.
    """
    started = time.monotonic()
    check_crop_size(config, model_config)
    seed_everything(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    device = torch.device(device)
    model = MTSANet(model_config)
    if initial_state is not None:
        model.load_state_dict(initial_state)
    model = model.to(device=device, memory_format=torch.channels_last)  # type: ignore[call-overload]
    weighting = UncertaintyWeightedLoss().to(device)
    optimizer = torch.optim.Adam([*model.parameters(), *weighting.parameters()], lr=config.learning_rate)
    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=True)
    train_data, val_data = _stack(train_cases), _stack(val_cases)
    log(
        f"training on {len(train_data[0])} slices of {len(train_cases)} cases, "
        f"validating on {len(val_data[0])} slices of {len(val_cases)} cases"
    )
    history: list[EpochRecord] = []
    best_state, best_epoch, best_loss = copy.deepcopy(model.state_dict()), 0, math.inf
    stop_reason = f"max_epochs ({config.max_epochs}) reached"
    for epoch in range(1, config.max_epochs + 1):
        if config.max_minutes is not None and history:
            elapsed = time.monotonic() - started
            if elapsed + history[-1].seconds > 60 * config.max_minutes:
                stop_reason = f"time budget ({config.max_minutes:g} min) would be exceeded by another epoch"
                break
        epoch_start = time.monotonic()
        train_loss = _train_epoch(
            model, averaged, weighting, optimizer, train_data, config, generator, progress, f"epoch {epoch}"
        )
        val_gtv, val_egfr, val_dice, val_accuracy = _validate(averaged.module, val_data, config.batch_size)  # type: ignore[arg-type]  # AveragedModel wraps the MTSANet
        val_loss = val_gtv + val_egfr if config.selection_loss == "joint" else val_gtv
        s1, s2 = weighting.sigmas
        record = EpochRecord(
            epoch,
            train_loss,
            val_loss,
            val_gtv,
            val_egfr,
            val_dice,
            val_accuracy,
            s1,
            s2,
            time.monotonic() - epoch_start,
        )
        history.append(record)
        log(record.line())
        if val_loss < best_loss:
            best_state, best_epoch, best_loss = copy.deepcopy(averaged.module.state_dict()), epoch, val_loss
        elif epoch - best_epoch >= config.patience:
            stop_reason = f"early stopping: no validation improvement for {config.patience} epochs"
            break
    seconds = time.monotonic() - started
    log(f"stopped: {stop_reason}; best epoch {best_epoch} (val loss {best_loss:.4f}); {seconds / 60:.1f} min")
    model.load_state_dict(best_state)
    model = model.to(device="cpu", memory_format=torch.contiguous_format)
    info = {
        "data": data_info,
        "train_cases": [c.case_id for c in train_cases],
        "val_cases": [c.case_id for c in val_cases],
        "train_slices": int(len(train_data[0])),
        "val_slices": int(len(val_data[0])),
        "settings": asdict(config),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "best_epoch": best_epoch,
        "stop_reason": stop_reason,
        "wall_clock_minutes": round(seconds / 60, 2),
        "history": [asdict(r) for r in history],
    }
    package = save_package(model, model_config, out_dir, name, version, is_demo, info)
    return TrainingResult(package, history, best_epoch, stop_reason, seconds, info)
