"""Model packages: the only way weights enter the node.

The paper's weights are not public, so a department brings its own (trained
with `dicom-node train`) and the node ships a demo package. A package is a
directory holding `manifest.json` and a weights file (a PyTorch `state_dict`
written by `torch.save`). The manifest names the architecture and its
configuration, the input the model expects, its output labels, decision
thresholds, whether it is a demo model, the weights' sha256, and (`accepts`)
which series the model may run on: modality, contrast, spacing, slice count,
field of view, model-grid size and memory (`inference.model.accepts`; a
package without the section gets that module's documented defaults).

Decisions:
- Loading checks, in order: directory, manifest JSON, required keys, format
  version, architecture, config, accepts, weights file, sha256, state_dict
  against the architecture (strict). Each failure raises `ModelPackageError` saying which
  check failed and where, so a physicist can read it in the job log.
- Weights are read with `torch.load(weights_only=True)`: a package never runs
  pickled code (torch >= 2.6: earlier `weights_only` loaders could be made to).
- The weights file is read once: its bytes are hashed, those same bytes are
  unpickled, and the verified state_dict stays in memory with the package.
  `build_model` never re-reads the file, so weights replaced on disk after
  loading are never used (there is no window between check and use).
- `default_package_path()` is the committed demo package unless the
  environment variable `DICOM_NODE_MODEL` names another directory.
- The optional `plausibility` object bounds what a deliverable result may look
  like (lesion count, total GTV, GTV share of the brain, share of uncertain
  voxels); a package without it gets the defaults justified in
  `inference.plausibility`, a key set to null switches that check off. Only the
  weights are hashed: the manifest, bounds included, is the department's to tune.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from inference.errors import ModelPackageError
from inference.imaging.preprocess import DEFAULT_NORMALISATION
from inference.model.accepts import ModelAccepts
from inference.model.config import MTSANetConfig
from inference.model.mtsa_net import MTSANet
from inference.plausibility import PlausibilityBounds
from inference.result import ModelIdentity

FORMAT_VERSION = 1
ARCHITECTURE = "MTSA-Net"
MANIFEST_NAME = "manifest.json"
WEIGHTS_NAME = "weights.pt"
MODEL_ENV_VAR = "DICOM_NODE_MODEL"
DEMO_PACKAGE_DIR = Path(__file__).resolve().parent / "shipped" / "mtsa-demo"

INPUT_SPEC: dict[str, Any] = {
    "modality": "MR",
    "size": 384,
    "orientation": "axial",
    "n4": True,
    "normalisation": DEFAULT_NORMALISATION,
}
OUTPUT_LABELS: dict[str, list[str]] = {"gtv": ["background", "GTV"], "egfr": ["wild type", "mutant"]}
DEFAULT_THRESHOLDS: dict[str, float] = {"gtv_probability": 0.5, "min_lesion_volume_mm3": 20.0}
REQUIRED_KEYS = (
    "format_version",
    "name",
    "version",
    "architecture",
    "config",
    "input",
    "output_labels",
    "thresholds",
    "is_demo",
    "weights_file",
    "weights_sha256",
)


@dataclass(frozen=True)
class ModelPackage:
    """A validated model package: manifest values and the verified weights, held in memory."""

    path: Path
    name: str
    version: str
    config: MTSANetConfig
    input: dict[str, Any]
    output_labels: dict[str, list[str]]
    thresholds: dict[str, float]
    is_demo: bool
    weights_file: str
    weights_sha256: str
    training: dict[str, Any] = field(default_factory=dict)
    accepts: ModelAccepts = field(default_factory=ModelAccepts)
    plausibility: PlausibilityBounds = field(default_factory=PlausibilityBounds)
    format_version: int = FORMAT_VERSION
    architecture: str = ARCHITECTURE
    state_dict: dict[str, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)

    @property
    def identity(self) -> ModelIdentity:
        """Name, version and demo flag written into every output."""
        return ModelIdentity(name=self.name, version=self.version, is_demo=self.is_demo)

    @property
    def gtv_threshold(self) -> float:
        """GTV probability above which a voxel is tumour (manifest `thresholds`, else the default)."""
        return float(self.thresholds.get("gtv_probability", DEFAULT_THRESHOLDS["gtv_probability"]))

    @property
    def min_lesion_volume_mm3(self) -> float:
        """Smallest connected component reported as a lesion (manifest `thresholds`, else the default)."""
        return float(self.thresholds.get("min_lesion_volume_mm3", DEFAULT_THRESHOLDS["min_lesion_volume_mm3"]))

    @property
    def input_size(self) -> int:
        """Side of the square slices the network takes (manifest `input.size`, else its config's)."""
        return int(self.input.get("size", self.config.input_size))

    @property
    def weights_path(self) -> Path:
        return self.path / self.weights_file

    def build_model(self, device: torch.device | str = "cpu") -> MTSANet:
        """MTSANet with this package's verified weights (from memory, not the file), on `device`, in eval mode."""
        model = MTSANet(self.config)
        model.load_state_dict(self.state_dict, strict=True)
        return model.to(device).eval()


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, streamed."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _read_state_dict(path: Path, data: bytes) -> dict[str, torch.Tensor]:
    """Unpickle `data` (the bytes read from `path`, already hashed) as a state_dict."""
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a corrupt file
        raise ModelPackageError(f"model weights {path} cannot be read: {err}") from err
    if not isinstance(state, dict):
        raise ModelPackageError(f"model weights {path} are not a state_dict")
    return state


def _read_manifest(path: Path) -> dict[str, Any]:
    manifest_path = path / MANIFEST_NAME
    if not manifest_path.is_file():
        raise ModelPackageError(f"model package {path} has no {MANIFEST_NAME}")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelPackageError(f"{manifest_path} is not valid JSON: {err}") from err
    if not isinstance(manifest, dict):
        raise ModelPackageError(f"{manifest_path} must hold a JSON object")
    missing = [key for key in REQUIRED_KEYS if key not in manifest]
    if missing:
        raise ModelPackageError(f"{manifest_path} lacks required keys: {', '.join(missing)}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise ModelPackageError(
            f"{manifest_path}: format_version {manifest['format_version']!r} is not supported "
            f"(this node reads {FORMAT_VERSION})"
        )
    if manifest["architecture"] != ARCHITECTURE:
        raise ModelPackageError(f"{manifest_path}: architecture {manifest['architecture']!r} is not {ARCHITECTURE!r}")
    return manifest


def _parse_config(manifest: dict[str, Any], path: Path) -> MTSANetConfig:
    try:
        return MTSANetConfig.from_dict(manifest["config"])
    except (TypeError, ValueError) as err:
        raise ModelPackageError(f"model package {path}: invalid config: {err}") from err


def _parse_accepts(manifest: dict[str, Any], path: Path) -> ModelAccepts:
    try:
        return ModelAccepts.from_manifest(manifest.get("accepts"))
    except ValueError as err:
        raise ModelPackageError(f"model package {path}: {err}") from err


def _check_state_dict(config: MTSANetConfig, weights_path: Path, state: dict[str, torch.Tensor]) -> None:
    """Fail now, with the mismatching keys, rather than at the first job."""
    try:
        MTSANet(config).load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ModelPackageError(
            f"weights {weights_path} do not match the MTSA-Net config in the manifest: {err}"
        ) from err


def load_package(path: str | os.PathLike[str]) -> ModelPackage:
    """Read and validate a package directory; raises `ModelPackageError` on any defect."""
    path = Path(path)
    if not path.is_dir():
        raise ModelPackageError(f"model package directory {path} does not exist")
    manifest = _read_manifest(path)
    config = _parse_config(manifest, path)
    accepts = _parse_accepts(manifest, path)
    weights_path = path / str(manifest["weights_file"])
    if Path(manifest["weights_file"]).name != manifest["weights_file"]:
        raise ModelPackageError(f"model package {path}: weights_file must be a plain file name")
    if not weights_path.is_file():
        raise ModelPackageError(f"model package {path}: weights file {weights_path.name} is missing")
    data = weights_path.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != manifest["weights_sha256"]:
        raise ModelPackageError(
            f"model package {path}: sha256 mismatch for {weights_path.name} "
            f"(manifest {manifest['weights_sha256']}, file {actual}); the weights are corrupt or were replaced"
        )
    state = _read_state_dict(weights_path, data)
    _check_state_dict(config, weights_path, state)
    try:
        plausibility = PlausibilityBounds.from_manifest(manifest.get("plausibility"))
    except (TypeError, ValueError) as err:
        raise ModelPackageError(f"model package {path}: {err}") from err
    return ModelPackage(
        path=path,
        name=str(manifest["name"]),
        version=str(manifest["version"]),
        config=config,
        input=dict(manifest["input"]),
        output_labels=dict(manifest["output_labels"]),
        thresholds={key: float(value) for key, value in manifest["thresholds"].items()},
        is_demo=bool(manifest["is_demo"]),
        weights_file=str(manifest["weights_file"]),
        weights_sha256=actual,
        training=dict(manifest.get("training") or {}),
        accepts=accepts,
        plausibility=plausibility,
        format_version=int(manifest["format_version"]),
        state_dict=state,
    )


def save_package(
    model: MTSANet,
    config: MTSANetConfig,
    out_dir: str | os.PathLike[str],
    name: str,
    version: str,
    is_demo: bool,
    training_info: dict[str, Any] | None = None,
    thresholds: dict[str, float] | None = None,
    accepts: ModelAccepts | None = None,
    plausibility: PlausibilityBounds | None = None,
) -> ModelPackage:
    """Write `manifest.json` and the weights to `out_dir`; returns the re-loaded package.

    `accepts` defaults to `ModelAccepts()`, written out in full so the package says what it accepts.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights_path = out_dir / WEIGHTS_NAME
    state = {key: value.detach().cpu() for key, value in model.state_dict().items()}
    torch.save(state, weights_path)
    manifest = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "version": version,
        "architecture": ARCHITECTURE,
        "config": config.to_dict(),
        "input": dict(INPUT_SPEC, size=config.input_size),
        "output_labels": OUTPUT_LABELS,
        "thresholds": dict(thresholds or DEFAULT_THRESHOLDS),
        "accepts": (accepts or ModelAccepts()).to_manifest(),
        "plausibility": (plausibility or PlausibilityBounds()).to_manifest(),
        "is_demo": is_demo,
        "weights_file": WEIGHTS_NAME,
        "weights_sha256": sha256_of(weights_path),
        "training": training_info or {},
    }
    (out_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return load_package(out_dir)


def default_package_path() -> Path:
    """The package to use when none is named: `$DICOM_NODE_MODEL`, else the demo package."""
    override = os.environ.get(MODEL_ENV_VAR)
    return Path(override) if override else DEMO_PACKAGE_DIR
