#!/usr/bin/env bash
# Quick start 2/2: set up the full environment (runtime + train extra + test tools) in .venv
# and run every test. CI runs exactly this (.ci/run). Extra arguments go to pytest,
# e.g. `-m "not slow"` for a quicker local run.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
pip_q() { "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@" 2>&1 | grep -v '^WARNING: Location' || true; }

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
# torch with pip and pinned first: this is the build pip finds on these machines' disk (CUDA
# build, runs on the CPU); letting a resolver pick "torch" would download several GB.
pip_q "torch==2.14.1" "torchvision==0.29.1"
pip_q -e ".[train,test]"
"$VENV/bin/python" -c "import torch, timm, open_clip, onnxruntime, zmq" # fail loudly if an install failed
exec "$VENV/bin/python" -m pytest "$@"
