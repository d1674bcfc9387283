"""ONNX Runtime Mobile: every ONNX file's record carries onnxruntime's own verdict for
the NNAPI and CoreML EPs, and `ort=True` writes the ORT-format file, which runs in
onnxruntime and computes what the .onnx does."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
from conftest import stressed, test_inputs

from mobilevit_deploy import api
from mobilevit_deploy.errors import BadInput
from mobilevit_deploy.exporters.onnx_mobile import describe
from mobilevit_deploy.runtimes.onnxruntime import OrtRunner

NAME, SIZE = "fastvit_t8", 64


@pytest.mark.slow
def test_the_ort_file_runs_and_equals_the_onnx_run(tmp_path):
    model = stressed(NAME, SIZE)
    out = tmp_path / "ft8.onnx"
    artifact = api.export(NAME, "onnx", model=model, output=out, image_size=SIZE, ort=True)
    ort_file, config = tmp_path / "ft8.ort", tmp_path / "ft8.required_operators.config"
    assert ort_file.is_file() and config.is_file()
    assert "ai.onnx;" in config.read_text()  # the operators a reduced build needs
    assert artifact.metadata["ort_format"] == {
        "file": "ft8.ort",
        "required_operators": "ft8.required_operators.config",
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ft8.onnx",
        "ft8.onnx.json",
        "ft8.ort",
        "ft8.required_operators.config",
    ]
    x = test_inputs(NAME, SIZE, count=2)
    session = ort.InferenceSession(str(ort_file), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x[:1]})[0]
    want = OrtRunner(out)(x[:1])
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_every_onnx_export_says_what_the_mobile_eps_take(tmp_path):
    """FastViT's GELU is an Erf, which NNAPI lacks: onnxruntime splits the graph and
    recommends the CPU EP there, while CoreML's MLProgram takes the whole graph."""
    artifact = api.export(NAME, "onnx", output=tmp_path / "ft8.onnx", image_size=SIZE)
    found = artifact.metadata["ort_mobile"]
    assert set(found) == {"NNAPI", "CoreML NeuralNetwork", "CoreML MLProgram"}
    nnapi, mlprogram = found["NNAPI"], found["CoreML MLProgram"]
    assert "ai.onnx:Erf" in nnapi["unsupported_ops"]
    assert nnapi["partitions"] > 2 and nnapi["verdict"] == "NO"
    assert mlprogram["supported_nodes"] == mlprogram["nodes"] and mlprogram["verdict"] == "YES"
    notes = [n for n in artifact.notes if n.startswith("ONNX Runtime Mobile")]
    assert notes == describe(found) and "Erf" in notes[0] and "use the CPU EP" in notes[0]
    sidecar = json.loads(artifact.sidecar.read_text())
    assert sidecar["ort_mobile"] == found and not (tmp_path / "ft8.ort").exists()


@pytest.mark.slow
def test_ort_with_int8_is_refused_before_any_work(tmp_path):
    with pytest.raises(BadInput, match="--ort is not available with int8"):
        api.export(
            NAME, "onnx", output=tmp_path / "q.onnx", image_size=SIZE, precision="int8", ort=True
        )
    assert list(tmp_path.iterdir()) == []
