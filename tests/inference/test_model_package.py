"""Model packages: round trip, identity, and every defect named in its error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from inference.errors import ModelPackageError
from inference.model.accepts import ModelAccepts
from inference.model.config import MTSANetConfig
from inference.model.mtsa_net import MTSANet
from inference.model.package import (
    DEMO_PACKAGE_DIR,
    MODEL_ENV_VAR,
    default_package_path,
    load_package,
    save_package,
    sha256_of,
)
from tests.helpers.models import MINIMAL_CONFIG

TINY = MTSANetConfig(**MINIMAL_CONFIG)


@pytest.fixture
def package_dir(tmp_path: Path) -> Path:
    torch.manual_seed(1)
    save_package(MTSANet(TINY), TINY, tmp_path / "pkg", "tiny", "0.1.0", is_demo=True, training_info={"epochs": 2})
    return tmp_path / "pkg"


def test_round_trip_keeps_weights_and_manifest(package_dir: Path) -> None:
    package = load_package(package_dir)
    assert package.config == TINY
    assert package.training == {"epochs": 2}
    assert package.input["modality"] == "MR" and package.input["size"] == 64
    assert package.output_labels["egfr"] == ["wild type", "mutant"]
    assert package.thresholds["gtv_probability"] == 0.5
    assert package.weights_sha256 == sha256_of(package_dir / "weights.pt")
    model = package.build_model("cpu")
    assert not model.training
    reference = torch.load(package_dir / "weights.pt", weights_only=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, reference[key])


def test_identity_carries_demo_flag(package_dir: Path) -> None:
    identity = load_package(package_dir).identity
    assert (identity.name, identity.version, identity.is_demo) == ("tiny", "0.1.0", True)
    assert "NOT FOR CLINICAL USE" in identity.display


def test_flipped_byte_is_a_sha256_error(package_dir: Path) -> None:
    weights = package_dir / "weights.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelPackageError, match="sha256 mismatch"):
        load_package(package_dir)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelPackageError, match="does not exist"):
        load_package(tmp_path / "nowhere")


def test_missing_manifest(package_dir: Path) -> None:
    (package_dir / "manifest.json").unlink()
    with pytest.raises(ModelPackageError, match="has no manifest.json"):
        load_package(package_dir)


def test_invalid_manifest_json(package_dir: Path) -> None:
    (package_dir / "manifest.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ModelPackageError, match="not valid JSON"):
        load_package(package_dir)


def rewrite_manifest(package_dir: Path, **changes: object) -> None:
    path = package_dir / "manifest.json"
    manifest = json.loads(path.read_text(encoding="utf-8"))
    manifest.update(changes)
    for key, value in changes.items():
        if value is None:
            del manifest[key]
    path.write_text(json.dumps(manifest), encoding="utf-8")


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"weights_sha256": None}, "lacks required keys: weights_sha256"),
        ({"architecture": "U-Net"}, "is not 'MTSA-Net'"),
        ({"format_version": 99}, "format_version 99"),
        ({"config": {"width": 2, "input_size": 100}}, "invalid config"),
        ({"weights_file": "../weights.pt"}, "plain file name"),
        ({"accepts": {"spacing_mm": [10, 0.1]}}, r"accepts.spacing_mm must be \[low, high\] with 0 < low <= high"),
        ({"accepts": {"slices": [8.5, 100]}}, "accepts.slices must be whole numbers"),
        ({"accepts": {"contrast": "T2"}}, "accepts.contrast must be one of T1-CE, any"),
        ({"accepts": {"modality": "MR"}}, "accepts.modality must be a list"),
        ({"accepts": {"max_memory_mib": 0}}, "accepts.max_memory_mib must be positive"),
        ({"accepts": {"fov": [1, 2]}}, "accepts: unknown key\\(s\\) fov"),
    ],
)
def test_manifest_defects_are_named(package_dir: Path, changes: dict, message: str) -> None:
    rewrite_manifest(package_dir, **changes)
    with pytest.raises(ModelPackageError, match=message):
        load_package(package_dir)


def test_accepts_is_written_and_read_back(package_dir: Path) -> None:
    manifest = json.loads((package_dir / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["accepts"] == ModelAccepts().to_manifest()
    assert manifest["accepts"]["slices"] == [8, 1024] and manifest["accepts"]["contrast"] == "T1-CE"
    rewrite_manifest(package_dir, accepts={"slices": [16, 400], "field_of_view_mm": [150, 300]})
    accepts = load_package(package_dir).accepts
    assert accepts.slices == (16, 400) and accepts.field_of_view_mm == (150.0, 300.0)
    assert accepts.spacing_mm == ModelAccepts().spacing_mm  # keys left out keep their defaults


def test_a_package_without_accepts_gets_the_defaults(package_dir: Path) -> None:
    rewrite_manifest(package_dir, accepts=None)
    assert load_package(package_dir).accepts == ModelAccepts()


def test_the_demo_package_declares_what_it_accepts() -> None:
    manifest = json.loads((DEMO_PACKAGE_DIR / "manifest.json").read_text(encoding="utf-8"))
    assert ModelAccepts.from_manifest(manifest["accepts"]) == ModelAccepts()
    assert manifest["accepts"]["modality"] == ["MR"] and manifest["accepts"]["max_model_grid_voxels"] == 384 * 384 * 512


def test_missing_weights(package_dir: Path) -> None:
    (package_dir / "weights.pt").unlink()
    with pytest.raises(ModelPackageError, match="weights file weights.pt is missing"):
        load_package(package_dir)


def test_state_dict_not_matching_the_config(package_dir: Path) -> None:
    rewrite_manifest(package_dir, config={**TINY.to_dict(), "width": 4})
    with pytest.raises(ModelPackageError, match="do not match the MTSA-Net config"):
        load_package(package_dir)


def test_default_package_path_honours_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(MODEL_ENV_VAR, raising=False)
    assert default_package_path() == DEMO_PACKAGE_DIR
    assert DEMO_PACKAGE_DIR.parts[-4:] == ("inference", "model", "shipped", "mtsa-demo")
    monkeypatch.setenv(MODEL_ENV_VAR, str(tmp_path))
    assert default_package_path() == tmp_path


def test_weights_replaced_after_loading_are_never_used(package_dir: Path) -> None:
    """The verified state_dict is kept in memory: a file swapped after the sha256 check has no effect."""
    package = load_package(package_dir)
    verified = {key: value.clone() for key, value in package.state_dict.items()}
    torch.manual_seed(2)
    torch.save(MTSANet(TINY).state_dict(), package_dir / "weights.pt")  # same shapes, other values
    model = package.build_model("cpu")
    for key, value in model.state_dict().items():
        assert torch.equal(value, verified[key]), key
    with pytest.raises(ModelPackageError, match="sha256 mismatch"):
        load_package(package_dir)


def test_torch_requirement_excludes_the_unsafe_weights_only_loader() -> None:
    """torch < 2.6 has a code-execution flaw in `torch.load(weights_only=True)`."""
    import tomllib

    from packaging.requirements import Requirement

    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text(encoding="utf-8"))
    (torch_req,) = [Requirement(r) for r in pyproject["project"]["dependencies"] if r.startswith("torch")]
    assert "2.5.1" not in torch_req.specifier
    assert "2.6.0" in torch_req.specifier and "2.13.0" in torch_req.specifier
