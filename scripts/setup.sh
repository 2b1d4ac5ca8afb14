#!/usr/bin/env bash
# Installs unitrain into a virtual environment of the checkout, `.venv/` (created when missing, reused when
# present), never into the interpreter found on PATH: a distribution's python3 refuses that (PEP 668), and any
# other one would be changed for every project that uses it. torch==2.13.0 is installed only into an environment
# that has no torch, so a torch build already there (CUDA, ROCm, ...) is kept; then the project itself, editable,
# with the extras given as the first argument (default: dev).
#
#   UNITRAIN_VENV=DIR     use (or create) the environment DIR instead of .venv, e.g. an existing one that has
#                         the torch build you want: UNITRAIN_VENV=~/envs/gpu scripts/demo.sh (a relative DIR is
#                         taken from the checkout)
#   UNITRAIN_PYTHON=EXE   the interpreter that creates a new environment (default python3; 3.11 or later)
#
# scripts/demo.sh and scripts/test.sh source this file and then run from the environment (VIRTUAL_ENV, PATH).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
venv="${UNITRAIN_VENV:-.venv}"
extras="${1:-dev}"
python="${UNITRAIN_PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
    if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        echo "error: unitrain needs Python 3.11 or later to create $venv; '$python' is" \
            "$("$python" --version 2>&1 || echo 'not found') (choose another with UNITRAIN_PYTHON=...)" >&2
        exit 2
    fi
    echo "== creating the virtual environment $venv with $("$python" --version 2>&1) ($(command -v "$python"))"
    if ! "$python" -m venv "$venv"; then
        echo "error: '$python -m venv $venv' failed (on Debian/Ubuntu: apt install python3-venv)" >&2
        exit 2
    fi
fi
pip_install() { "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$@"; }
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
    echo "== installing torch==2.13.0 into $venv (an environment with a torch of its own keeps it)"
    pip_install torch==2.13.0
fi
pip_install -e ".[${extras}]"
VIRTUAL_ENV="$(cd "$venv" && pwd)"
export VIRTUAL_ENV PATH="$VIRTUAL_ENV/bin:$PATH"
echo "== unitrain $("$venv/bin/python" -c 'import unitrain; print(unitrain.__version__)') with torch" \
    "$("$venv/bin/python" -c 'import torch; print(torch.__version__)') is installed in $venv;" \
    "to use it in your shell: source $venv/bin/activate"
