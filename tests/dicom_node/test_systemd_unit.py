"""The systemd unit is valid and keeps its hardening (a later edit must not drop it)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SYSTEMD = Path(__file__).resolve().parents[2] / "systemd"
UNIT = SYSTEMD / "dicom-node.service"
INSTALLED_EXEC = "/opt/dicom-node/.venv/bin/dicom-node"

REQUIRED = {
    "User": "dicom-node",
    "Group": "dicom-node",
    "EnvironmentFile": "-/etc/dicom-node/dicom-node.env",
    "ExecStart": f"{INSTALLED_EXEC} serve --config /etc/dicom-node/node.toml",
    "WorkingDirectory": "/var/lib/dicom-node",
    "StateDirectory": "dicom-node",
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "ReadWritePaths": "/var/lib/dicom-node",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    "CapabilityBoundingSet": "",
    "Restart": "on-failure",
    "TimeoutStopSec": "60",
    "LimitNOFILE": "65536",
    "Type": "notify",
    "NotifyAccess": "main",
    "WatchdogSec": "120",
}


def _service_keys(text: str) -> dict[str, str]:
    """Key=value pairs of the [Service] section (comments ignored)."""
    keys: dict[str, str] = {}
    section = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]":
            key, _, value = line.partition("=")
            keys[key.strip()] = value.strip()
    return keys


def test_unit_has_hardening_and_paths() -> None:
    keys = _service_keys(UNIT.read_text())
    for key, value in REQUIRED.items():
        assert keys.get(key) == value, f"{key}= should be {value!r}, is {keys.get(key)!r}"
    assert "AmbientCapabilities" not in keys, "no capabilities by default (port >= 1024)"


def test_env_file_only_sets_known_variables() -> None:
    lines = [line.lstrip("#") for line in (SYSTEMD / "dicom-node.env").read_text().splitlines()]
    names = {line.split("=", 1)[0] for line in lines if line.startswith("DICOM_NODE")}
    assert {"DICOM_NODE_DEVICE", "DICOM_NODE_MODEL", "DICOM_NODE__NODE__PORT"} <= names


def _installable_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this venv's entry point, which exists here."""
    entry = Path(sys.executable).parent / "dicom-node"
    if not entry.exists():
        pytest.skip(f"{entry} missing: install the project into the venv (pip install -e .)")
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace(INSTALLED_EXEC, str(entry)))
    return unit


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed (systemd host needed)")
    unit = _installable_copy(tmp_path)
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "dicom-node.service" not in result.stderr, result.stderr


def test_systemd_security_exposure_is_low(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed (systemd host needed)")
    unit = _installable_copy(tmp_path)
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--threshold=30", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    if "--offline" in result.stderr or "--threshold" in result.stderr:
        pytest.skip("this systemd-analyze lacks --offline/--threshold (systemd < 250)")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
