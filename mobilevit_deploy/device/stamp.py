"""A device's machine stamp, from the facts its runner sends back.

The features come from the kernel's HWCAP words where the device has them: under
qemu-user /proc/cpuinfo is the host's (an x86 file on an emulated ARM core), while
HWCAP is what the emulated core offers. The core's name comes from its MIDR.
"""

from __future__ import annotations

from typing import Any

from ..machine import normalize_isa, parse_cpuinfo, precision_notes

# Arm Ltd's part numbers (MIDR_EL1 bits 15:4, implementer 0x41) of the cores in phones,
# boards and servers mvd's users ship to.
ARM_PARTS = {
    0xD03: "Cortex-A53",
    0xD04: "Cortex-A35",
    0xD05: "Cortex-A55",
    0xD07: "Cortex-A57",
    0xD08: "Cortex-A72",
    0xD09: "Cortex-A73",
    0xD0A: "Cortex-A75",
    0xD0B: "Cortex-A76",
    0xD0C: "Neoverse-N1",
    0xD0D: "Cortex-A77",
    0xD40: "Neoverse-V1",
    0xD41: "Cortex-A78",
    0xD44: "Cortex-X1",
    0xD46: "Cortex-A510",
    0xD47: "Cortex-A710",
    0xD48: "Cortex-X2",
    0xD49: "Neoverse-N2",
    0xD4D: "Cortex-A715",
    0xD4E: "Cortex-X3",
    0xD4F: "Neoverse-V2",
}
ARM_IMPLEMENTER = 0x41


def core_name(midr: str) -> str | None:
    try:
        value = int(midr, 16)
    except ValueError:
        return None
    if value >> 24 != ARM_IMPLEMENTER:
        return None
    return ARM_PARTS.get(value >> 4 & 0xFFF)


def device_stamp(facts: dict) -> dict[str, Any]:
    """The same fields as machine.machine_stamp(), plus `emulated` and `notes` (what
    the core's features mean for the fp16, int8 and bf16 candidates)."""
    arch = facts.get("machine")
    info = parse_cpuinfo(facts.get("cpuinfo") or "")
    isa = normalize_isa(facts["hwcap"]) if facts.get("hwcap") else info["isa"]
    part = info["cpu_part"]
    model = (
        core_name(facts.get("midr") or "")
        or (ARM_PARTS.get(int(part, 16)) if part and part.startswith("0x") else None)
        or info["model_name"]
        or info["hardware"]
    )
    emulated = bool(facts.get("qemu_cpu"))
    if emulated:
        model = f"{model or facts['qemu_cpu']} (emulated by qemu-user)"
    return {
        "cpu_model": model,
        "arch": arch,
        "logical_cores": facts.get("cpu_count"),
        "physical_cores": None,
        "isa": isa,
        "memory_gib": None,
        "os": facts.get("platform"),
        "python": facts.get("python"),
        "versions": facts.get("versions", {}),
        "emulated": emulated,
        "notes": precision_notes(isa, arch),
    }
