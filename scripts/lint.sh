#!/usr/bin/env bash
# Static checks CI runs before the tests: ruff (lint + format) and mypy (storage, dicom_node, inference).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
