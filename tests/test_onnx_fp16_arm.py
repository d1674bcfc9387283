"""fp16 ONNX files keep in fp32 the grouped Convs that onnxruntime's fp16 kernels
compute wrong on ARMv8.2 with FP16 arithmetic (measured on the emulated device in
tests/test_arm_device.py); plain depthwise and dense Convs stay fp16."""

from __future__ import annotations

import onnx
import torch
from torch import nn

from mobilevit_deploy.exporters.onnx_precision import arm_unsafe_convs, to_fp16


class Convs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Conv2d(8, 8, 1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.two_per_group = nn.Conv2d(8, 16, 3, padding=1, groups=8)  # FastViT's downsampler
        self.grouped = nn.Conv2d(16, 16, 1, groups=4)  # EfficientViT's aggregation

    def forward(self, x):
        return self.grouped(self.two_per_group(self.depthwise(self.dense(x))))


def grouped_model(path) -> onnx.ModelProto:
    torch.onnx.export(Convs().eval(), torch.randn(1, 8, 8, 8), path, opset_version=17, dynamo=False)
    return onnx.load(path)


def test_only_grouped_convs_that_are_not_depthwise_are_unsafe(tmp_path):
    model = grouped_model(tmp_path / "convs.onnx")
    assert sorted(arm_unsafe_convs(model)) == ["/grouped/Conv", "/two_per_group/Conv"]


def test_fp16_runs_the_unsafe_convs_in_fp32_from_fp16_weights(tmp_path):
    half = to_fp16(grouped_model(tmp_path / "convs.onnx"))
    stored = {t.name: t.data_type for t in half.graph.initializer if len(t.dims) == 4}
    assert set(stored.values()) == {onnx.TensorProto.FLOAT16}, "the file stays fp16's size"
    cast_to = {n.output[0]: n.attribute[0].i for n in half.graph.node if n.op_type == "Cast"}
    weight = {n.name: n.input[1] for n in half.graph.node if n.op_type == "Conv"}
    computes_in = {name: cast_to.get(w, stored.get(w)) for name, w in weight.items()}
    assert computes_in == {
        "/dense/Conv": onnx.TensorProto.FLOAT16,
        "/depthwise/Conv": onnx.TensorProto.FLOAT16,
        "/two_per_group/Conv": onnx.TensorProto.FLOAT,
        "/grouped/Conv": onnx.TensorProto.FLOAT,
    }
