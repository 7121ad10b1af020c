#!/usr/bin/env bash
# The container root for tests/deploy/test_systemd_nspawn.py: a minimal Debian with a real
# systemd as PID 1 (booted by systemd-nspawn) and Debian's python3 for the daemon.
#
#   tests/deploy/nspawn_root.sh             print the cached root tarball's path, building it first if missing
#   tests/deploy/nspawn_root.sh --rebuild   build it again even when cached
#
# The tarball is cached as ${RETROFIT_CACHE:-${XDG_CACHE_HOME:-~/.cache}/retrofit-agent}/nspawn/
# <suite>-<hash>.tar[.zst], keyed by a hash of this script (suite, package list, recipe): editing
# the recipe builds a new one. A build is debootstrap --variant=minbase (~75 s, ~300 MB unpacked,
# measured on the dev box); an unpack is a few seconds. Needs root, debootstrap and apt's Debian
# mirror (or RETROFIT_DEBIAN_MIRROR); scripts/test.sh installs the Debian packages.
set -euo pipefail

SUITE=bookworm  # deploy/arm64/runtime.env: the vehicle image's Debian and its python3 (3.11)
# systemd-sysv: /sbin/init for --boot; dbus: systemctl/journalctl talk to PID 1 over the bus.
PACKAGES=systemd,systemd-sysv,dbus,python3

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${RETROFIT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/retrofit-agent}/nspawn"
REBUILD=0
case "${1:-}" in
  "") ;;
  --rebuild) REBUILD=1 ;;
  *) sed -n '2,13p' "$0"; exit 2 ;;
esac

[ "$(id -u)" = 0 ] || { echo "nspawn_root.sh: debootstrap needs root" >&2; exit 2; }
command -v debootstrap >/dev/null || { echo "nspawn_root.sh: debootstrap not found (apt-get install debootstrap)" >&2; exit 2; }

key="$(sha256sum "$HERE/nspawn_root.sh" | cut -c1-16)"
if command -v zstd >/dev/null; then COMPRESS=(-I "zstd -T0 -3"); ext=tar.zst; else COMPRESS=(); ext=tar; fi
tarball="$CACHE/$SUITE-$key.$ext"
mkdir -p "$CACHE"
# One build at a time (parallel test sessions wait for it instead of building twice).
exec 9>"$CACHE/.lock"
flock -w 900 9 || { echo "nspawn_root.sh: timed out waiting for $CACHE/.lock" >&2; exit 1; }
if [ -f "$tarball" ] && [ "$REBUILD" = 0 ]; then echo "$tarball"; exit 0; fi

mirror="${RETROFIT_DEBIAN_MIRROR:-}"
if [ -z "$mirror" ]; then
  # The mirror this machine's apt already uses (one-line and deb822 sources), else Debian's CDN.
  mirror=$(grep -rhoE '^(deb|URIs:)[[:space:]]+(\[[^]]*\][[:space:]]+)?https?://[^[:space:]]+' \
             /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
           | grep -oE 'https?://[^[:space:]]+' | grep -i debian | grep -v security | head -1 || true)
  mirror="${mirror:-http://deb.debian.org/debian}"
fi

work="$(mktemp -d "$CACHE/build.XXXXXX")"
trap 'rm -rf "$work"' EXIT
echo "nspawn_root.sh: debootstrap $SUITE ($PACKAGES) from $mirror" >&2
if ! debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$work/root" "$mirror" >"$work/debootstrap.log" 2>&1; then
  tail -20 "$work/debootstrap.log" >&2
  [ -f "$work/root/debootstrap/debootstrap.log" ] && tail -20 "$work/root/debootstrap/debootstrap.log" >&2
  exit 1
fi
root="$work/root"
# Smaller tarball: no downloaded .debs or apt lists (the tests install nothing with apt inside).
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
# A fresh machine id per boot (systemd writes a transient one when the file is empty).
: >"$root/etc/machine-id"
echo retrofit-test >"$root/etc/hostname"
tar -C "$root" --numeric-owner -cpf "$work/root.$ext" "${COMPRESS[@]}" .
mv "$work/root.$ext" "$tarball"
# Older recipes' tarballs are never read again.
find "$CACHE" -maxdepth 1 -name "$SUITE-*.tar*" ! -name "$(basename "$tarball")" -delete
echo "$tarball"
