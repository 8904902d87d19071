#!/usr/bin/env bash
# Set up (scripts/setup.sh), run the static checks (scripts/lint.sh), then the test suite.
# Arguments go to pytest: `bash scripts/test.sh -m "not slow"` is the fast tier.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/lint.sh
exec .venv/bin/python -m pytest "$@"
