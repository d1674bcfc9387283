"""What does not install on ARM, and why: what `mvd doctor` says on such a machine.

Measured by pip's resolver with each platform's wheel tags and environment markers,
on the pinned stack (constraints.txt; tests/test_arm_installs.py asks it again). A
format whose converter is missing can still run its files there: TFLite files export on
x86-64 Linux or macOS and run in ai-edge-litert on aarch64 Linux.
"""

from __future__ import annotations

import platform

# extra -> why it has no wheels there. Everything else, and the base install, resolves.
ARM_INSTALLS: dict[str, dict[str, str]] = {
    "linux-aarch64": {
        "tflite": "litert-converter (litert-torch's converter) has no aarch64 Linux wheel; "
        "export TFLite on x86-64 Linux or macOS, run it here with ai-edge-litert",
        "executorch": "executorch 1.4.1 requires coremltools 9.0, which has no aarch64 Linux "
        "wheel; pip install --no-deps executorch==1.4.1 torch==2.13.0 runs .pte files",
        "coreml": "coremltools 9.0 has no aarch64 Linux wheel",
    },
    "macos-arm64": {},
}


def platform_key(system: str | None = None, machine: str | None = None) -> str | None:
    """This machine's key in ARM_INSTALLS, or None off ARM."""
    system = system or platform.system()
    machine = (machine or platform.machine()).lower()
    if system == "Linux" and machine in ("aarch64", "arm64"):
        return "linux-aarch64"
    if system == "Darwin" and machine == "arm64":
        return "macos-arm64"
    return None


def missing_here(extra: str | None) -> str | None:
    """Why `extra` cannot be installed on this machine, or None if it can."""
    key = platform_key()
    return ARM_INSTALLS.get(key, {}).get(extra or "") if key else None
