#!/usr/bin/env bash
# Set up everything the node needs on a fresh Linux machine (idempotent):
#   - the Debian packages the tests use as real peers (dcmtk, dicom3tools,
#     postgresql, orthanc,
#     chromium for the web view), installed with apt when missing and we are root or have
#     passwordless sudo;
#   - a virtual environment in .venv with the project and its test extras.
# torch is pinned to 2.13.0 first so that pip takes the CPU build where one is
# provided locally; the project's own requirement is a range that admits it.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests use as real peers, each with a file that shows it is installed.
declare -A peers=(
  [dcmtk]=/usr/bin/storescu
  [dicom3tools]=/usr/bin/dciodvfy
  [postgresql]=/usr/lib/postgresql
  [orthanc]=/usr/sbin/Orthanc
  [chromium]=/usr/bin/chromium
)
missing=()
for package in "${!peers[@]}"; do
  [ -e "${peers[$package]}" ] || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    if sudo -n true 2>/dev/null; then sudo="sudo -n"; else sudo=""; fi
  fi
  if [ "$(id -u)" -eq 0 ] || [ -n "$sudo" ]; then
    echo "==> installing ${missing[*]} (apt)"
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "==> ${missing[*]} missing and no root: tests that need them will be skipped" >&2
  fi
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv"
  "$python" -m venv .venv
fi
if ! .venv/bin/python -c "import dicom_node, torch, pytest" >/dev/null 2>&1 \
   || [ pyproject.toml -nt .venv/.installed ]; then
  echo "==> installing Python dependencies into .venv"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e ".[test]"
  touch .venv/.installed
fi
echo "==> setup done"
