"""The user's own model (issue 13): fine-tuned heads, other resolutions, headless
backbones, mmseg class names, verified like the zoo.

Checkpoints are built here in each family's official and timm layouts, from models
under stress weights (so a wrong fold or a head mix-up cannot hide), with head sizes
other than the zoo's; test_matrix.py verifies them through every format.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from checkpoint_layouts import apple_checkpoint
from conftest import test_inputs
from test_efficientvit_timm import to_timm
from test_levit import to_official

from mobilevit_deploy import api
from mobilevit_deploy.errors import BadInput, CheckpointMismatch
from mobilevit_deploy.images import natural_images, to_model_input
from mobilevit_deploy.judge import NOISE_FLOOR_FACTOR
from mobilevit_deploy.registry import ModelSpec
from mobilevit_deploy.reparam import reparameterize
from mobilevit_deploy.stress import apply_stress_weights
from mobilevit_deploy.verify import verify
from mobilevit_deploy.zoo import get_spec

FORMATS3 = ("onnx", "coreml", "tflite")


def fine_tuned(
    name: str, num_classes: int, size: tuple[int, int] = (64, 64), seed: int = 0
) -> tuple[ModelSpec, torch.nn.Module]:
    """A model of `name` with another head size, under stress weights."""
    spec = dataclasses.replace(get_spec(name), num_classes=num_classes, input_size=size)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = spec.build()
    calibration = torch.from_numpy(to_model_input(natural_images(4, size, seed + 100), spec))
    return spec, apply_stress_weights(model, calibration, seed)


def _official(name: str, model: torch.nn.Module) -> dict:
    """The checkpoint as the family's official training code writes it."""
    state = model.state_dict()
    family = get_spec(name).family
    if family == "fastvit":
        return apple_checkpoint(state)
    if family == "levit":
        return {"model": to_official(model, state)}
    if family == "efficientvit":
        return {"state_dict": state}
    if family == "sepvit":
        return {"model": state}
    return {"state_dict_ema": state, "args": None}  # SeaFormer's timm-trainer file


def _timm(name: str, model: torch.nn.Module) -> dict:
    state = model.state_dict()
    return to_timm(state, name) if name.startswith("efficientvit") else state


LAYOUTS = {"official": _official, "timm": _timm}
FINE_TUNES = [
    ("fastvit_t8", "official"),
    ("fastvit_t8", "timm"),
    ("levit_128s", "official"),
    ("levit_128s", "timm"),
    ("efficientvit_b0", "official"),
    ("efficientvit_b0", "timm"),
    ("efficientvit_l1", "timm"),
    ("seaformer_tiny", "official"),
    ("sepvit_lite", "official"),
]


def _size(name: str) -> tuple[int, int]:
    return (224, 224) if name.startswith("levit") else (64, 64)


@pytest.mark.parametrize(("name", "layout"), FINE_TUNES)
def test_head_size_is_read_from_the_checkpoint(tmp_path, name, layout):
    _, model = fine_tuned(name, 10, _size(name))
    path = tmp_path / "ft.pth"
    torch.save(LAYOUTS[layout](name, model), path)
    loaded = api.load_model(name, path)
    assert loaded.mvd_spec.num_classes == 10
    x = torch.from_numpy(test_inputs(name, _size(name)[0]))
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
    with pytest.raises(CheckpointMismatch, match="--num-classes says 12 classes, but the check"):
        api.load_model(name, path, num_classes=12)


def test_num_classes_builds_a_fresh_head_and_a_fused_file_keeps_it(tmp_path):
    from mobilevit_deploy.reparam_file import reparam_to_file

    fresh = api.load_model("fastvit_t8", num_classes=12)
    assert fresh.head.fc.out_features == 12
    _, model = fine_tuned("fastvit_t8", 5)
    torch.save(model.state_dict(), tmp_path / "ft.pth")
    reparam_to_file("fastvit_t8", tmp_path / "fused.safetensors", weights=str(tmp_path / "ft.pth"))
    loaded = api.load_model("fastvit_t8", tmp_path / "fused.safetensors")
    assert loaded.mvd_spec.num_classes == 5 and loaded.mvd_provenance.form == "fused"


@pytest.mark.parametrize(
    ("name", "classes"),
    [
        ("efficientvit_b0", 1280),
        ("levit_128s", 384),
        ("fastvit_t8", 768),
        ("seaformer_tiny", 160),
        ("sepvit_lite", 256),
    ],
)
def test_a_headless_checkpoint_exports_pooled_features(tmp_path, name, classes):
    _, model = fine_tuned(name, 0, _size(name))
    torch.save(model.state_dict(), tmp_path / "backbone.pth")
    weights, out = tmp_path / "backbone.pth", tmp_path / "b.onnx"
    artifact = api.export(name, weights=weights, output=out, image_size=_size(name))
    assert artifact.metadata["task"] == "features" and artifact.metadata["num_classes"] == 0
    from mobilevit_deploy.runtimes.onnxruntime import OrtRunner

    x = test_inputs(name, _size(name)[0], count=1)
    out = OrtRunner(artifact.path)(x)
    assert out.shape == (1, classes)
    # Against float64, within 1e-5 of the scale or twice float32's own error on this
    # function: the larger of the unfused and the fused model's in torch, since the file
    # runs the fused graph and cannot beat float32 on it. On one input, stressed
    # SeaFormer-Tiny's unfused run is 3.7e-6 of the scale off, its fused run 1.39e-5
    # and its file 1.38e-5 (verify, on 12 inputs, measures 2.7e-6 and 4.5e-6).
    with torch.no_grad():
        own = model.eval()(torch.from_numpy(x)).numpy()
        fused = reparameterize(copy.deepcopy(model), image_size=_size(name))
        fused_own = fused(torch.from_numpy(x)).numpy()
        reference = copy.deepcopy(model).double()(torch.from_numpy(x).double()).numpy()
    scale = np.abs(reference).max()
    floor = max(np.abs(own - reference).max(), np.abs(fused_own - reference).max())
    assert np.abs(out - reference).max() < max(1e-5 * scale, NOISE_FLOOR_FACTOR * floor)


def test_segmenter_heads_of_any_class_count(tmp_path):
    for name, key in (
        ("efficientvit_seg_b0_cityscapes", "head.output_ops.0.op_list.1.conv.weight"),
        ("efficientvit_seg_b1_ade20k", "head.output_ops.0.op_list.0.conv.weight"),
        ("seaformer_seg_tiny_ade20k", "decode_head.conv_seg.weight"),
    ):
        spec, model = fine_tuned(name, 4)
        assert spec.head_key == key and model.state_dict()[key].shape[0] == 4
        torch.save({"state_dict": model.state_dict()}, tmp_path / "seg.pth")
        assert api.load_model(name, tmp_path / "seg.pth").mvd_spec.num_classes == 4
    with pytest.raises(BadInput, match="needs at least one class"):
        api.load_model("seaformer_seg_tiny_ade20k", num_classes=0)


def test_mmseg_class_names_reach_every_format_and_must_match(tmp_path):
    names = ["road", "car", "person", "sky"]
    _, model = fine_tuned("seaformer_seg_tiny_ade20k", 4)
    path = tmp_path / "mmseg.pth"
    torch.save({"state_dict": model.state_dict(), "meta": {"CLASSES": names}}, path)
    artifact = api.export("seaformer_seg_tiny_ade20k", weights=path, output=tmp_path / "s.onnx")
    assert artifact.metadata["class_labels"] == names and artifact.metadata["labels"] == "custom"
    from mobilevit_deploy.exporters.onnx import read_metadata

    assert read_metadata(artifact.path)["class_labels"] == names
    torch.save({"state_dict": model.state_dict(), "meta": {"CLASSES": names[:3]}}, path)
    with pytest.raises(BadInput, match=r"mmseg\.pth's meta names 3 classes, but the model's head"):
        api.load_model("seaformer_seg_tiny_ade20k", path)
    mmseg1 = {"state_dict": model.state_dict(), "meta": {"dataset_meta": {"classes": names}}}
    torch.save(mmseg1, path)
    loaded = api.load_model("seaformer_seg_tiny_ade20k", path)
    assert loaded.mvd_spec.class_names == tuple(names)


def test_a_labels_file_of_the_wrong_length_is_refused_before_any_work(tmp_path):
    _, model = fine_tuned("fastvit_t8", 3)
    torch.save(model.state_dict(), tmp_path / "ft.pth")
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\n")
    with pytest.raises(BadInput, match="--labels names 2 classes, but the model's head has 3"):
        api.export("fastvit_t8", weights=tmp_path / "ft.pth", labels=labels, output=tmp_path / "o")
    labels.write_text("cat\ndog\ncow\n")
    artifact = api.export(
        "fastvit_t8", weights=tmp_path / "ft.pth", labels=labels, output=tmp_path / "o"
    )
    assert artifact.metadata["class_labels"] == ["cat", "dog", "cow"]
    assert artifact.path == tmp_path / "o.onnx" and "added the .onnx suffix" in artifact.notes[0]
    with pytest.raises(BadInput, match="--features"):
        api.load_model("fastvit_t8", tmp_path / "ft.pth", labels=labels, features=True)


# --- Resolutions ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "size"),
    [
        ("fastvit_t8", (96, 160)),
        ("efficientvit_b0", (64, 128)),
        ("seaformer_tiny", (96, 64)),
        ("sepvit_lite", (64, 96)),
        ("levit_128s", (192, 320)),
    ],
)
def test_every_family_runs_non_square_sizes_fused_exactly(name, size):
    _, model = fine_tuned(name, 7, size)
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    model = model.double()
    fused = reparameterize(model, image_size=size)
    with torch.no_grad():
        ref, out = model(x), fused(x)
    assert ref.shape == (2, 7)
    assert float((ref - out).abs().max() / ref.abs().max()) < 1e-9


def test_impossible_sizes_are_refused_with_the_reason():
    with pytest.raises(BadInput, match="multiples of 32"):
        api.load_model("fastvit_t8", image_size=(100, 100))
    with pytest.raises(BadInput, match="multiples of 16"):
        api.load_model("levit_128s", image_size="200x224")


def test_levit_fine_tuned_at_256_loads_at_256_and_resizes_on_request(tmp_path):
    _, model = fine_tuned("levit_128s", 10, (256, 256))
    path = tmp_path / "levit256.pth"
    torch.save({"model": to_official(model, model.state_dict())}, path)
    loaded = api.load_model("levit_128s", path)
    assert loaded.mvd_spec.input_hw == (256, 256) and not loaded.mvd_spec.adaptations
    x = torch.from_numpy(test_inputs("levit_128s", 256))
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
    resized = api.load_model("levit_128s", path, image_size=(224, 288))
    assert "resized from the checkpoint's 256x256 to 224x288" in resized.mvd_spec.adaptations[0]
    table = resized.stages[0].blocks[0].attn.attention_biases
    assert table.shape == (4, 14 * 18)
    # The interpolation keeps the table's values where the grids meet: offset (0, 0).
    source = model.stages[0].blocks[0].attn.attention_biases
    assert torch.allclose(table[:, 0], source[:, 0], atol=0.5)
    artifact = api.export("levit_128s", weights=path, image_size="224x288", output=tmp_path / "r")
    assert "not the checkpoint's own function" in artifact.metadata["adaptations"][0]
    assert any("resized" in note for note in artifact.notes)


def test_reparam_and_bench_run_a_levit_at_its_checkpoints_size(tmp_path):
    """Both used the zoo's 224 for their inputs, which a 256 LeViT refuses."""
    from mobilevit_deploy.bench import benchmark
    from mobilevit_deploy.reparam_file import reparam_to_file

    _, model = fine_tuned("levit_128s", 3, (256, 256))
    torch.save(model.state_dict(), tmp_path / "ft.pth")
    fused = reparam_to_file("levit_128s", tmp_path / "f.pt", weights=str(tmp_path / "ft.pth"))
    assert fused["max_rel"] < 1e-5
    assert api.load_model("levit_128s", tmp_path / "f.pt").mvd_spec.input_hw == (256, 256)
    timed = benchmark(
        "levit_128s",
        weights=tmp_path / "ft.pth",
        min_time_s=0.01,
        min_runs=2,
        runtimes=("onnxruntime",),
    )
    assert timed["image_size"] == [256, 256] and len(timed["results"]) == 2


def test_levit_same_token_count_at_another_shape_is_a_resize_not_a_misreading(tmp_path):
    """128x512 has the 256 tokens of 256x256: taken as the trained grid, the tables
    loaded unchanged into the wrong geometry, with no note."""
    _, model = fine_tuned("levit_128s", 3, (256, 256))
    torch.save(model.state_dict(), tmp_path / "ft.pth")
    wide = api.load_model("levit_128s", tmp_path / "ft.pth", image_size="128x512")
    assert "from the checkpoint's 256x256 to 128x512" in wide.mvd_spec.adaptations[0]


def test_reparam_of_a_segmenter_and_of_a_size_from_a_hub_config(tmp_path):
    """reparam compared a segmenter's map as if logits (a traceback), and fused at the
    zoo's size what it then checked at the model's."""
    from mobilevit_deploy.reparam_file import reparam_to_file

    _, model = fine_tuned("seaformer_seg_tiny_ade20k", 4, (512, 512))
    torch.save({"state_dict": model.state_dict()}, tmp_path / "seg.pth")
    done = reparam_to_file(
        "seaformer_seg_tiny_ade20k", tmp_path / "f.pt", weights=str(tmp_path / "seg.pth")
    )
    assert done["max_rel"] < 1e-5
    from safetensors.torch import save_file

    hub = tmp_path / "hub"
    hub.mkdir()
    _, model = fine_tuned("seaformer_tiny", 5, (256, 256))
    save_file(model.state_dict(), str(hub / "model.safetensors"))
    (hub / "config.json").write_text('{"pretrained_cfg": {"input_size": [3, 256, 256]}}')
    done = reparam_to_file("seaformer_tiny", tmp_path / "h.pt", weights=str(hub))
    assert done["max_rel"] < 1e-5


def test_hub_label_names_as_a_mapping_empty_or_repeated(tmp_path):
    from safetensors.torch import save_file

    _, model = fine_tuned("fastvit_t8", 3)
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    config = tmp_path / "config.json"
    config.write_text('{"label_names": {"1": "dog", "0": "cat", "2": "cow"}}')
    assert api.load_model("fastvit_t8", tmp_path).mvd_spec.class_names == ("cat", "dog", "cow")
    config.write_text('{"label_names": []}')
    assert api.load_model("fastvit_t8", tmp_path).mvd_spec.class_names is None
    config.write_text('{"label_names": ["cat", "dog", "cat"]}')
    with pytest.raises(BadInput, match="names a class more than once: cat"):
        api.load_model("fastvit_t8", tmp_path)


def test_labels_with_a_loaded_model(tmp_path):
    """export(model=..., labels=...) worked when labels were a CoreML option."""
    _, model = fine_tuned("fastvit_t8", 2)
    out = tmp_path / "m.onnx"
    artifact = api.export(
        "fastvit_t8", model=model, labels=["no", "yes"], output=out, image_size=64
    )
    assert artifact.metadata["class_labels"] == ["no", "yes"]
    with pytest.raises(BadInput, match="names 3 classes, but the model's head has 1000"):
        api.export("fastvit_t8", model=api.load_model("fastvit_t8"), labels=["a", "b", "c"])


def test_levit_non_square_checkpoint_needs_its_size_and_then_loads(tmp_path):
    _, model = fine_tuned("levit_128s", 5, (192, 320))
    path = tmp_path / "wide.pth"
    torch.save(model.state_dict(), path)
    with pytest.raises(BadInput, match="240-token grid, not a square one"):
        api.load_model("levit_128s", path)
    loaded = api.load_model("levit_128s", path, image_size="192x320")
    assert loaded.mvd_spec.input_hw == (192, 320)


# --- Feature maps --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "strides"),
    [
        ("fastvit_t8", [4, 8, 16, 32]),
        ("efficientvit_b0", [4, 8, 16, 32]),
        ("levit_128s", [16, 32, 64]),
        ("seaformer_tiny", [4, 8, 16, 32, 64]),
        ("sepvit_lite", [4, 8, 16, 32]),
    ],
)
def test_feature_maps_have_the_recorded_strides_and_channels(name, strides):
    size = _size(name)
    model = api.load_model(name, features=True, image_size=size)
    outs = model(torch.from_numpy(test_inputs(name, size[0], count=1)))
    info = model.stage_info()
    assert [s for s, _ in info] == strides
    for out, (stride, channels) in zip(outs, info, strict=True):
        assert out.shape[1] == channels
        assert out.shape[2] == -(-size[0] // stride)
    picked = api.load_model(name, features=(1, 2), image_size=size)
    assert len(picked(torch.zeros(1, 3, *size))) == 2


def test_feature_stages_that_do_not_exist_and_segmenters_are_refused():
    with pytest.raises(BadInput, match=r"stages \[7\] do not exist; this model has stages 0-3"):
        api.load_model("fastvit_t8", features=(7,))
    with pytest.raises(BadInput, match="segmentation model"):
        api.load_model("seaformer_seg_tiny_ade20k", features=True)


# --- Verified like the zoo: feature maps in ONNX, CoreML, TFLite ------------------------
# (the fine-tuned checkpoints of each family go through every format in test_matrix.py)


def verified(report, formats=FORMATS3) -> None:
    rows = {p.format for p in report.pairs}
    assert set(formats) <= rows, rows
    failed = [(p.candidate, p.metrics["max_rel"], p.metrics["psnr_db"]) for p in report.pairs]
    assert report.passed, (failed, report.problems)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["fastvit_t8", "levit_128s", "efficientvit_b0", "seaformer_tiny", "sepvit_lite"]
)
def test_features_verify_in_every_format(name):
    """And FastViT's maps in ExecuTorch too (a .pte with several outputs)."""
    formats = (*FORMATS3, "executorch") if name == "fastvit_t8" else FORMATS3
    report = verify(name, formats=formats, features=True, image_size=_size(name), num_images=3)
    verified(report, formats)
    assert report.task == "features" and len(report.outputs) >= 3
    onnx = next(p for p in report.pairs if p.format == "onnx")
    assert len(onnx.metrics["outputs"]) == len(report.outputs)
