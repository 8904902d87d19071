#!/usr/bin/env bash
# Set up (scripts/setup.sh), run the static checks (scripts/lint.sh), then the test suite.
# Arguments go to pytest: `bash scripts/test.sh -m "not slow"` is the fast tier.
# Tests run in PYTEST_WORKERS processes (default 2, the CI machine's cores; 0 = in this
# process), one test file per process at a time, so module fixtures are built once.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/lint.sh
exec .venv/bin/python -m pytest -n "${PYTEST_WORKERS:-2}" --dist loadfile "$@"
