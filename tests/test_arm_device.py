"""Files run on the emulated ARM device (Cortex-A76: ARMv8.2-A, FP16, dot product) and
over ssh. Slow: they build the device if it is not built, and every run is emulated."""

from __future__ import annotations

import device_fixtures
import numpy as np
import onnx
import pytest
import torch
from cli_helpers import json_out
from torch import nn

from mobilevit_deploy.device import device_facts, is_emulated
from mobilevit_deploy.exporters import onnx_precision
from mobilevit_deploy.metrics import compare
from mobilevit_deploy.runtimes import open_runner

pytestmark = pytest.mark.slow
arm64_device = device_fixtures.arm64_device
ssh_device = device_fixtures.ssh_device


def test_the_device_is_an_armv82_core_with_fp16(arm64_device):
    facts = device_facts(arm64_device)
    assert facts["machine"] == "aarch64" and is_emulated(facts)
    assert {"fphp", "asimdhp", "asimddp"} <= set(facts["hwcap"])
    assert "fphp" not in device_facts("arm64:cortex-a72")["hwcap"]


def _grouped_conv_fp16(tmp_path, keep_fp32: bool) -> tuple[np.ndarray, np.ndarray, str]:
    """A depthwise conv with two outputs per group (FastViT's downsampler) in an fp16
    file, its grouped conv kept fp32 as mvd does or left fp16."""
    torch.manual_seed(0)
    net = nn.Conv2d(8, 16, 3, padding=1, groups=8).eval()
    x = torch.randn(1, 8, 8, 8)
    path = tmp_path / f"grouped_{keep_fp32}.onnx"
    torch.onnx.export(net, x, path, opset_version=17, dynamo=False)
    if keep_fp32:
        half = onnx_precision.to_fp16(onnx.load(path))
    else:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(onnx_precision, "arm_unsafe_convs", lambda _model: [])
            half = onnx_precision.to_fp16(onnx.load(path))
    onnx.save(half, path)
    with torch.no_grad():
        return x.numpy(), net(x).numpy(), str(path)


def test_fp16_grouped_convs_are_wrong_on_the_a76_unless_kept_fp32(arm64_device, tmp_path):
    x, reference, kept = _grouped_conv_fp16(tmp_path, keep_fp32=True)
    _, _, left = _grouped_conv_fp16(tmp_path, keep_fp32=False)
    psnr = {
        (name, device): compare(reference, open_runner("onnx", path, device=device)(x), "features")[
            "psnr_db"
        ]
        for name, path in (("kept", kept), ("left", left))
        for device in (arm64_device, "arm64:cortex-a72")
    }
    assert psnr["left", arm64_device] < 10, psnr  # onnxruntime's fp16 kernel on ARMv8.2
    assert psnr["left", "arm64:cortex-a72"] > 60, psnr  # ARMv8.0 computes fp16 in fp32
    assert psnr["kept", arm64_device] > 60, psnr


def test_a_file_runs_over_ssh(ssh_device, tmp_path):
    _, _, path = _grouped_conv_fp16(tmp_path, keep_fp32=True)
    x = np.ones((1, 8, 8, 8), np.float32)
    runner = open_runner("onnx", path, device=ssh_device)
    np.testing.assert_array_equal(runner(x), open_runner("onnx", path)(x))
    assert len(runner.time(x, min_time_s=0.0, min_runs=3)) >= 3


# One classifier of each family and a segmenter, small: emulated inference is slow.
ON_ARM = [
    ("fastvit_t8", "64"),
    ("efficientvit_b0", "64"),
    ("levit_128s", "64"),
    ("seaformer_tiny", "64"),
    ("sepvit_lite", "64"),
    ("efficientvit_seg_b0_cityscapes", "64x128"),
]


@pytest.mark.parametrize("name, size", ON_ARM)
def test_verify_on_the_a76(arm64_device, name, size):
    """ONNX fp32/fp16/int8 and TFLite fp32/int8, exported here, run on the emulated
    Cortex-A76 and judged here: the fp16 ONNX file holds its bound there too."""
    common = ["--image-size", size, "--num-images", "2", "--device", arm64_device, "--json", "-"]
    onnx_report = json_out(
        "verify", name, "--formats", "onnx", "--precisions", "fp32,fp16,int8", *common
    )
    tflite_report = json_out(
        "verify", name, "--formats", "tflite", "--precisions", "fp32,int8", *common
    )
    for report in (onnx_report, tflite_report):
        failed = [
            (p["candidate"], p["metrics"]["psnr_db"]) for p in report["pairs"] if not p["passed"]
        ]
        assert report["passed"], failed
        assert any("Cortex-A76 (emulated" in n for n in report["notes"])
    fp16 = next(p for p in onnx_report["pairs"] if p["candidate"] == "onnx fused (fp16)")
    assert fp16["metrics"]["psnr_db"] >= 40


def test_bench_under_emulation_times_nothing_and_says_why(arm64_device):
    report = json_out(
        "bench", "fastvit_t8", "--image-size", "64", "--device", arm64_device, "--json", "-"
    )
    assert report["results"] and all(r["median_ms"] is None for r in report["results"])
    assert all(r["passed"] for r in report["results"])
    assert any("emulated by qemu-user" in note for note in report["skipped"])
    assert report["fastest_passing"] is None


def test_bench_over_ssh_times_on_the_device(ssh_device):
    report = json_out(
        "bench",
        "fastvit_t8",
        "--image-size",
        "64",
        "--min-time",
        "0.1",
        "--min-runs",
        "3",
        "--device",
        ssh_device,
        "--json",
        "-",
    )
    assert all(r["median_ms"] > 0 for r in report["results"])
    assert report["fastest_passing"] and report["machine"]["device"] == ssh_device
