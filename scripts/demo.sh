#!/usr/bin/env bash
# Quick start 1/2: install the runtime (no torch) into .venv and run retrofit-agent on the
# sample clip with the reference bundle, printing the tags it publishes as they arrive.
# Extra arguments go to retrofit-agent (e.g. --max-frames 30, --loop); BUNDLE=DIR picks
# another bundle.
#
# What you see: a legend (which bundle, whether it is trained, its labels, how to read the
# lines), then one `tags` line per frame while the clip plays, then a per-group summary of
# how many frames each label was the group's top label and a tag.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
BUNDLE=${BUNDLE:-models/reference}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
# Install (or repair) only when the installed command does not run.
"$VENV/bin/retrofit-agent" --version >/dev/null 2>&1 ||
  { "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e . 2>&1 | grep -v '^WARNING: Location' || true; }

sock="ipc://${TMPDIR:-/tmp}/retrofit-demo-$$.sock"
# tail reads the bundle's manifest for the legend (trained or not, notice, labels) and
# prints the summary when it is stopped.
"$VENV/bin/retrofit-agent" tail --endpoint "$sock" --legend "$BUNDLE" --summary &
tail_pid=$!
trap 'kill "$tail_pid" 2>/dev/null || true' EXIT
# --realtime paces the clip at its own 15 fps, as a camera would deliver it. Only the
# daemon's warnings and errors are shown, so that its log does not drown the tags.
"$VENV/bin/retrofit-agent" --camera models/sample/drive.mp4 --realtime --bundle "$BUNDLE" \
  --publish "$sock" --metrics-address 127.0.0.1:0 --log-format console --log-level warning "$@"
sleep 0.3  # the last messages are still on their way
kill -TERM "$tail_pid" 2>/dev/null || true
wait "$tail_pid" 2>/dev/null || true
