#!/usr/bin/env bash
# The ARM64 (aarch64) Debian root filesystem the QEMU integration test runs the daemon in.
# Built from the same files as Dockerfile.arm64: packages.txt (Debian packages),
# runtime-requirements.txt (wheels) and runtime.env (suite, Python, install paths).
#
#   sudo deploy/arm64/rootfs.sh build     # ~1 min cold, instant when cached; needs root (debootstrap)
#   deploy/arm64/rootfs.sh path           # where the cached root filesystem is (or will be)
#   deploy/arm64/rootfs.sh python ARGS    # run the rootfs's python3 under qemu-aarch64-static; no root
#   deploy/arm64/rootfs.sh pip-flags      # pip's flags for aarch64 wheels (deploy/install.sh uses them)
#
# Build (the fast path measured in shared/arm64/README.md): debootstrap's first stage only,
# then every downloaded .deb unpacked with dpkg-deb (no maintainer scripts, so nothing runs
# emulated), then the aarch64 wheels resolved and unpacked by the HOST pip with --platform.
# The emulated second stage plus pip inside a chroot gives the same files in ~4 min instead
# of ~1; the test only needs the files.
#
# Run: qemu-aarch64-static -L ROOTFS ROOTFS/usr/bin/python3 — user-mode emulation, no binfmt_misc,
# no chroot, no root. -L only redirects absolute paths that exist in ROOTFS: it is not
# isolation, so HOME/TMPDIR point into a scratch dir and nothing writes bytecode.
#
# Cache: ${XDG_CACHE_HOME:-$HOME/.cache}/retrofit-agent/arm64-<hash>, the hash covering this
# script and the three files it reads, so a changed recipe builds a new root filesystem (and
# the stale ones are removed). CI runs on the same machine reuse it.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
# shellcheck source=runtime.env
. "$HERE/runtime.env"
CACHE="${ARM64_ROOTFS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/retrofit-agent}"
KEY="$(cat "$HERE/rootfs.sh" "$HERE/packages.txt" "$HERE/runtime-requirements.txt" "$HERE/runtime.env" \
       | sha256sum | cut -c1-12)"
ROOTFS="$CACHE/arm64-$KEY"
QEMU="${QEMU:-qemu-aarch64-static}"
# Not the default "max" CPU model: with it onnxruntime picks SVE kernels that QEMU runs ~20x slower.
QEMU_CPU="${QEMU_CPU:-neoverse-n1}"

packages() { sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "$HERE/packages.txt" | tr -d '[:space:]' | tr '\n' ' '; }
package_csv() { sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "$HERE/packages.txt" | paste -sd, -; }

mirror() {
  [ -n "${MIRROR:-}" ] && { echo "$MIRROR"; return; }
  awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null | grep . \
    || awk '/^deb /{print $2; exit}' /etc/apt/sources.list 2>/dev/null | grep . \
    || echo http://deb.debian.org/debian
}

# onnxruntime's cpuinfo library segfaults on import when it parses the host's x86
# /proc/cpuinfo; the guest reads ROOTFS/proc/cpuinfo instead (qemu -L path redirection).
fake_cpuinfo() {
  local i
  for ((i = 0; i < $(nproc); i++)); do
    printf 'processor\t: %d\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x3\nCPU part\t: 0xd0c\nCPU revision\t: 1\n\n' "$i"
  done
}

# pip does not fall back from one manylinux level to older ones by itself: list glibc 2.17 up
# to bookworm's 2.36.
platform_flags() {
  local v
  for v in $(seq 17 36); do printf -- '--platform manylinux_2_%s_aarch64 ' "$v"; done
  printf -- '--platform manylinux2014_aarch64 --python-version %s --implementation cp --abi cp%s' \
    "$PYTHON_VERSION" "${PYTHON_VERSION/./}"
}

build() {
  if [ -f "$ROOTFS/.complete" ]; then echo "cached: $ROOTFS"; return; fi
  [ "$(id -u)" = 0 ] || { echo "rootfs.sh build: debootstrap needs root (sudo $0 build)" >&2; exit 1; }
  local tmp="$ROOTFS.partial" start=$SECONDS
  rm -rf "$tmp"; mkdir -p "$CACHE"
  debootstrap --arch=arm64 --foreign --variant=minbase --include="$(package_csv)" \
    "$SUITE" "$tmp" "$(mirror)" >"$CACHE/debootstrap.log" 2>&1 \
    || { tail -20 "$CACHE/debootstrap.log" >&2; exit 1; }
  # --keep-directory-symlink keeps merged /usr (/lib -> usr/lib) intact.
  local deb
  for deb in "$tmp"/var/cache/apt/archives/*.deb; do
    dpkg-deb --fsys-tarfile "$deb" | tar -x --keep-directory-symlink -C "$tmp"
  done
  rm -rf "$tmp"/var/cache/apt/archives/*.deb "$tmp/debootstrap"
  # In a container debootstrap makes ROOTFS/proc a symlink to the host's /proc.
  if [ -L "$tmp/proc" ]; then rm "$tmp/proc"; fi
  mkdir -p "$tmp/proc"
  fake_cpuinfo >"$tmp/proc/cpuinfo"
  cp -n "$tmp/usr/share/base-passwd/passwd.master" "$tmp/etc/passwd"
  cp -n "$tmp/usr/share/base-passwd/group.master" "$tmp/etc/group"
  # shellcheck disable=SC2046
  python3 -m pip install -q --disable-pip-version-check --no-cache-dir --no-warn-conflicts \
    --no-deps --only-binary=:all: $(platform_flags) --target "$tmp$SITE" \
    -r "$HERE/runtime-requirements.txt" 2>&1 | { grep -v "^WARNING: Location" || true; }
  # pyc files are architecture-independent: compile natively, never under emulation with -L.
  python3 -m compileall -q -j0 "$tmp/usr/lib/python$PYTHON_VERSION" "$tmp$SITE" >/dev/null 2>&1 || true
  echo "$KEY" >"$tmp/.recipe-key"
  touch "$tmp/.complete"
  mv "$tmp" "$ROOTFS"
  # Older recipes' root filesystems are dead weight (each ~400 MB).
  find "$CACHE" -maxdepth 1 -name 'arm64-*' ! -name "arm64-$KEY" -exec rm -rf {} +
  echo "built $ROOTFS in $((SECONDS - start)) s ($(du -sh "$ROOTFS" | cut -f1))"
}

# Run the rootfs's python3 with the runtime on its path ($SITE, which -L resolves inside ROOTFS) and the repository's working tree
# after it (the test runs the code under test, not an installed copy). RETROFIT_* variables
# pass through; everything else from the caller's environment is dropped.
python_emulated() {
  [ -f "$ROOTFS/.complete" ] || { echo "no root filesystem at $ROOTFS: run '$0 build' first" >&2; exit 1; }
  local work="${ARM64_ROOTFS_WORK:-$CACHE/work}"
  mkdir -p "$work/home"
  local -a pass=()
  while IFS= read -r var; do pass+=("$var"); done < <(env | grep '^RETROFIT_' || true)
  exec env -i PATH=/usr/bin:/bin HOME="$work/home" TMPDIR="$work" LANG=C.UTF-8 \
    QEMU_CPU="$QEMU_CPU" PYTHONPATH="$SITE:$REPO" PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    "${pass[@]}" "$QEMU" -L "$ROOTFS" "$ROOTFS/usr/bin/python3" "$@"
}

case "${1:-}" in
  build) build ;;
  path) echo "$ROOTFS" ;;
  packages) packages; echo ;;
  pip-flags) platform_flags; echo ;;
  python) shift; python_emulated "$@" ;;
  *) echo "usage: $0 build|path|packages|pip-flags|python ARGS..." >&2; exit 2 ;;
esac
