"""The machine stamp: parsers on fixed /proc text, and the live stamp's shape and safety."""

from __future__ import annotations

import importlib.metadata
import json
import re

import pytest
import torch

from mobilevit_deploy import machine
from mobilevit_deploy.machine import (
    PACKAGES,
    machine_stamp,
    normalize_isa,
    parse_cpuinfo,
    parse_meminfo,
    parse_sysctl_isa,
    precision_notes,
    stamp_line,
)

KEYS = {
    "cpu_model",
    "arch",
    "logical_cores",
    "physical_cores",
    "isa",
    "memory_gib",
    "os",
    "python",
    "versions",
}

_X86_FLAGS = (
    "fpu vme sse sse2 ssse3 fma cx16 sse4_1 sse4_2 avx f16c avx2 bmi2 avx512f avx512dq "
    "avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8 avx_vnni"
)
X86_CPUINFO = "\n\n".join(
    f"processor\t: {cpu}\nvendor_id\t: GenuineIntel\n"
    f"model name\t: Intel(R) Xeon(R) Platinum 8480+\nphysical id\t: {cpu // 4}\n"
    f"siblings\t: 4\ncore id\t\t: {cpu % 4 // 2}\ncpu cores\t: 2\nflags\t\t: {_X86_FLAGS}"
    for cpu in range(8)
)

_ARM_FEATURES = (
    "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt "
    "fcma lrcpc dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs "
    "sb paca pacg dcpodp sve2 sveaes svepmull svebitperm svesha3 svesm4 flagm2 frint svei8mm "
    "svebf16 i8mm bf16 dgh rng bti"
)
ARM_CPUINFO = "\n\n".join(
    f"processor\t: {cpu}\nBogoMIPS\t: 2000.00\nFeatures\t: {_ARM_FEATURES}\n"
    f"CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\n"
    f"CPU part\t: 0xd4f\nCPU revision\t: 1"
    for cpu in range(4)
)


def test_x86_cpuinfo() -> None:
    info = parse_cpuinfo(X86_CPUINFO)
    assert info["model_name"] == "Intel(R) Xeon(R) Platinum 8480+"
    assert info["isa"] == ["amx", "avx", "avx2", "avx512f", "bf16", "fma", "vnni"]
    assert info["physical_cores"] == 4  # 2 packages x 2 cores, hyperthreads counted once
    assert info["cpu_part"] is None


def test_arm_cpuinfo() -> None:
    info = parse_cpuinfo(ARM_CPUINFO)
    assert info["isa"] == ["bf16", "dotprod", "fp16", "i8mm", "neon", "sve"]
    assert info["model_name"] is None
    assert info["cpu_part"] == "0xd4f"
    assert info["physical_cores"] is None


def test_isa_is_what_every_core_has() -> None:
    little = "processor\t: 0\nFeatures\t: fp asimd asimddp\n"
    big = "processor\t: 1\nFeatures\t: fp asimd asimddp i8mm\n"
    assert parse_cpuinfo(little + "\n" + big)["isa"] == ["dotprod", "neon"]


def test_cpuinfo_without_useful_lines() -> None:
    info = parse_cpuinfo("garbage\n\nno colon here\n")
    assert info == {
        "model_name": None,
        "hardware": None,
        "cpu_part": None,
        "physical_cores": None,
        "isa": [],
    }


def test_normalize_isa_collapses_families() -> None:
    assert normalize_isa(["AVX512VNNI", "avx_vnni", "amx_int8", "sse2", "asimd", "neon"]) == [
        "amx",
        "neon",
        "vnni",
    ]


def test_sysctl_isa() -> None:
    text = (
        "hw.optional.AdvSIMD: 1\nhw.optional.arm.FEAT_DotProd: 1\n"
        "hw.optional.arm.FEAT_I8MM: 1\nhw.optional.arm.FEAT_BF16: 0\nhw.optional.floatingpoint: 1"
        "\nhw.optional.arm.FEAT_FP16: 1"
    )
    assert parse_sysctl_isa(text) == ["dotprod", "fp16", "i8mm", "neon"]


# A Cortex-A72 (Raspberry Pi 4, ARMv8.0) and a Cortex-A76 (Raspberry Pi 5, ARMv8.2).
A72_FEATURES = "fp asimd evtstrm crc32 cpuid"
A76_FEATURES = (
    "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc "
    "dcpop asimddp"
)


def test_arm_precision_notes() -> None:
    old = parse_cpuinfo(f"processor\t: 0\nFeatures\t: {A72_FEATURES}\nCPU part\t: 0xd08\n")
    assert old["isa"] == ["neon"]
    assert precision_notes(old["isa"], "aarch64") == [
        "fp16: no FP16 arithmetic; fp16 files compute in fp32 (half the size only)",
        "int8: no dot product; int8 kernels gain little over fp32",
    ]
    new = parse_cpuinfo(f"processor\t: 0\nFeatures\t: {A76_FEATURES}\nCPU part\t: 0xd0b\n")
    assert new["isa"] == ["dotprod", "fp16", "neon"]
    notes = precision_notes(new["isa"], "aarch64")
    assert notes[0].startswith("fp16: computed in fp16") and notes[1].startswith("int8: dot")
    assert len(notes) == 2


def test_x86_precision_notes() -> None:
    assert precision_notes(["avx2", "fma"], "x86_64") == [
        "int8: no VNNI; int8 kernels gain little over fp32",
        "bf16: no native bf16; OpenVINO's bf16 hint would compute fp32",
    ]
    assert not any("fp16" in n for n in precision_notes(["avx512f", "vnni", "bf16"], "x86_64"))


def test_meminfo() -> None:
    assert parse_meminfo("MemTotal:       25165824 kB\nMemFree:  1 kB\n") == 24.0
    assert parse_meminfo("MemFree: 1 kB\n") is None


def test_live_stamp_shape() -> None:
    stamp = machine_stamp()
    assert set(stamp) == KEYS
    assert json.loads(json.dumps(stamp)) == stamp
    assert set(stamp["versions"]) == set(PACKAGES)
    torch_version = stamp["versions"]["torch"]
    assert re.match(r"^\d+\.\d+", torch_version)
    assert torch_version == torch.__version__
    assert stamp["versions"]["mobilevit_deploy"] == importlib.metadata.version("mobilevit_deploy")
    assert isinstance(stamp["logical_cores"], int) and stamp["logical_cores"] >= 1
    assert stamp["isa"] == sorted(stamp["isa"])


def test_missing_package_is_none() -> None:
    assert machine._version("surely-not-an-installed-distribution") is None


def test_stamp_survives_a_machine_with_nothing_to_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> None:
        raise RuntimeError("no such probe here")

    monkeypatch.setattr(machine, "_read_text", lambda path: None)
    monkeypatch.setattr(machine, "_run", lambda cmd: None)
    monkeypatch.setattr(machine.os, "cpu_count", broken)
    monkeypatch.setattr(machine.platform, "processor", broken)
    monkeypatch.setattr(machine.platform, "platform", broken)
    stamp = machine_stamp()
    assert set(stamp) == KEYS
    assert stamp["cpu_model"] is None
    assert stamp["logical_cores"] is None
    assert stamp["physical_cores"] is None
    assert stamp["memory_gib"] is None
    assert stamp["isa"] == []
    assert stamp["os"] is None
    json.dumps(stamp)
    assert stamp_line(stamp).startswith("unknown CPU (")


def test_stamp_line() -> None:
    stamp = {
        "cpu_model": "Intel Xeon Gold",
        "arch": "x86_64",
        "logical_cores": 4,
        "physical_cores": 2,
        "isa": ["avx2", "avx512f", "fma"],
        "memory_gib": 24.0,
        "os": "Linux-6.1-x86_64",
        "python": "3.11.7",
        "versions": {"torch": "2.13.0", "onnx": "1.19", "onnxruntime": "1.31.1"},
    }
    assert stamp_line(stamp) == (
        "Intel Xeon Gold (x86_64, 2 cores/4 threads, AVX2 AVX512F FMA), 24.0 GiB, "
        "Linux-6.1-x86_64, torch 2.13.0, onnxruntime 1.31.1"
    )
    assert stamp_line({}) == "unknown CPU (unknown arch)"
