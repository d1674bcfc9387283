"""The `arm64` device: the Debian arm64 root `make arm-device` builds, run by qemu-user.

`arm64` is an ARMv8.2-A core with FP16 arithmetic and dot product (Cortex-A76), as
phones since about 2018 have; `arm64:cortex-a72` (or MVD_ARM64_CPU) picks another core
qemu knows. Each session gets its own mount namespace holding /proc and a small fake
/sys cpu tree naming that core: the host's /sys makes onnxruntime's cpuinfo crash qemu,
and with no /sys XNNPACK cannot initialise. Timings here are emulation's, not the core's.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import BackendUnavailable

DEFAULT_CORE = "cortex-a76"
# MIDR_EL1 of each core qemu-user 7.2 emulates, as the kernel shows it in /sys; cpuinfo
# (onnxruntime, XNNPACK) reads it to name the microarchitecture. "max" has no part of
# its own and reports the A76's.
MIDR = {
    "cortex-a53": "0x00000000410fd034",
    "cortex-a55": "0x00000000411fd050",
    "cortex-a57": "0x00000000411fd070",
    "cortex-a72": "0x00000000410fd083",
    "cortex-a76": "0x00000000414fd0b1",
    "neoverse-n1": "0x00000000414fd0c1",
    "max": "0x00000000414fd0b1",
}
CPUS = 2  # what the fake tree lists; the emulated threads run on the host's cores
DEVICE_PYTHON = "/opt/venv/bin/python3"
# Runs inside `unshare --mount`: the mounts vanish with the session.
_LAUNCH = (
    'sys_tree=$1 root=$2 core=$3; shift 3; mount --bind "$sys_tree" "$root/sys" && '
    'mount -t proc proc "$root/proc" && QEMU_CPU=$core exec chroot "$root" "$@"'
)


def device_dir() -> Path:
    """Where `make arm-device` builds (MVD_ARM_DEVICE_DIR, else the checkout's .arm-device)."""
    configured = os.environ.get("MVD_ARM_DEVICE_DIR")
    if configured:
        return Path(configured).resolve()
    return Path(__file__).resolve().parents[2] / ".arm-device"


def is_alias(device: str) -> bool:
    return device == "arm64" or device.startswith("arm64:")


def core_of(device: str) -> str:
    core = device.partition(":")[2] or os.environ.get("MVD_ARM64_CPU") or DEFAULT_CORE
    if core not in MIDR:
        raise BackendUnavailable(
            f"device {device!r}: unknown core {core!r}; choose from {', '.join(MIDR)}"
        )
    return core


def _fake_sys(base: Path, core: str) -> Path:
    """A /sys holding only the cpu tree, naming `core`; written once per core."""
    tree = base / "sys" / core
    cpu = tree / "devices" / "system" / "cpu"
    if not (cpu / f"cpu{CPUS - 1}").is_dir():
        cpu.mkdir(parents=True, exist_ok=True)
        for name in ("possible", "present", "online"):
            (cpu / name).write_text(f"0-{CPUS - 1}\n")
        for n in range(CPUS):
            ident = cpu / f"cpu{n}" / "regs" / "identification"
            ident.mkdir(parents=True, exist_ok=True)
            (ident / "midr_el1").write_text(MIDR[core] + "\n")
    return tree


def command(device: str) -> list[str]:
    """The command that starts the emulated device's Python on the core `device` names."""
    core = core_of(device)
    base = device_dir()
    root = base / "root"
    if not (root / DEVICE_PYTHON.lstrip("/")).exists():
        raise BackendUnavailable(
            f"device {device!r} is not built: run `make arm-device` (as root) in the "
            f"mobilevit_deploy checkout, or set MVD_ARM_DEVICE_DIR to where it was built"
        )
    if os.geteuid() != 0:
        raise BackendUnavailable(
            f"device {device!r} needs root (chroot and mounts); run mvd as root"
        )
    if not Path("/proc/sys/fs/binfmt_misc/qemu-aarch64").exists():
        raise BackendUnavailable(
            f"device {device!r}: qemu-aarch64 is not registered with binfmt_misc (lost at "
            f"reboot); run `make arm-device` again"
        )
    sys_tree = _fake_sys(base, core)
    launch = ["sh", "-c", _LAUNCH, "sh", str(sys_tree), str(root), core, DEVICE_PYTHON]
    return ["unshare", "--mount", "--propagation", "private", *launch]
