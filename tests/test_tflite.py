"""TFLite: every precision runs in LiteRT and stays close to the fused model, channels-last
is the same function, segmenters swap to bilinear by themselves, and what mobile
delegates lack is reported by name. Under stress weights throughout.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import bare_module_job, capped_logits_case, stressed, test_inputs
from torch import nn
from typer.testing import CliRunner

from mobilevit_deploy import api
from mobilevit_deploy.cli import app
from mobilevit_deploy.exporters import tflite
from mobilevit_deploy.exporters.tflite import ConversionFailed, export_tflite
from mobilevit_deploy.metrics import compare
from mobilevit_deploy.reparam import reparameterize
from mobilevit_deploy.runtimes.litert import LiteRTRunner, read_metadata

NAME, SIZE = "fastvit_t8", 64


@pytest.fixture(scope="module")
def source():
    model = stressed(NAME, SIZE)
    x = test_inputs(NAME, SIZE, count=4)
    with torch.no_grad():
        fused = reparameterize(model, image_size=(SIZE, SIZE))(torch.from_numpy(x)).numpy()
    return model, x, fused.astype(np.float64)


def _export(source, tmp_path, **kwargs):
    out = tmp_path / f"m.{kwargs.get('precision', 'fp32')}.tflite"
    artifact = api.export(NAME, "tflite", model=source[0], output=out, image_size=SIZE, **kwargs)
    runner = LiteRTRunner(artifact.path)
    got = np.concatenate([runner(source[1][i : i + 1]) for i in range(len(source[1]))])
    return artifact, compare(source[2], got, "classification"), got


@pytest.fixture(scope="module")
def fp32(source, tmp_path_factory):
    return _export(source, tmp_path_factory.mktemp("fp32"))


def test_fp32_is_the_fused_model(fp32):
    artifact, metrics, _ = fp32
    assert metrics["max_rel"] < 1e-5
    sidecar = json.loads(artifact.sidecar.read_text())
    assert sidecar["format"] == "tflite" and sidecar["precision"] == "fp32"
    assert {"CONV_2D", "FULLY_CONNECTED"} <= set(sidecar["tflite_ops"])
    assert sidecar["delegate_report"] == []  # rank <= 4 everywhere, no gathers
    assert sorted(p.name for p in artifact.path.parent.iterdir()) == [
        "m.fp32.tflite",
        "m.fp32.tflite.json",
    ]


def test_the_runner_prints_nothing(fp32):
    """The C++ XNNPACK banner ("INFO: Created TensorFlow Lite XNNPACK delegate") used to
    land in the middle of `mvd verify`'s report. It is printed once per process, so a
    fresh one runs the file."""
    script = (
        "import numpy as np, sys\n"
        "from mobilevit_deploy.runtimes.litert import LiteRTRunner\n"
        "runner = LiteRTRunner(sys.argv[1])\n"
        f"runner(np.zeros((2, 3, {SIZE}, {SIZE}), np.float32))\n"  # a resize reallocates
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(fp32[0].path)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert (done.stdout, done.stderr) == ("", "")


def test_the_defaults_are_what_mediapipe_takes(fp32):
    """Channels-last, RGB in [0, 1] with the per-channel normalisation inside (MediaPipe
    applies one mean and std to all channels): test_mediapipe.py runs such files."""
    record = fp32[0].metadata
    assert record["input_details"]["shape"] == [1, SIZE, SIZE, 3]
    assert record["input_layout"] == "NHWC" and record["input_shape"] == [1, SIZE, SIZE, 3]
    assert record["output_layout"] == "NC"  # a classifier's logits stay (N, classes)
    assert record["normalize_inside"] and "inside the file" in record["input_range"]
    assert read_metadata(fp32[0].path) == record
    standard = standard_metadata(fp32[0].path)
    tensor = standard.subgraphMetadata[0].inputTensorMetadata[0]
    assert tensor.content.contentProperties.colorSpace == 1  # RGB
    options = tensor.processUnits[0].options
    assert (list(options.mean), list(options.std)) == ([0.0], [255.0])  # RGB in [0, 1]
    output = standard.subgraphMetadata[0].outputTensorMetadata[0]
    assert output.associatedFiles[0].name == b"labels.txt" and output.associatedFiles[0].type == 2


def test_nchw_without_normalisation_is_the_same_function(source, fp32, tmp_path):
    artifact, _, got = _export(source, tmp_path, nhwc=False, normalize_inside=False)
    assert artifact.metadata["input_details"]["shape"] == [1, 3, SIZE, SIZE]
    assert artifact.metadata["input_layout"] == "NCHW"
    assert not artifact.metadata["normalize_inside"]
    assert compare(fp32[2], got)["max_rel"] < 1e-5
    # The standard metadata, read with the schema MediaPipe ships, says the app
    # normalises per channel, pixels in [0, 255] (the Task Library does; MediaPipe refuses)
    tensor = standard_metadata(artifact.path).subgraphMetadata[0].inputTensorMetadata[0]
    options = tensor.processUnits[0].options
    assert options.mean == pytest.approx([255 * m for m in artifact.metadata["mean"]])
    assert options.std == pytest.approx([255 * s for s in artifact.metadata["std"]])


def standard_metadata(path):
    """The file's TFLITE_METADATA, parsed with the schema mediapipe's wheel ships."""
    from ai_edge_litert import schema_py_generated as schema
    from mediapipe.tasks.metadata import metadata_schema_py_generated as md

    model = schema.Model.GetRootAsModel(bytearray(path.read_bytes()), 0)
    entries = [model.Metadata(i) for i in range(model.MetadataLength())]
    entry = next(e for e in entries if e.Name() == b"TFLITE_METADATA")
    data = bytes(model.Buffers(entry.Buffer()).DataAsNumpy())
    assert md.ModelMetadata.ModelMetadataBufferHasIdentifier(data, 0)
    return md.ModelMetadataT.InitFromPackedBuf(data, 0)


@pytest.mark.slow
def test_fp16_halves_the_file_and_keeps_70db(source, fp32, tmp_path):
    artifact, metrics, _ = _export(source, tmp_path, precision="fp16")
    assert artifact.path.stat().st_size < 0.55 * fp32[0].path.stat().st_size
    assert metrics["psnr_db"] >= 60 and metrics["top1"] == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_int8(source, fp32, tmp_path, mode):
    artifact, metrics, _ = _export(  # all-int8: the search is test_int8_search's
        source, tmp_path, precision="int8", int8_mode=mode, calibration_images=8, int8_target=0
    )
    assert artifact.path.stat().st_size < 0.35 * fp32[0].path.stat().st_size
    assert metrics["psnr_db"] >= 15
    assert artifact.metadata["input_details"]["dtype"] == "float32"  # a drop-in for fp32
    assert artifact.metadata["int8_mode"] == mode
    if mode == "static":  # int8 inside, float at the edges
        assert {"QUANTIZE", "DEQUANTIZE"} <= set(artifact.metadata["tflite_ops"])


def test_int8_logits_are_not_capped_at_the_calibrated_range(tmp_path):
    """The op that writes the graph's output keeps that output float (its weights
    int8, its input quantized at run time), as ONNX int8 files do: an int8 output
    stops at the largest value calibration saw. Stressed LeViT-128S's top logit on
    one of verify's images (0.56, against a calibrated 0.52) lost its lead that way
    (conftest.capped_logits_case)."""
    module, calibration, x, want = capped_logits_case()
    job = bare_module_job(module, tmp_path / "c.tflite", x, "tflite")
    export_tflite(dataclasses.replace(job, precision="int8", calibration=calibration))
    got = LiteRTRunner(tmp_path / "c.tflite")(x)
    assert np.abs(got - want).max() < 0.05, got


@pytest.mark.slow
def test_a_segmenter_swaps_to_bilinear_and_matches_it(tmp_path):
    name, size = "efficientvit_seg_b0_cityscapes", 128
    model = stressed(name, size)
    artifact = api.export(
        name, "tflite", model=model, output=tmp_path / "s.tflite", image_size=size
    )
    assert artifact.metadata["upsample"] == "bilinear"
    assert artifact.metadata["output_layout"] == "NHWC"  # the map, channels-last too
    assert "RESIZE_BICUBIC" not in artifact.metadata["tflite_ops"]
    fused = reparameterize(model, image_size=(size, size))
    fused.set_upsample("bilinear")
    x = test_inputs(name, size, count=1)
    with torch.no_grad():
        want = fused(torch.from_numpy(x)).double().numpy()
    got = LiteRTRunner(artifact.path)(x)
    assert compare(want, got, "segmentation")["max_rel"] < 1e-5


class _Rank5(nn.Module):
    def forward(self, x):
        b, c, h, w = x.shape
        return x.reshape(b, c, 2, h // 2, w).sum(dim=2)


def _job(module: nn.Module, path, example: np.ndarray):
    return bare_module_job(module, path, example, "tflite")


def test_rank5_tensors_are_reported_by_name(tmp_path):
    job = _job(_Rank5(), tmp_path / "r5.tflite", np.zeros((1, 3, 8, 8), np.float32))
    meta = export_tflite(job)
    assert any("RESHAPE" in w and "rank 5" in w for w in meta.delegate_report)


def test_a_model_that_does_not_lower_is_one_error(tmp_path):
    class Sorts(nn.Module):
        def forward(self, x):
            return torch.linalg.eigvalsh(x[0, 0] @ x[0, 0].T)

    with pytest.raises(ConversionFailed, match="litert-torch could not convert"):
        export_tflite(_job(Sorts(), tmp_path / "bad.tflite", np.ones((1, 3, 4, 4), np.float32)))
    assert list(tmp_path.iterdir()) == []


def test_a_quantizer_failure_is_one_error_that_keeps_its_cause(tmp_path, monkeypatch):
    """ai-edge-quantizer's errors went out raw, their cause after a 500-character
    tensor name (EfficientViT-L3): now an export error, as the converter's are, whose
    line keeps the cause, and no file."""
    from ai_edge_quantizer.algorithms.uniform_quantize import uniform_quantize_tensor as uqt

    def fails(*_args, **_kwargs):
        raise ValueError(f"Failed for tensor: {'a/' * 300}. Error: the cause")

    monkeypatch.setattr(uqt, "uniform_quantize", fails)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 3, 8, 8)).astype(np.float32)
    job = _job(
        nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 1)), tmp_path / "q.tflite", x
    )
    calibration = rng.standard_normal((4, 3, 8, 8)).astype(np.float32)
    with pytest.raises(ConversionFailed, match=r"quantize the model: .*Error: the cause$"):
        export_tflite(dataclasses.replace(job, precision="int8", calibration=calibration))
    assert list(tmp_path.iterdir()) == []


def test_cli_export_tflite(tmp_path):
    out = tmp_path / "t8.tflite"
    result = CliRunner().invoke(
        app,
        ["export", NAME, "--format", "tflite", "--image-size", "64", "--no-nhwc", "-o", str(out)],
    )
    assert result.exit_code == 0, result.output
    assert "fp32" in result.stdout and out.is_file()
    assert json.loads((tmp_path / "t8.tflite.json").read_text())["input_layout"] == "NCHW"


def test_a_weight_above_32_mib_quantizes_per_channel():
    """ai-edge-quantizer chunks a tensor above 32 MiB and there fails to broadcast its
    per-channel scales (EfficientViT-L3's largest 1x1 convolution: its int8 export
    failed). The exporter quantizes such a weight in slices: the values per-channel
    rounding gives."""
    from ai_edge_quantizer import qtyping
    from ai_edge_quantizer.algorithms.uniform_quantize import uniform_quantize_tensor as uqt

    weight = np.random.default_rng(0).standard_normal((4097, 1, 1, 2048)).astype(np.float32)
    assert weight.nbytes > tflite._CHUNKED_BYTES
    scale = (np.abs(weight).max(axis=(1, 2, 3)) / 127).astype(np.float32)
    params = qtyping.UniformQuantParams(
        num_bits=8,
        quantized_dimension=0,
        scale=scale,
        zero_point=np.zeros(len(scale), np.int32),
        symmetric=True,
    )
    with tflite._large_weights_in_slices():
        got = uqt.uniform_quantize(weight, params)
    want = np.clip(np.round(weight / scale[:, None, None, None]), -127, 127).astype(np.int8)
    assert got.dtype == np.int8 and np.array_equal(got, want)
    assert uqt.uniform_quantize.__name__ == "uniform_quantize"  # put back on leaving
