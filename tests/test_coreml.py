"""CoreML: every family converts, the package is what an app binds, and image input is exact.

coremltools cannot run a model on Linux, so these tests prove what can be proven here:
the package's spec (names, shapes, types, ops in the target's op set, metadata), the
exactness of the std fold behind `--image-input` (in float64 torch). Every family
through `mvd verify --formats coreml` is in test_matrix.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import stressed
from torch import nn
from typer.testing import CliRunner

from mobilevit_deploy import api
from mobilevit_deploy.cli import app
from mobilevit_deploy.errors import BadInput
from mobilevit_deploy.exporters.coreml import first_conv, fold_input_std
from mobilevit_deploy.exporters.formats import FORMATS
from mobilevit_deploy.reparam import reparameterize
from mobilevit_deploy.runtimes.coreml import (
    _load_spec,
    check_package,
    package_ops,
    unsupported_ops,
)
from mobilevit_deploy.zoo import get_spec

pytestmark = pytest.mark.skipif(
    FORMATS["coreml"].runs_here(), reason="the Linux checks; macOS runs the model"
)


@pytest.fixture(scope="module")
def t8_package(tmp_path_factory):
    out = tmp_path_factory.mktemp("coreml") / "fastvit_t8.mlpackage"
    artifact = api.export("fastvit_t8", "coreml", output=out, image_size=64)
    return artifact


def test_package_spec_is_what_an_app_binds(t8_package):
    checked = check_package(t8_package.path, [(1, 1000)])
    assert checked["problems"] == []
    # An image input by default: what Vision and Xcode's preview take
    assert checked["inputs"] == [{"name": "input", "type": "image", "shape": [1, 3, 64, 64]}]
    image = _load_spec(t8_package.path).description.input[0].type.imageType
    assert (image.width, image.height) == (64, 64)
    assert "RGB pixels in [0, 255]" in t8_package.metadata["input_range"]
    assert [o["name"] for o in checked["outputs"]] == ["classLabel", "classLabel_probs"]
    assert {"conv", "softmax", "classify"} <= set(checked["ops"])
    assert checked["opset"] == "CoreML6"  # iOS16, the default target


def test_package_carries_the_metadata(t8_package):
    ct = pytest.importorskip("coremltools")
    model = ct.models.MLModel(str(t8_package.path), skip_model_load=True)
    meta = model.user_defined_metadata
    assert meta["mvd.model"] == "fastvit_t8" and meta["mvd.precision"] == "fp16"
    assert json.loads(meta["mvd.mean"]) == list(get_spec("fastvit_t8").preprocessing.mean)
    assert "com.github.apple.coremltools.conversion_date" not in meta  # no timestamp
    assert model.author == "mobilevit_deploy" and model.version
    assert "fastvit_t8" in model.short_description
    sidecar = json.loads(t8_package.sidecar.read_text())
    assert sidecar["min_target"] == "iOS16" and sidecar["format"] == "coreml"


def test_overwriting_a_package_replaces_it_and_leaves_nothing_else(t8_package, tmp_path):
    out = tmp_path / "m.mlpackage"
    api.export("fastvit_t8", "coreml", output=out, image_size=64, precision="fp32")
    first = {p.name for p in out.rglob("*")}
    api.export("fastvit_t8", "coreml", output=out, image_size=64)
    assert {p.name for p in out.rglob("*")} == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.mlpackage", "m.mlpackage.json"]
    assert check_package(out, [(1, 1000)])["problems"] == []


def test_a_directory_that_is_not_a_package_is_refused(tmp_path):
    target = tmp_path / "photos.mlpackage"
    target.mkdir()
    (target / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(BadInput, match="is a directory"):
        api.export("fastvit_t8", "coreml", output=target, image_size=64)
    assert (target / "holiday.jpg").exists()


@pytest.mark.parametrize(
    ("name", "size"), [("fastvit_t8", 64), ("levit_128s", 224), ("efficientvit_b0", 64)]
)
def test_std_fold_into_the_first_conv_is_exact(name, size):
    """What --image-input builds: pixels/255 - mean into a model whose first conv took
    the 1/std. Equal to the original on (x - mean)/std, in float64, to rounding."""
    model = reparameterize(stressed(name, size), image_size=(size, size)).double()
    spec = get_spec(name)
    mean = torch.tensor(spec.preprocessing.mean, dtype=torch.float64).reshape(1, 3, 1, 1)
    std = torch.tensor(spec.preprocessing.std, dtype=torch.float64).reshape(1, 3, 1, 1)
    pixels = torch.rand(
        2, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    folded = fold_input_std(model, (pixels - mean), spec.preprocessing.std)
    with torch.no_grad():
        want = model((pixels - mean) / std)
        got = folded(pixels - mean)
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-12
    assert not torch.equal(
        first_conv(folded, pixels - mean).weight, first_conv(model, pixels - mean).weight
    )


def test_a_tensor_input_on_request(tmp_path):
    out = tmp_path / "tensor.mlpackage"
    api.export("fastvit_t8", "coreml", output=out, image_size=64, image_input=False)
    checked = check_package(out, [(1, 1000)])
    assert checked["inputs"] == [{"name": "input", "type": "tensor", "shape": [1, 3, 64, 64]}]
    record = json.loads((tmp_path / "tensor.mlpackage.json").read_text())
    assert record["input_range"] == "RGB in [0, 1], then (x - mean) / std"
    assert record["input_type"] == "tensor"


def test_a_model_without_a_conv_first_gets_1_over_std_multiplied_in():
    """The image input is the default, so a model that cannot take 1/std into its first
    layer still gets one: the scale as its first op."""

    class NormFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.BatchNorm2d(3)
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(self.norm(x))

    model, std = NormFirst().eval(), (0.2, 0.5, 0.25)
    x = torch.rand(1, 3, 8, 8)
    assert first_conv(model, x) is None
    with torch.no_grad():
        want = model(x / torch.tensor(std).reshape(1, 3, 1, 1))
        got = fold_input_std(model, x, std)(x)
    assert (got - want).abs().max().item() < 1e-6


def test_labels_file(tmp_path):
    good = tmp_path / "labels.txt"
    good.write_text("".join(f"class {i}\n" for i in range(1000)))
    short = tmp_path / "short.txt"
    short.write_text("cat\ndog\n")
    with pytest.raises(BadInput, match="--labels names 2 classes, but the model's head has 1000"):
        api.export("fastvit_t8", "coreml", output=tmp_path / "x.mlpackage", labels=short)
    out = tmp_path / "named.mlpackage"
    artifact = api.export("fastvit_t8", "coreml", output=out, image_size=64, labels=good)
    assert artifact.metadata["class_labels"][999] == "class 999"
    assert check_package(out, [(1, 1000)])["problems"] == []
    assert not (tmp_path / "x.mlpackage").exists()


@pytest.mark.slow
@pytest.mark.parametrize("compress", ["int8", "palettize8"])
def test_weight_compression_shrinks_the_package(t8_package, tmp_path, compress):
    def size(path):
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())

    out = tmp_path / f"{compress}.mlpackage"
    api.export("fastvit_t8", "coreml", output=out, image_size=64, compress=compress)
    assert size(out) < 0.65 * size(t8_package.path)
    _, ops = package_ops(_load_spec(out))
    assert ops & {
        "constexpr_affine_dequantize",
        "constexpr_lut_to_dense",
        "constexpr_blockwise_shift_scale",
    }
    assert check_package(out, [(1, 1000)])["problems"] == []


def test_ops_newer_than_the_target_are_named():
    assert unsupported_ops({"conv", "softmax"}, "iOS16") == []
    assert unsupported_ops({"conv", "scaled_dot_product_attention"}, "iOS16") == [
        "scaled_dot_product_attention"
    ]
    assert unsupported_ops({"scaled_dot_product_attention"}, "iOS18") == []
    assert unsupported_ops({"no_such_op"}, "iOS18") == ["no_such_op"]


def test_cli_export_coreml(tmp_path):
    out = tmp_path / "t8.mlpackage"
    result = CliRunner().invoke(
        app, ["export", "fastvit_t8", "--format", "coreml", "--image-size", "64", "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "fp16" in result.stdout and "t8.mlpackage.json" in result.stdout
    assert check_package(out, [(1, 1000)])["problems"] == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--format", "coreml", "--nhwc"], "--nhwc applies to --format tflite, not coreml"),
        (["--format", "onnx", "--image-input"], "--image-input applies to --format coreml"),
        (["--format", "coreml", "--min-target", "iOS9"], "choose from iOS15"),
        (["--format", "coreml", "--compress", "zip"], "palettize8, int8"),
        (["--format", "coreml", "--precision", "int8"], "fp16, fp32, not int8"),
        (["--format", "coreml", "--upsample", "bicubic"], "coreml has no bicubic resize"),
        (["--format", "tflite", "--upsample", "bicubic"], "tflite has no bicubic resize"),
    ],
)
def test_cli_option_mistakes_are_one_line(tmp_path, args, message):
    result = CliRunner().invoke(
        app, ["export", "fastvit_t8", "--image-size", "64", "-o", str(tmp_path / "m.x"), *args]
    )
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.output


def test_segmenter_package_outputs_the_class_map(tmp_path):
    out = tmp_path / "seg.mlpackage"
    artifact = api.export("efficientvit_seg_b0_cityscapes", "coreml", output=out, image_size=128)
    assert artifact.metadata["upsample"] == "bilinear"  # CoreML has no bicubic resize
    checked = check_package(out, [(1, 19, 16, 16)])
    assert checked["problems"] == []
    assert checked["outputs"] == [{"name": "output", "type": "tensor", "shape": [1, 19, 16, 16]}]
