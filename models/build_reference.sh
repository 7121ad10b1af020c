#!/usr/bin/env bash
# Rebuild models/reference/ (the seeded, untrained reference bundle) from this repo's code.
# Needs the train extra (bash scripts/test.sh sets it up in .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${VENV:-.venv}/bin/python" -m retrofit_agent.train.reference --out models/reference "$@"
