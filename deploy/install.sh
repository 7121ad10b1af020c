#!/usr/bin/env bash
# Install retrofit-agent as a systemd service, on a running Debian system or into a fleet
# image's root filesystem (DESTDIR). Same layout as Dockerfile.arm64 and the QEMU test's
# root filesystem (deploy/arm64/runtime.env):
#
#   /opt/retrofit-agent/site/                 runtime wheels (runtime-requirements.txt) + the package
#   /opt/retrofit-agent/bin/retrofit-agent    launcher: /usr/bin/python3 -m retrofit_agent
#   /usr/lib/systemd/system/retrofit-agent.service
#   /usr/lib/sysusers.d/retrofit-agent.conf   the retrofit-agent system user (video group member)
#   /etc/retrofit-agent/agent.toml            config (kept if it already exists)
#   /usr/share/retrofit-agent/bundles/reference, /usr/share/doc/retrofit-agent/README.md
#
# Usage (from a checkout, as root):
#   deploy/install.sh                                    # this machine: install, create user, enable --now
#   deploy/install.sh --destdir /srv/image --arch aarch64  # into an arm64 image root; enabled offline
# Options: --destdir DIR, --arch native|aarch64, --no-enable, --no-bundle.
# Needs python3 with pip on the host (wheels are resolved by the host pip, also for aarch64) and
# Debian's python3 (3.11, bookworm) on the target.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
# shellcheck source=arm64/runtime.env
. "$HERE/arm64/runtime.env"
DESTDIR="" ARCH=native ENABLE=1 BUNDLE=1
while [ $# -gt 0 ]; do
  case "$1" in
    --destdir) DESTDIR="$(realpath -m "$2")"; shift 2 ;;
    --arch) ARCH="$2"; shift 2 ;;
    --no-enable) ENABLE=0; shift ;;
    --no-bundle) BUNDLE=0; shift ;;
    -h|--help) sed -n '2,/^[^#]/{/^#/p}' "$0"; exit 0 ;;  # the comment block above, nothing after it
    *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$ARCH" in
  native) PLATFORM=() ;;
  aarch64) read -r -a PLATFORM <<<"$("$HERE/arm64/rootfs.sh" pip-flags)" ;;
  *) echo "install.sh: --arch must be native or aarch64, got $ARCH" >&2; exit 2 ;;
esac
PYTHON="${PYTHON:-python3}"
pip_target() {
  "$PYTHON" -m pip install -q --disable-pip-version-check --no-warn-conflicts --upgrade \
    --target "$DESTDIR$SITE" "$@" 2>&1 | { grep -v '^WARNING: Location' || true; }
}

echo "installing retrofit-agent into ${DESTDIR:-/} ($ARCH)"
pip_target --no-deps --only-binary=:all: "${PLATFORM[@]}" -r "$HERE/arm64/runtime-requirements.txt"
pip_target --no-deps "$REPO"     # pure Python: one wheel for every architecture
rm -rf "${DESTDIR:?}$SITE/bin"    # console scripts with the build host's interpreter; the launcher replaces them
# Byte-compile with the target's paths (-s/-p) when the host Python is the target's minor version,
# since ProtectSystem=strict keeps the service from writing them at run time.
if [ "$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" = "$PYTHON_VERSION" ]; then
  "$PYTHON" -m compileall -q -j0 ${DESTDIR:+-s "$DESTDIR" -p /} "$DESTDIR$SITE" >/dev/null
fi

install -D -m 0755 "$HERE/bin/retrofit-agent" "$DESTDIR$PREFIX/bin/retrofit-agent"
install -D -m 0644 "$REPO/systemd/retrofit-agent.service" "$DESTDIR/usr/lib/systemd/system/retrofit-agent.service"
install -D -m 0644 "$REPO/systemd/retrofit-agent.sysusers" "$DESTDIR/usr/lib/sysusers.d/retrofit-agent.conf"
# The uplink (README, "Uplink"): its unit and user; it is enabled once uplink.toml names a broker.
install -D -m 0644 "$REPO/systemd/retrofit-uplink.service" "$DESTDIR/usr/lib/systemd/system/retrofit-uplink.service"
install -D -m 0644 "$REPO/systemd/retrofit-uplink.sysusers" "$DESTDIR/usr/lib/sysusers.d/retrofit-uplink.conf"
if [ ! -e "$DESTDIR/etc/retrofit-agent/uplink.toml" ]; then
  install -D -m 0640 "$HERE/uplink.toml" "$DESTDIR/etc/retrofit-agent/uplink.toml"
fi
install -D -m 0644 "$REPO/README.md" "$DESTDIR/usr/share/doc/retrofit-agent/README.md"
if [ -e "$DESTDIR/etc/retrofit-agent/agent.toml" ]; then
  echo "keeping existing /etc/retrofit-agent/agent.toml"
else
  install -D -m 0644 "$HERE/agent.toml" "$DESTDIR/etc/retrofit-agent/agent.toml"
fi
if [ "$BUNDLE" = 1 ]; then
  rm -rf "$DESTDIR$BUNDLES/reference"
  mkdir -p "$DESTDIR$BUNDLES"
  cp -r "$REPO/models/reference" "$DESTDIR$BUNDLES/reference"
  chmod -R u=rwX,go=rX "$DESTDIR$BUNDLES/reference"
fi

if [ -n "$DESTDIR" ]; then
  # An image root: create the user and enable the unit offline, if the image has the files.
  if [ -f "$DESTDIR/etc/passwd" ] && command -v systemd-sysusers >/dev/null; then
    systemd-sysusers --root="$DESTDIR" "$DESTDIR/usr/lib/sysusers.d/retrofit-agent.conf"
    systemd-sysusers --root="$DESTDIR" "$DESTDIR/usr/lib/sysusers.d/retrofit-uplink.conf"
  fi
  if [ "$ENABLE" = 1 ] && [ -d "$DESTDIR/etc/systemd/system" ]; then
    systemctl --root="$DESTDIR" enable retrofit-agent.service
  fi
elif [ -d /run/systemd/system ]; then
  systemd-sysusers /usr/lib/sysusers.d/retrofit-agent.conf /usr/lib/sysusers.d/retrofit-uplink.conf
  systemctl daemon-reload
  if [ "$ENABLE" = 1 ]; then systemctl enable --now retrofit-agent.service; fi
else
  echo "systemd is not running here: run systemd-sysusers and systemctl enable retrofit-agent on the target"
fi
echo "done"
