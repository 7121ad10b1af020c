#!/usr/bin/env bash
# Quick start 1/2: install the runtime (no torch) into .venv and run retrofit-agent on the
# sample clip with the reference bundle, printing the tags it publishes as they arrive.
# Extra arguments go to retrofit-agent (e.g. --max-frames 30, --loop).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e . 2>&1 | grep -v '^WARNING: Location' || true

sock="ipc://${TMPDIR:-/tmp}/retrofit-demo-$$.sock"
"$VENV/bin/retrofit-agent" tail --endpoint "$sock" &
tail_pid=$!
trap 'kill "$tail_pid" 2>/dev/null || true' EXIT
# --realtime paces the clip at its own 15 fps, as a camera would deliver it.
"$VENV/bin/retrofit-agent" --camera models/sample/drive.mp4 --realtime --bundle models/reference \
  --publish "$sock" --metrics-address 127.0.0.1:0 --log-format console "$@"
sleep 0.3
