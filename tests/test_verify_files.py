"""verify, bench and eval take the file a user ships: its record rebuilds the reference.

A fine-tuned checkpoint (stress weights saved to a file, so every fold matters) is
exported with non-default options, then checked as the file it is; a file from another
checkpoint, an altered copy and a foreign file each get what they deserve.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from cli_helpers import assert_user_error, mvd, ok
from conftest import stressed
from PIL import Image

from mobilevit_deploy import api
from mobilevit_deploy.images import natural_images
from mobilevit_deploy.weights import file_sha256

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SIZE = ["--image-size", "64"]
QUICK = ["--num-images", "2"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two fine-tuned FastViT-T8 checkpoints: different weights, different hashes."""
    folder = tmp_path_factory.mktemp("ckpt")
    paths = []
    for seed in (0, 1):
        path = folder / f"ft{seed}.pth"
        torch.save({"state_dict": stressed("fastvit_t8", 64, seed).state_dict()}, path)
        paths.append(path)
    return paths


def _export(tmp_path, weights, fmt, *options, name=None):
    out = tmp_path / (name or f"ft8{'.' + fmt}")
    suffix = {"onnx": ".onnx", "tflite": ".tflite", "coreml": ".mlpackage", "executorch": ".pte"}
    out = out.with_suffix(suffix[fmt])
    ok("export", "fastvit_t8", "-w", weights, *SIZE, "-f", fmt, *options, "-o", out)
    return out


def test_an_exported_file_verifies_against_its_checkpoint(tmp_path, checkpoints):
    ft, other = checkpoints
    onnx_file = _export(tmp_path, ft, "onnx", "--opset", "13")
    report = json.loads(ok("verify", onnx_file, "-w", ft, *QUICK, "--json", "-").stdout)
    assert report["passed"]
    row = next(p for p in report["pairs"] if p["file"])
    assert row["file"] == str(onnx_file) and row["precision"] == "fp32"
    assert row["metrics"]["max_rel"] < 1e-5
    assert "record" in report["facts"]["model"]
    # Another checkpoint: refused by name, both hashes in the line.
    message = assert_user_error(mvd("verify", onnx_file, "-w", other, *QUICK))
    assert file_sha256(ft) in message and file_sha256(other) in message
    # A checkpoint of another head is refused by its hash, not by a load error.
    two = tmp_path / "two.pth"
    model = stressed("fastvit_t8", 64)
    model.head.fc = torch.nn.Linear(model.head.fc.in_features, 2)
    torch.save(model.state_dict(), two)
    assert_user_error(mvd("verify", onnx_file, "-w", two, *QUICK), file_sha256(two))
    # Without the checkpoint: the record says which one to give.
    assert_user_error(mvd("verify", onnx_file, *QUICK), "--weights", ft.name)


def test_an_altered_file_fails(tmp_path, checkpoints):
    ft = checkpoints[0]
    good = _export(tmp_path, ft, "onnx")
    graph = onnx.load(str(good))
    tensor = max(graph.graph.initializer, key=lambda t: np.prod(t.dims))
    values = onnx.numpy_helper.to_array(tensor) * np.float32(1.02)
    tensor.CopyFrom(onnx.numpy_helper.from_array(values, tensor.name))
    altered = tmp_path / "altered.onnx"
    onnx.save(graph, str(altered))
    result = mvd("verify", altered, "-w", ft, *QUICK)
    assert result.exit_code == 1, result.output
    assert "verification failed" in result.stdout


def test_a_file_exported_without_weights_is_rebuilt_from_its_seed(tmp_path):
    plain = tmp_path / "t8.onnx"
    ok("export", "fastvit_t8", *SIZE, "-o", plain)
    report = json.loads(ok("verify", plain, *QUICK, "--json", "-").stdout)
    assert report["passed"] and "seeded" in report["facts"]["weights"]


def test_a_foreign_onnx_file_verifies_with_model_and_weights(tmp_path, checkpoints):
    """A plain torch.onnx.export of the unfused module: no record, named by --model."""
    ft = checkpoints[0]
    model = api.load_model("fastvit_t8", ft, image_size=64)
    foreign = tmp_path / "plain.onnx"
    example = torch.from_numpy(api.example_input(model.mvd_spec, (64, 64)))
    torch.onnx.export(model, (example,), str(foreign), dynamo=False, opset_version=17)
    assert_user_error(mvd("verify", foreign, "-w", ft, *QUICK), "--model")
    report = json.loads(
        ok("verify", foreign, "--model", "fastvit_t8", "-w", ft, *QUICK, "--json", "-").stdout
    )
    assert report["passed"]
    assert report["facts"]["model"] == "given: --model"
    assert "input shape" in report["facts"]["image size"]


def test_files_and_a_model_name_do_not_mix(tmp_path, checkpoints):
    onnx_file = _export(tmp_path, checkpoints[0], "onnx")
    assert_user_error(mvd("verify", "fastvit_t8", onnx_file), "not both")
    assert_user_error(mvd("verify", onnx_file, "--formats", "tflite"), "as they are")


def test_bench_times_the_given_files_beside_the_baseline(tmp_path, checkpoints):
    ft = checkpoints[0]
    a = _export(tmp_path, ft, "onnx", name="a")
    b = _export(tmp_path, ft, "onnx", "--precision", "fp16", name="b")
    args = ("bench", a, b, "-w", ft, "--min-time", "0", "--min-runs", "2", "--threads", "1")
    report = json.loads(ok(*args, "--runtime", "onnxruntime", "--json", "-").stdout)
    rows = {r["runtime"]: r for r in report["results"]}
    assert set(rows) == {report["baseline"], "onnxruntime, a.onnx", "onnxruntime, b.onnx"}
    assert (
        rows["onnxruntime, a.onnx"]["passed"] and rows["onnxruntime, b.onnx"]["precision"] == "fp16"
    )


def test_eval_scores_the_given_file(tmp_path, checkpoints):
    ft = checkpoints[0]
    onnx_file = _export(tmp_path, ft, "onnx")
    data = tmp_path / "data"
    for i, picture in enumerate(natural_images(6, (64, 64), 3)):
        folder = data / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(picture).save(folder / f"{i}.png")
    two_classes = tmp_path / "two.pth"
    model = stressed("fastvit_t8", 64)
    model.head.fc = torch.nn.Linear(model.head.fc.in_features, 2)
    torch.save(model.state_dict(), two_classes)
    labelled = _export(tmp_path, two_classes, "onnx", name="two")
    report = json.loads(
        ok("eval", labelled, "-w", two_classes, "--data", data, "--json", "-").stdout
    )
    assert [c["candidate"] for c in report["candidates"]] == ["torch", "two.onnx"]
    assert report["candidates"][1]["agreement"] == 1.0
    assert onnx_file.exists()


@pytest.mark.slow
def test_every_format_with_non_default_options_verifies_as_shipped(tmp_path, checkpoints):
    """The issue's proof: each format's file, made with options verify never passed to
    its own exports, checked as it is (CoreML estimated off macOS)."""
    ft = checkpoints[0]
    images = tmp_path / "calibration"
    images.mkdir()
    for i, picture in enumerate(natural_images(8, (64, 64), 11)):
        Image.fromarray(picture).save(images / f"{i}.png")
    made = [
        _export(tmp_path, ft, "tflite", "--no-nhwc", name="nchw"),
        _export(tmp_path, ft, "coreml", "--image-input", "--compress", "palettize8", name="c"),
        _export(tmp_path, ft, "executorch", name="et"),
        _export(
            tmp_path, ft, "onnx", "--precision", "int8", "--calibration-images", images, name="q"
        ),
    ]
    for path in made:
        result = mvd("verify", path, "-w", ft, *QUICK)
        assert result.exit_code == 0, f"{path}\n{result.output}"
    copy = tmp_path / "copy.tflite"
    shutil.copy(made[0], copy)
    assert_user_error(mvd("verify", copy, "-w", checkpoints[1], *QUICK), "SHA-256")


def test_an_int8_file_searched_for_zero_db_is_held_to_zero(tmp_path, checkpoints):
    """verify judged such a file at 25 dB (`target or floor`: 0 is falsy) while bench
    and the file's own note said 0; stressed FastViT-T8 at 64 keeps about 24 dB all-int8."""
    ft = checkpoints[0]
    q = _export(tmp_path, ft, "onnx", "--precision", "int8", "--int8-target", "0", name="q0")
    report = json.loads(ok("verify", q, "-w", ft, *QUICK, "--json", "-").stdout)
    row = next(p for p in report["pairs"] if p["file"])
    assert row["tolerance"] == 0.0 and row["bound"].startswith(">=0dB")
    assert row["passed"] and row["metrics"]["psnr_db"] < 25  # the floor it was wrongly held to


@pytest.mark.slow
def test_bench_times_files_of_two_formats_side_by_side(tmp_path, checkpoints):
    ft = checkpoints[0]
    a = _export(tmp_path, ft, "onnx", name="a")
    b = _export(tmp_path, ft, "tflite", name="b")
    args = ("bench", a, b, "-w", ft, "--min-time", "0", "--min-runs", "2", "--threads", "1")
    report = json.loads(ok(*args, "--runtime", "onnxruntime", "--json", "-").stdout)
    rows = {r["runtime"]: r for r in report["results"]}
    assert set(rows) == {report["baseline"], "onnxruntime, a.onnx", "litert, b.tflite"}
    assert all(r["passed"] for r in rows.values())
