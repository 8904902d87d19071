#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the demo: this node and a TPS stand-in on
# loopback, a synthetic study sent with C-STORE, the results arriving.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/dicom-node demo "$@"
