#!/usr/bin/env bash
# Build the trained reference bundle from seeds: the procedural world, a CLIP teacher trained on it
# from scratch, EfficientNet-B3 distilled from that teacher, int8, bank, bundle, and the daemon's
# score on the world's drive clip (models/configs/chain-reference.toml). CPU hours on 2 cores;
# every stage is cached in WORK and resumable, so run it again after an interruption:
#
#   bash models/build_reference.sh                 # into models/reference
#   bash models/build_reference.sh --until teacher # just the teacher, for now
#
# The seeded UNTRAINED bundle the tests build comes from python -m retrofit_agent.train.reference.
# Needs the train extra (bash scripts/test.sh sets it up in .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-${XDG_CACHE_HOME:-$HOME/.cache}/retrofit-agent/reference-build}
exec "${VENV:-.venv}/bin/retrofit-model" chain --config models/configs/chain-reference.toml \
  --work "$WORK" --out models/reference "$@"
