"""ONNX export: equivalence in onnxruntime under stress weights, a graph free of
training-only structure, metadata, and no partial files on failure."""

import hashlib
import json
import os
import stat

import numpy as np
import onnx
import pytest
import torch
from conftest import stressed, test_inputs

from mobilevit_deploy import api
from mobilevit_deploy.errors import BadInput, VerificationFailed
from mobilevit_deploy.exporters.onnx import read_metadata
from mobilevit_deploy.runtimes.onnxruntime import OrtRunner
from mobilevit_deploy.runtimes.torch_runtime import TorchRunner


def _residual_adds_around_convs(graph: onnx.GraphProto) -> list[str]:
    """Adds of the form x + conv(x): a residual a reparameterization should have folded."""
    conv_input = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Conv"}
    return [
        n.name
        for n in graph.node
        if n.op_type == "Add"
        and any(conv_input.get(a) == b or conv_input.get(b) == a for a, b in [n.input[:2]])
    ]


@pytest.mark.parametrize("name", ["fastvit_t8", "fastvit_sa12"])
def test_export_at_256_matches_unfused_model(tmp_path, name):
    model = stressed(name, size=256)
    x = test_inputs(name, size=256, count=2)
    art = api.export(name, model=model, output=tmp_path / f"{name}.onnx")
    graph = onnx.load(str(art.path))
    onnx.checker.check_model(graph, full_check=True)
    ops = {n.op_type for n in graph.graph.node}
    assert "BatchNormalization" not in ops
    assert _residual_adds_around_convs(graph.graph) == []
    ref = TorchRunner(model, torch.float64)(x)
    out = np.concatenate([OrtRunner(art.path)(x[i : i + 1]) for i in range(len(x))])
    err = np.abs(out - ref).max() / np.abs(ref).max()
    assert err < 1e-5, f"{name}: onnxruntime differs by {err:.2e} of the output scale"


def test_unfused_export_keeps_the_residuals_that_fusion_removes(tmp_path):
    """The graph check above can fail: an unfused export still has x + conv(x)."""
    model = stressed("fastvit_sa12")
    art = api.export(
        "fastvit_sa12",
        model=model,
        output=tmp_path / "u.onnx",
        image_size=64,
        reparam=False,
        simplify=False,
    )
    assert _residual_adds_around_convs(onnx.load(str(art.path)).graph)


def test_metadata_is_embedded_and_in_a_sidecar(tmp_path):
    art = api.export("fastvit_t8", output=tmp_path / "t8.onnx", image_size=64)
    embedded = read_metadata(art.path)
    sidecar = json.loads(art.sidecar.read_text())
    assert embedded == sidecar == art.metadata
    assert sidecar["model"] == "fastvit_t8"
    assert sidecar["input_shape"] == [1, 3, 64, 64]
    assert sidecar["mean"] == [0.485, 0.456, 0.406] and sidecar["std"] == [0.229, 0.224, 0.225]
    assert sidecar["reparameterized"] is True and sidecar["precision"] == "fp32"
    assert sidecar["tool_versions"]["torch"].startswith("2.")
    assert "timestamp" not in json.dumps(sidecar)


def test_artifacts_get_the_usual_file_mode_not_mkstemps_0600(tmp_path):
    mask = os.umask(0o022)
    os.umask(mask)
    art = api.export("fastvit_t8", output=tmp_path / "m.onnx", image_size=64)
    for path in (art.path, art.sidecar):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask


def test_dynamic_batch_runs_any_batch(tmp_path):
    art = api.export("fastvit_t8", output=tmp_path / "d.onnx", image_size=64, dynamic_batch=True)
    dim = onnx.load(str(art.path)).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim.dim_param == "batch"
    assert OrtRunner(art.path)(test_inputs("fastvit_t8", count=3)).shape == (3, 1000)


def test_same_export_twice_is_byte_identical(tmp_path):
    digests = []
    for i in range(2):
        path = api.export("fastvit_t8", output=tmp_path / f"{i}.onnx", image_size=64).path
        digests.append(hashlib.sha256(path.read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def test_failed_export_leaves_no_file(tmp_path, monkeypatch):
    def broken_checker(*_args, **_kwargs):
        raise onnx.checker.ValidationError("planted failure")

    monkeypatch.setattr(onnx.checker, "check_model", broken_checker)
    with pytest.raises(onnx.checker.ValidationError):
        api.export("fastvit_t8", output=tmp_path / "x.onnx", image_size=64)
    assert list(tmp_path.iterdir()) == []


def test_a_simplifier_that_changes_the_output_is_caught(tmp_path, monkeypatch):
    import onnxslim
    from onnx import numpy_helper

    real_slim = onnxslim.slim

    def corrupting_slim(graph):
        graph = real_slim(graph)
        init = max(graph.graph.initializer, key=lambda t: np.prod(t.dims))
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.01, init.name))
        return graph

    monkeypatch.setattr(onnxslim, "slim", corrupting_slim)
    with pytest.raises(VerificationFailed, match="no-simplify"):
        api.export(
            "fastvit_t8", model=stressed("fastvit_t8"), output=tmp_path / "s.onnx", image_size=64
        )
    assert list(tmp_path.iterdir()) == []


def test_non_square_sizes_export_and_bad_sizes_are_refused(tmp_path):
    art = api.export("fastvit_t8", output=tmp_path / "r.onnx", image_size="96x160")
    assert art.metadata["input_shape"] == [1, 3, 96, 160]
    x = np.zeros((1, 3, 96, 160), np.float32)
    assert OrtRunner(art.path)(x).shape == (1, 1000)
    for bad in ("96x", "250", (64, 100), "big"):
        with pytest.raises(BadInput):
            api.export("fastvit_t8", output=tmp_path / "bad.onnx", image_size=bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.onnx", "r.onnx.json"]
