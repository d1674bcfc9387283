"""Machine stamp: which CPU, instruction sets, memory and library versions produced a number.

A latency without its machine cannot be checked or compared: ONNX Runtime and PyTorch pick
different kernels for AVX2, AVX-512 VNNI or AMX on x86 and for dotprod, i8mm or SVE on ARM,
and a version bump can move a number more than an optimisation does. Every probe is
best-effort and falls back to None, because a stamp that crashes a benchmark on an odd
container or board would cost more than a missing field.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from .exporters.formats import FORMATS
from .runtimes import openvino

T = TypeVar("T")

# Every format's own distributions come from the format table; OpenVINO runs the ONNX
# files, so it is no format's and is named here.
PACKAGES = tuple(
    dict.fromkeys(
        [
            "torch",
            "onnx",
            "onnxruntime",
            "onnxslim",
            "numpy",
            *(d for f in FORMATS.values() for d in (*f.dists, f.runtime_dist)),
            openvino.DIST,
            "mobilevit_deploy",
        ]
    )
)
# Versions in the one-line summary: the frameworks whose kernels actually ran.
_LINE_PACKAGES = (
    "torch",
    *dict.fromkeys(f.runtime_dist for f in FORMATS.values()),
    openvino.DIST,
)

# Raw flag spelling -> reported name. Families collapse ("vnni", "amx", "neon") because the
# kernel a runtime dispatches to depends on the family, while the spellings differ by kernel
# version and architecture.
_ISA_NAMES = {
    "avx": "avx",
    "avx1_0": "avx",
    "avx2": "avx2",
    "avx2_0": "avx2",
    "fma": "fma",
    "avx512f": "avx512f",
    "avx512_vnni": "vnni",
    "avx512vnni": "vnni",
    "avx_vnni": "vnni",
    "amx_tile": "amx",
    "amx_bf16": "amx",
    "amx_int8": "amx",
    "neon": "neon",
    "asimd": "neon",
    "advsimd": "neon",
    "sve": "sve",
    "i8mm": "i8mm",
    "dotprod": "dotprod",
    "asimddp": "dotprod",
    "bf16": "bf16",
    "avx512_bf16": "bf16",
    # ARM FP16 arithmetic (ARMv8.2-A): /proc/cpuinfo's fphp and asimdhp, macOS FEAT_FP16.
    "fphp": "fp16",
    "asimdhp": "fp16",
    "fp16": "fp16",
}

# What a feature means for the reduced-precision candidates. fp16 arithmetic is what
# changes a file's numbers, not only its speed: onnxruntime and XNNPACK then compute fp16
# files in fp16 (docs/arm.md), where x86 and ARMv8.0 convert to fp32 first.
_PRECISION_NOTES = {
    "fp16": "fp16: computed in fp16 (faster; numbers differ from x86, verify on this CPU)",
    "dotprod": "int8: dot-product instructions (SDOT), int8 kernels well ahead of fp32",
    "i8mm": "int8: int8 matrix multiply (SMMLA), faster still than dot product",
    "vnni": "int8: VNNI, int8 kernels well ahead of fp32",
    "amx": "int8/bf16: AMX tiles",
    "bf16": "bf16: native bf16 (OpenVINO's bf16 hint computes in it)",
    "sve": "SVE vectors where the runtime has kernels for them",
}
_WITHOUT = {
    "arm": {
        "fp16": "fp16: no FP16 arithmetic; fp16 files compute in fp32 (half the size only)",
        "dotprod": "int8: no dot product; int8 kernels gain little over fp32",
    },
    "x86": {
        "vnni": "int8: no VNNI; int8 kernels gain little over fp32",
        "bf16": "bf16: no native bf16; OpenVINO's bf16 hint would compute fp32",
    },
}


def _safe(probe: Callable[[], T], default: T | None = None) -> T | None:
    try:
        return probe()
    except Exception:
        return default


def _read_text(path: str) -> str | None:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return None


def _run(cmd: list[str]) -> str | None:
    """Output of a short probe command, or None; LC_ALL=C keeps lscpu labels in English."""
    try:
        done = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=3,
            check=False,
            env={**os.environ, "LC_ALL": "C"},
        )
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except Exception:
        return None


def normalize_isa(flags: Iterable[str]) -> list[str]:
    """Map raw CPU flags to the sorted reported names; unrelated flags are ignored."""
    return sorted({_ISA_NAMES[f.lower()] for f in flags if f.lower() in _ISA_NAMES})


def parse_cpuinfo(text: str) -> dict[str, Any]:
    """Model, physical core count and ISA from /proc/cpuinfo text (x86 or ARM layout).

    Takes text rather than reading the file so fixed samples can test it. The ISA is what
    every core has: on big.LITTLE parts a thread may land on any core.
    """
    model = hardware = part = None
    per_cpu_flags: list[set[str]] = []
    cores: set[tuple[str, str]] = set()
    package = "0"
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip().lower(), value.strip()
        if key == "processor":
            package = "0"
        elif key == "model name" and model is None:
            model = value
        elif key == "hardware" and hardware is None:
            hardware = value
        elif key == "cpu part" and part is None:
            part = value
        elif key in ("flags", "features"):
            per_cpu_flags.append(set(value.split()))
        elif key == "physical id":
            package = value
        elif key == "core id":
            cores.add((package, value))
    common = set.intersection(*per_cpu_flags) if per_cpu_flags else set()
    return {
        "model_name": model or None,
        "hardware": hardware or None,
        "cpu_part": part or None,
        "physical_cores": len(cores) or None,
        "isa": normalize_isa(common),
    }


def precision_notes(isa: Iterable[str], arch: str | None) -> list[str]:
    """What this CPU's features (normalize_isa's names) mean for the fp16, int8 and bf16
    candidates: the ones it has, then those of its architecture it lacks."""
    have = set(isa)
    family = "arm" if arch in ("aarch64", "arm64") else "x86" if arch in ("x86_64", "AMD64") else ""
    notes = [note for name, note in _PRECISION_NOTES.items() if name in have]
    return notes + [note for name, note in _WITHOUT.get(family, {}).items() if name not in have]


def parse_sysctl_isa(text: str) -> list[str]:
    """ISA from macOS `sysctl hw.optional` output ("hw.optional.arm.FEAT_DotProd: 1")."""
    flags = []
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and value.strip() == "1":
            flags.append(key.strip().rsplit(".", 1)[-1].lower().removeprefix("feat_"))
    return normalize_isa(flags)


def parse_meminfo(text: str) -> float | None:
    """MemTotal from /proc/meminfo text, in GiB rounded to 0.1 (the kernel's kB are KiB)."""
    for line in text.splitlines():
        if line.startswith("MemTotal:"):
            return round(int(line.split()[1]) / 1024**2, 1)
    return None


def _lscpu_model() -> str | None:
    out = _run(["lscpu"]) or ""
    names: list[str] = []
    for line in out.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "Model name" and value.strip() not in names:
            names.append(value.strip())  # big.LITTLE lists one name per cluster
    return " + ".join(names) or None


def _cpu_model(info: Mapping[str, Any], darwin: bool) -> str | None:
    if darwin and (brand := _run(["sysctl", "-n", "machdep.cpu.brand_string"])):
        return brand
    if info.get("model_name"):
        return info["model_name"]
    if info.get("hardware"):
        return info["hardware"]
    if not darwin and (name := _lscpu_model()):
        return name
    if info.get("cpu_part"):
        return f"ARM CPU part {info['cpu_part']}"
    return platform.processor() or None


def _sysctl_int(name: str) -> int | None:
    out = _run(["sysctl", "-n", name])
    return int(out) if out else None


def machine_stamp() -> dict[str, Any]:
    """Describe this machine and its library versions as a JSON-serialisable dict."""
    darwin = _safe(platform.system) == "Darwin"
    cpuinfo = _read_text("/proc/cpuinfo")
    info: dict[str, Any] = _safe(lambda: parse_cpuinfo(cpuinfo or ""), {}) or {}
    isa = info.get("isa") or []
    physical = info.get("physical_cores")
    meminfo = _read_text("/proc/meminfo")
    memory = _safe(lambda: parse_meminfo(meminfo)) if meminfo else None
    if darwin:
        isa = isa or _safe(lambda: parse_sysctl_isa(_run(["sysctl", "hw.optional"]) or ""), [])
        physical = physical or _safe(lambda: _sysctl_int("hw.physicalcpu"))
        if memory is None:
            memsize = _safe(lambda: _sysctl_int("hw.memsize"))
            memory = round(memsize / 1024**3, 1) if memsize else None
    return {
        "cpu_model": _safe(lambda: _cpu_model(info, darwin)),
        "arch": _safe(platform.machine) or None,
        "logical_cores": _safe(os.cpu_count),
        "physical_cores": physical,
        "isa": list(isa or []),
        "memory_gib": memory,
        "os": _safe(platform.platform),
        "python": _safe(platform.python_version),
        "versions": {name: _version(name) for name in PACKAGES},
    }


def stamp_line(stamp: Mapping[str, Any]) -> str:
    """One human line for a report header; tolerates stamps with missing fields."""
    details = [str(stamp.get("arch") or "unknown arch")]
    logical, physical = stamp.get("logical_cores"), stamp.get("physical_cores")
    if physical and logical and physical != logical:
        details.append(f"{physical} cores/{logical} threads")
    elif logical or physical:
        details.append(f"{logical or physical} cores")
    if stamp.get("isa"):
        details.append(" ".join(str(name).upper() for name in stamp["isa"]))
    parts = [f"{stamp.get('cpu_model') or 'unknown CPU'} ({', '.join(details)})"]
    if stamp.get("memory_gib") is not None:
        parts.append(f"{stamp['memory_gib']:.1f} GiB")
    if stamp.get("os"):
        parts.append(str(stamp["os"]))
    versions = stamp.get("versions") or {}
    parts += [f"{name} {versions[name]}" for name in _LINE_PACKAGES if versions.get(name)]
    return ", ".join(parts)
