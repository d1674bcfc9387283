"""The user's model from the command line (issue 13): a fine-tuned checkpoint, a hub
folder, a backbone's feature maps, and `-o` as users write it."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from cli_helpers import assert_user_error, mvd, ok, sidecar
from test_user_models import fine_tuned

from mobilevit_deploy import api
from mobilevit_deploy.exporters.onnx import read_metadata
from mobilevit_deploy.runtimes.onnxruntime import OrtRunner
from mobilevit_deploy.zoo import get_spec

SMALL = ["--image-size", "64"]


@pytest.fixture(scope="module")
def ten_classes(tmp_path_factory):
    """A FastViT-T8 fine-tuned on 10 classes, as timm's trainer saves it."""
    _, model = fine_tuned("fastvit_t8", 10)
    path = tmp_path_factory.mktemp("ckpt") / "fastvit_t8_finetuned_10cls.pth"
    torch.save({"state_dict": model.state_dict(), "epoch": 30}, path)
    return path


# --- -o as users write it -------------------------------------------------------------


def test_output_into_an_existing_directory_or_a_trailing_slash(tmp_path):
    ok("export", "fastvit_t8", *SMALL, "-o", tmp_path)
    assert (tmp_path / "fastvit_t8.onnx").is_file()
    ok("export", "fastvit_t8", *SMALL, "-o", f"{tmp_path}/new/")
    assert (tmp_path / "new" / "fastvit_t8.onnx").is_file()
    assert (tmp_path / "new" / "fastvit_t8.onnx.json").is_file()


def test_a_name_without_the_suffix_gets_it_and_is_told(tmp_path):
    result = ok("export", "fastvit_t8", *SMALL, "-o", tmp_path / "model")
    assert "added the .onnx suffix" in result.stderr
    assert (tmp_path / "model.onnx").is_file() and not (tmp_path / "model").exists()
    result = ok("export", "fastvit_t8", *SMALL, "-f", "coreml", "-o", tmp_path / "model")
    assert (tmp_path / "model.mlpackage" / "Manifest.json").is_file()
    assert "added the .mlpackage suffix" in result.stderr
    ok("export", "fastvit_t8", *SMALL, "-f", "coreml", "-o", tmp_path)  # DIR/<model>.mlpackage
    assert (tmp_path / "fastvit_t8.mlpackage" / "Manifest.json").is_file()
    # A package named with the slash a shell's completion adds is replaced, not filled.
    ok("export", "fastvit_t8", *SMALL, "-f", "coreml", "-o", f"{tmp_path}/model.mlpackage/")
    assert not (tmp_path / "model.mlpackage" / "fastvit_t8.mlpackage").exists()
    assert (tmp_path / "model.mlpackage" / "Manifest.json").is_file()


def test_another_formats_suffix_is_refused(tmp_path):
    assert_user_error(
        mvd("export", "fastvit_t8", "-o", tmp_path / "m.tflite"),
        "has the suffix of tflite files",
        "m.onnx",
    )
    assert list(tmp_path.iterdir()) == []


# --- a fine-tuned checkpoint ------------------------------------------------------------


def test_export_of_a_fine_tuned_checkpoint_reads_its_head(tmp_path, ten_classes):
    out = tmp_path / "ft.onnx"
    result = ok("export", "fastvit_t8", "--weights", ten_classes, *SMALL, "-o", out)
    assert "10 classes" in result.stdout
    assert sidecar(out)["num_classes"] == 10 and sidecar(out)["labels"] == "custom"
    assert OrtRunner(out)(api.example_input(get_spec("fastvit_t8"), (64, 64))).shape == (1, 10)
    assert_user_error(
        mvd("export", "fastvit_t8", "--weights", ten_classes, "--num-classes", "12"),
        "--num-classes says 12 classes, but the checkpoint's head has 10",
        "head.fc.weight (10, 768)",
    )


def test_info_shows_what_the_checkpoint_decided(ten_classes):
    result = ok("info", "fastvit_t8", "--weights", ten_classes)
    assert "logits of 10 classes (custom)" in result.stdout
    assert "head: 10 classes (read from the checkpoint)" in result.stdout
    data = json.loads(ok("info", "fastvit_t8", "--weights", ten_classes, "--json", "-").stdout)
    assert data["num_classes"] == 10 and data["weights_form"] == "train"
    features = json.loads(ok("info", "fastvit_t8", "--features", "--json", "-").stdout)
    assert [o["stride"] for o in features["outputs"]] == [4, 8, 16, 32]


def test_labels_go_into_the_coreml_classifier(tmp_path, ten_classes):
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"product {i}\n" for i in range(10)))
    out = tmp_path / "ft.mlpackage"
    args = ("--weights", ten_classes, *SMALL, "--labels", labels)
    ok("export", "fastvit_t8", "-f", "coreml", *args, "-o", out)
    from mobilevit_deploy.runtimes.coreml import _load_spec, check_package, classifier_labels

    assert classifier_labels(_load_spec(out)) == [f"product {i}" for i in range(10)]
    assert check_package(out, [(1, 10)])["problems"] == []
    lite = tmp_path / "ft.tflite"
    ok("export", "fastvit_t8", "-f", "tflite", *args, "-o", lite)
    from mobilevit_deploy.runtimes.litert import read_metadata

    assert read_metadata(lite)["class_labels"][9] == "product 9"
    labels.write_text("one\ntwo\n")
    assert_user_error(
        mvd("export", "fastvit_t8", "-f", "tflite", *args, "-o", tmp_path / "x"),
        "--labels names 2 classes, but the model's head has 10",
    )


def test_export_features_names_every_output(tmp_path):
    out = tmp_path / "backbone.onnx"
    result = ok("export", "efficientvit_b0", "--features", "--stages", "1,2,3", *SMALL, "-o", out)
    assert "3 feature maps" in result.stdout
    meta = read_metadata(out)
    assert meta["output_names"] == ["stage1", "stage2", "stage3"]
    assert [(o["stride"], o["channels"]) for o in meta["outputs"]] == [(8, 32), (16, 64), (32, 128)]
    shapes = [
        o.shape for o in OrtRunner(out)(api.example_input(get_spec("efficientvit_b0"), (64, 64)))
    ]
    assert shapes == [(1, 32, 8, 8), (1, 64, 4, 4), (1, 128, 2, 2)]
    assert_user_error(mvd("export", "efficientvit_b0", "--features", "--stages", "1,x"), "--stages")
    one = ok(
        "export",
        "efficientvit_b0",
        "--features",
        "--stages",
        "3",
        *SMALL,
        "-o",
        tmp_path / "one.onnx",
    )
    assert "1 feature map)" in one.stdout
    lite = tmp_path / "backbone.tflite"
    ok(
        "export",
        "efficientvit_b0",
        "--features",
        "--stages",
        "1,2,3",
        *SMALL,
        "-f",
        "tflite",
        "-o",
        lite,
    )
    from ai_edge_litert.interpreter import Interpreter

    signature = Interpreter(model_path=str(lite)).get_signature_list()["serving_default"]
    assert sorted(signature["outputs"]) == ["stage1", "stage2", "stage3"]
    from mobilevit_deploy.runtimes import litert

    assert litert.read_metadata(lite)["outputs"] == meta["outputs"]  # embedded, not only sidecar
    lite.with_name(lite.name + ".json").unlink()
    x = api.example_input(get_spec("efficientvit_b0"), (64, 64))
    assert [o.shape for o in litert.LiteRTRunner(lite)(x)] == shapes


def test_verify_of_features_compares_every_output(tmp_path):
    report, junit = tmp_path / "v.json", tmp_path / "v.xml"
    result = ok("verify", "fastvit_t8", "--features", *SMALL, "--json", report, "--junit", junit)
    assert "stage3: max_abs=" in junit.read_text()
    assert "outputs compared: stage0, stage1, stage2, stage3" in result.stdout
    assert "top-1" not in result.stdout
    data = json.loads(report.read_text())
    onnx_row = next(p for p in data["pairs"] if p["candidate"] == "onnx fused")
    assert len(onnx_row["metrics"]["outputs"]) == 4 and data["passed"]


# --- hub folders ------------------------------------------------------------------


def _hub_folder(root, name, num_classes, weights_file, config_extra=None):
    spec = dataclasses.replace(get_spec(name), num_classes=num_classes)
    _, model = fine_tuned(name, num_classes, (96, 96))
    folder = root / f"{name}-hub"
    folder.mkdir()
    if weights_file == "model.safetensors":
        from safetensors.torch import save_file

        save_file(model.state_dict(), str(folder / weights_file))
    else:
        torch.save(model.state_dict(), folder / weights_file)
    config = {
        "architecture": name,
        "num_classes": num_classes,
        "num_features": 768,
        "label_names": [f"kind {i}" for i in range(num_classes)],
        "pretrained_cfg": {
            "tag": "ft_in1k",
            "input_size": [3, 96, 96],
            "mean": [0.5, 0.5, 0.5],
            "std": [0.25, 0.25, 0.25],
            "crop_pct": 1.0,
            "interpolation": "bilinear",
            "num_classes": num_classes,
        },
    }
    config.update(config_extra or {})
    (folder / "config.json").write_text(json.dumps(config))
    return folder, spec


@pytest.mark.parametrize("weights_file", ["model.safetensors", "pytorch_model.bin"])
def test_a_hub_folder_sets_architecture_classes_labels_and_size(tmp_path, weights_file):
    folder, _ = _hub_folder(tmp_path, "fastvit_t8", 4, weights_file)
    out = tmp_path / "hub.onnx"
    ok("export", "fastvit_t8", "--weights", folder, "-o", out)
    meta = sidecar(out)
    assert meta["input_shape"] == [1, 3, 96, 96]
    assert meta["class_labels"] == ["kind 0", "kind 1", "kind 2", "kind 3"]
    assert meta["mean"] == [0.5, 0.5, 0.5] and meta["interpolation"] == "bilinear"
    assert meta["weights"].endswith(weights_file)


def test_a_hub_config_of_another_model_or_wrong_labels_is_refused(tmp_path):
    folder, _ = _hub_folder(tmp_path, "fastvit_t8", 4, "model.safetensors")
    assert_user_error(
        mvd("export", "levit_128s", "--weights", folder),
        "is for fastvit_t8, not levit_128s",
    )
    (folder / "config.json").write_text(
        json.dumps({"architecture": "fastvit_t8.apple_in1k", "label_names": ["a", "b"]})
    )
    assert_user_error(
        mvd("export", "fastvit_t8", "--weights", folder),
        "label_names names 2 classes, but the model's head has 4",
    )
    (folder / "config.json").write_text(
        json.dumps({"architecture": "fastvit_t8", "num_classes": 7})
    )
    assert_user_error(
        mvd("export", "fastvit_t8", "--weights", folder),
        "the hub config says 7 classes, but the checkpoint's head has 4",
    )
    (folder / "model.safetensors").unlink()
    assert_user_error(mvd("export", "fastvit_t8", "--weights", folder), "no model.safetensors")


def test_export_of_a_callers_module_does_not_claim_random_weights(tmp_path):
    """Issue 14's provenance bug: trained weights passed as a module were recorded as
    'random initialisation'."""
    _, model = fine_tuned("fastvit_t8", 1000)
    artifact = api.export("fastvit_t8", model=model, output=tmp_path / "m.onnx", image_size=64)
    assert artifact.metadata["weights"] == "the caller's module (weights not recorded)"
