#!/usr/bin/env bash
# Quick start 2/2: set up the full environment (runtime + train extra + test tools) in .venv
# and run every test. CI runs exactly this (.ci/run). Extra arguments go to pytest,
# e.g. `-m "not slow"` for a quicker local run.
set -euo pipefail
cd "$(dirname "$0")/.."
# --- Debian programs for the deployment tests (tests/deploy): systemd-analyze/systemd-sysusers,
# promtool + prometheus, debootstrap + qemu-user-static (ARM64 root filesystem), strace (syscall
# check), ffmpeg. apt-get runs only when one is missing, so repeated local runs stay fast.
# mosquitto + mosquitto-clients (mosquitto_passwd): the uplink's broker tests (tests/daemon/uplink).
DEB_PACKAGES="systemd systemd-container prometheus debootstrap qemu-user-static strace ffmpeg zstd ca-certificates mosquitto mosquitto-clients"
missing=""
for pkg in $DEB_PACKAGES; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing="$missing $pkg"
done
if [ -n "$missing" ] && command -v apt-get >/dev/null; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
elif [ -n "$missing" ]; then
  echo "no apt-get: tests needing$missing will be skipped" >&2
fi
# --- end of Debian programs
VENV=${VENV:-.venv}
# pip, quietly, minus this machine's harmless index warnings; a failed install fails the run.
pip_q() {
  local out status=0
  out=$("$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@" 2>&1) || status=$?
  printf '%s\n' "$out" | grep -v -e '^WARNING: Location' -e '^$' >&2 || true
  return "$status"
}

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
# torch with pip and pinned first: this is the build pip finds on these machines' disk (CUDA
# build, runs on the CPU); letting a resolver pick "torch" would download several GB.
pip_q "torch==2.14.1" "torchvision==0.29.1"
pip_q -e ".[train,test]"
"$VENV/bin/python" -c "import torch, timm, open_clip, onnxruntime, zmq" # fail loudly if an install failed
# The style checks run first and fail the run: lint, format, and types on the runtime.
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
"$VENV/bin/mypy"
exec "$VENV/bin/python" -m pytest "$@"
