#!/usr/bin/env bash
# Runs the test suite on a fresh machine: installs the project into .venv/ with its dev, plot and wandb extras
# (scripts/setup.sh: the plot test draws a real PNG, the W&B test writes an offline run), then pytest from that
# environment. Extra arguments go to pytest, e.g. `scripts/test.sh tests/data -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh dev,plot,wandb
python -m pytest -q "$@"
