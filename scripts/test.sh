#!/usr/bin/env bash
# Runs the test suite on a fresh machine: installs the project with its dev and plot extras (idempotent;
# the plot test draws a real PNG), then pytest. Extra arguments go to pytest,
# e.g. `scripts/test.sh tests/data -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev,plot
python3 -m pytest -q "$@"
