"""The suite's own ordering (`tests/conftest.py`): what it names must exist."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import LONG_RUNNING_FILES


def test_every_long_running_file_exists() -> None:
    """A file renamed or removed but left in `LONG_RUNNING_FILES` silently loses its early start,
    and the minutes it runs become the run's tail again."""
    root = Path(__file__).resolve().parents[1]
    missing = [name for name in LONG_RUNNING_FILES if not (root / name).is_file()]
    assert not missing, f"not found: {missing}"
