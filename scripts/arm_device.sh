#!/usr/bin/env bash
# Builds the emulated aarch64 device that `--device arm64` runs on: a Debian arm64 root
# run by qemu-user through binfmt_misc, holding numpy and the runtimes pinned in
# constraints.txt. Idempotent: each step is skipped once done, and the binfmt_misc
# registration (lost at reboot) is checked every time. /proc and the fake /sys cpu tree
# are mounted per session by mvd (mobilevit_deploy/device/arm64.py), never left mounted
# here, so deleting the folder is always safe. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE_DIR=${MVD_ARM_DEVICE_DIR:-.arm-device}
ROOT="$DEVICE_DIR/root"
SUITE=bookworm  # Python 3.11, which the pinned aarch64 wheels are built for
# What the device runs, at the versions constraints.txt pins (never torch, never mvd).
DEVICE_PACKAGES=(numpy onnxruntime ai-edge-litert)

if [ "$(id -u)" != 0 ]; then
  echo "make arm-device needs root (debootstrap, binfmt_misc, chroot)" >&2
  exit 3
fi

need=()
command -v qemu-aarch64-static >/dev/null || need+=(qemu-user-static)
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v update-binfmts >/dev/null || need+=(binfmt-support)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}"
fi

mountpoint -q /proc/sys/fs/binfmt_misc \
  || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || update-binfmts --enable qemu-aarch64

mkdir -p "$DEVICE_DIR"
if [ ! -e "$DEVICE_DIR/.debootstrapped" ]; then
  rm -rf "$ROOT"
  debootstrap --arch=arm64 --variant=minbase \
    --include=python3,python3-venv,python3-pip,ca-certificates "$SUITE" "$ROOT" \
    http://deb.debian.org/debian
  touch "$DEVICE_DIR/.debootstrapped"
fi

# Runs a command in the root with /proc, in a mount namespace of its own.
in_root() {
  unshare --mount --propagation private \
    sh -c 'mount -t proc proc "$0/proc" && exec chroot "$0" "$@"' "$ROOT" "$@"
}

stamp="${DEVICE_PACKAGES[*]} $(sha256sum <constraints.txt)"
if [ "$(cat "$DEVICE_DIR/.packages" 2>/dev/null)" != "$stamp" ]; then
  # pip inside the root reaches PyPI through the host's resolver and CA bundle.
  cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf"
  cp -L /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/ca-certificates.crt"
  cp constraints.txt "$ROOT/tmp/constraints.txt"
  [ -x "$ROOT/opt/venv/bin/python3" ] || in_root python3 -m venv /opt/venv
  in_root env -u PIP_FIND_LINKS /opt/venv/bin/pip install -q --disable-pip-version-check \
    --only-binary=:all: -c /tmp/constraints.txt "${DEVICE_PACKAGES[@]}"
  echo "$stamp" >"$DEVICE_DIR/.packages"
fi
QEMU_CPU=cortex-a76 in_root /opt/venv/bin/python3 -c \
  'import platform, numpy, onnxruntime, ai_edge_litert; print("arm64 device ready:", platform.machine())' \
  2> >(grep -v -i cpuinfo >&2)
