"""Files run on the emulated ARM device (Cortex-A76: ARMv8.2-A, FP16, dot product) and
over ssh. Slow: they build the device if it is not built, and every run is emulated."""

from __future__ import annotations

import device_fixtures
import numpy as np
import onnx
import pytest
import torch
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
