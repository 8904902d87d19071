"""dicom3tools' `dciodvfy`, the outside validator every RTSTRUCT, SR and SEG the node writes must pass."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

#: The one warning accepted: dciodvfy does not know the node's private coding scheme designator.
ACCEPTED_WARNING = "Unrecognized defined term <99DICOMNODE> for value 1 of attribute <Coding Scheme Designator>"


def dciodvfy_messages(path: Path) -> tuple[list[str], list[str]]:
    """(errors, warnings) that dciodvfy reports for one file; skips without dciodvfy."""
    tool = shutil.which("dciodvfy")
    if tool is None:
        pytest.skip("dciodvfy (Debian package dicom3tools) is not installed")
    run = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=120)
    lines = (run.stdout + run.stderr).splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    warnings = [line for line in lines if line.startswith("Warning")]
    return errors, warnings
