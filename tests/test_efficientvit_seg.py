"""EfficientViT segmenters: counts, exact folds, the bicubic/bilinear choice, ONNX."""

import copy

import numpy as np
import onnx
import pytest
import torch
from conftest import stressed, test_inputs

from mobilevit_deploy import api
from mobilevit_deploy.metrics import compare
from mobilevit_deploy.reparam import reparameterize, training_leftovers
from mobilevit_deploy.runtimes.onnxruntime import OrtRunner
from mobilevit_deploy.runtimes.torch_runtime import TorchRunner
from mobilevit_deploy.verify import verify
from mobilevit_deploy.zoo import get_spec, list_models

PARAMS = {  # docs/architecture.md and the official code
    "efficientvit_seg_b0_cityscapes": 706_691,
    "efficientvit_seg_b1_ade20k": 4_791_414,
    "efficientvit_seg_l2_cityscapes": 52_607_923,
}
SMALL = (128, 256)


@pytest.mark.parametrize("name", PARAMS)
def test_parameter_counts(name):
    with torch.device("meta"):
        model = get_spec(name).build()
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]


def test_the_official_zoo_is_registered_with_native_sizes():
    specs = {s.name: s for s in list_models("efficientvit") if s.task == "segmentation"}
    assert len(specs) == 11
    assert specs["efficientvit_seg_b0_cityscapes"].input_hw == (1024, 2048)
    assert specs["efficientvit_seg_l2_ade20k"].input_hw == (512, 512)
    assert specs["efficientvit_seg_b1_ade20k"].num_classes == 150


@pytest.mark.parametrize("name", ["efficientvit_seg_b0_cityscapes", "efficientvit_seg_l1_ade20k"])
def test_fold_is_exact_under_stress(name):
    model = stressed(name, 128)
    x = torch.from_numpy(test_inputs(name, 128, count=2)).double()
    m64 = copy.deepcopy(model).double()
    fused = reparameterize(m64)
    assert training_leftovers(fused) == []
    with torch.no_grad():
        ref, out = m64(x), fused(x)
    assert ref.shape == (2, get_spec(name).num_classes, 16, 16)  # stride 8, as official
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 1e-12


def test_bilinear_instead_of_bicubic_costs_a_measured_error():
    """On a stressed B0-Cityscapes at 128x256: what the swap changes in the class map."""
    name = "efficientvit_seg_b0_cityscapes"
    model = stressed(name, 128)
    x = test_inputs(name, 128, count=2)
    bicubic = TorchRunner(model, torch.float64)(x)
    model.set_upsample("bilinear")
    bilinear = TorchRunner(model, torch.float64)(x)
    model.set_upsample("bicubic")
    metrics = compare(bicubic, bilinear, "segmentation")
    assert 1e-3 < metrics["max_rel"] < 0.5, metrics
    assert metrics["pixel_agreement"] > 0.8, metrics
    with pytest.raises(ValueError, match="nearest"):
        model.set_upsample("nearest")


def test_onnx_export_matches_with_no_batchnorm_and_cubic_resize(tmp_path):
    name = "efficientvit_seg_b0_cityscapes"
    model = stressed(name, 128)
    x = test_inputs(name, 128, count=1)
    x = np.concatenate([x, x], axis=-1)  # 128x256, the native aspect
    art = api.export(name, model=model, output=tmp_path / "s.onnx", image_size=SMALL)
    graph = onnx.load(str(art.path)).graph
    ops = [n.op_type for n in graph.node]
    assert "BatchNormalization" not in ops
    modes = {
        a.s for n in graph.node if n.op_type == "Resize" for a in n.attribute if a.name == "mode"
    }
    assert modes == {b"cubic"}
    ref = TorchRunner(model, torch.float64)(x)
    out = OrtRunner(art.path)(x)
    assert np.abs(out - ref).max() / np.abs(ref).max() < 1e-5


def test_verify_passes_with_argmax_agreement():
    report = verify("efficientvit_seg_b1_ade20k", image_size=128, num_images=1)
    assert report.passed, [(p.candidate, p.metrics) for p in report.pairs]
    assert all(p.metrics["pixel_agreement"] == 1.0 for p in report.pairs)


def test_export_with_bilinear_upsampling(tmp_path):
    from typer.testing import CliRunner

    from mobilevit_deploy.cli import app

    out = tmp_path / "b0.onnx"
    args = ["export", "efficientvit_seg_b0_cityscapes", "--image-size", "128x256"]
    result = CliRunner().invoke(app, [*args, "--upsample", "bilinear", "-o", str(out)])
    assert result.exit_code == 0, result.output
    graph = onnx.load(str(out)).graph
    modes = {
        a.s for n in graph.node if n.op_type == "Resize" for a in n.attribute if a.name == "mode"
    }
    assert modes == {b"linear"}
    assert {p.key: p.value for p in onnx.load(str(out)).metadata_props}["upsample"] == "bilinear"
    refused = CliRunner().invoke(app, ["export", "fastvit_t8", "--upsample", "bilinear"])
    assert refused.exit_code == 2 and "segmenters" in refused.stderr
