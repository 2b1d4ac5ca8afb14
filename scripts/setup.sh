#!/usr/bin/env bash
# Installs what unitrain needs on a fresh machine: the CPU build of torch first (a bare `torch` requirement
# would pull several GB of CUDA packages), then the project itself with the given extras (default: dev).
# Idempotent: a second run installs nothing new. A machine that already has a torch build (e.g. CUDA) keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-dev}"
pip_install() { python3 -m pip install --quiet --disable-pip-version-check "$@"; }
if ! python3 -c "import torch" 2>/dev/null; then
    pip_install torch==2.13.0
fi
pip_install -e ".[${extras}]"
