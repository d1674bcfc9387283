"""`mvd eval`: accuracy on the user's labelled images, for torch and each artifact.

The set is made here: three classes of 64x64 pictures that differ in colour and pattern
(solid red, green stripes, a blue checkerboard). A FastViT-T8 under stress weights gets
a 3-class head fitted on frozen features of other pictures of the same kinds, so torch
is accurate on the set and an artifact that computed something else would show a drop.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from cli_helpers import assert_user_error, mvd, ok
from PIL import Image
from test_user_models import fine_tuned

from mobilevit_deploy import api
from mobilevit_deploy import evaluate as evaluate_mod
from mobilevit_deploy.errors import BadInput
from mobilevit_deploy.evaluate import evaluate
from mobilevit_deploy.exporters.formats import Format
from mobilevit_deploy.images import to_model_input
from mobilevit_deploy.runtimes.torch_runtime import torch_threads

CLASSES = ("checker", "solid", "stripes")  # sorted: the ImageFolder indices 0, 1, 2
SMALL = {"image_size": 64}


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Two test workers share two cores: torch's threads would only contend."""
    with torch_threads(1):
        yield


def pictures(kind: str, count: int, seed: int) -> np.ndarray:
    """uint8 (count, 64, 64, 3) of one class, each with its own phase and noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:64, 0:64]
    out = []
    for _ in range(count):
        shift = rng.integers(0, 8)
        image = np.zeros((64, 64, 3))
        if kind == "solid":
            image[...] = (200, 40, 40)
        elif kind == "stripes":
            image[...] = (30, 60, 30)
            image[(xx + shift) % 8 < 4] = (40, 220, 60)
        else:
            image[...] = (30, 30, 200)
            image[((xx + shift) // 8 + (yy + shift) // 8) % 2 == 0] = (200, 200, 240)
        out.append(np.clip(image + rng.normal(0, 20, image.shape), 0, 255).astype(np.uint8))
    return np.stack(out)


def write_folder(root, per_class: int = 6, seed: int = 0, kinds=CLASSES):
    for k, kind in enumerate(kinds):
        (root / kind).mkdir(parents=True)
        for i, picture in enumerate(pictures(kind, per_class, seed + k)):
            Image.fromarray(picture).save(root / kind / f"{i}.png")
    return root


def shapes_checkpoint(path):
    """A stressed FastViT-T8 whose 3-class head is fitted on frozen features (2 s),
    saved at `path` (the docs' eval example uses it too: scripts/docs_examples.py)."""
    spec, model = fine_tuned("fastvit_t8", len(CLASSES))
    model.eval()
    train = np.concatenate([pictures(kind, 30, 100 + k) for k, kind in enumerate(CLASSES)])
    target = torch.arange(len(CLASSES)).repeat_interleave(30)
    features = []
    hook = model.head.fc.register_forward_hook(lambda _m, args, _out: features.append(args[0]))
    with torch.no_grad():
        model(torch.from_numpy(to_model_input(train, spec)))
    hook.remove()
    optimiser = torch.optim.Adam(model.head.fc.parameters(), lr=0.01, weight_decay=0.01)
    for _ in range(200):
        loss = torch.nn.functional.cross_entropy(model.head.fc(features[0]), target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return shapes_checkpoint(tmp_path_factory.mktemp("ckpt") / "fastvit_t8_3cls.pt")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("data") / "set")


@pytest.fixture(scope="module")
def report(checkpoint, folder):
    """torch and ONNX fp32 on the 18 images, with the progress it reported."""
    events = []
    result = evaluate(
        "fastvit_t8",
        weights=checkpoint,
        data=folder,
        progress=lambda *event: events.append(event),
        **SMALL,
    )
    return result, events


def test_torch_is_accurate_and_onnx_fp32_loses_nothing(report):
    result, _ = report
    assert [c.candidate for c in result.candidates] == ["torch", "onnx fp32"]
    torch_row, onnx_row = result.candidates
    assert result.images == 18 and result.layout == "imagefolder" and result.num_classes == 3
    assert torch_row.metrics["top1"] >= 0.9
    assert onnx_row.metrics["top1"] == torch_row.metrics["top1"]
    assert onnx_row.drop["top1"] == 0.0 and onnx_row.agreement == 1.0
    # Three classes: no top-5, in the metrics or the drop.
    assert torch_row.metrics["top5"] is None and onnx_row.drop["top5"] is None
    assert set(torch_row.metrics["per_class"]) == {"0", "1", "2"}


def test_progress_counts_the_images_of_every_candidate(report):
    _, events = report
    assert ("torch", 0, 18) in events and ("torch", 18, 18) in events
    assert ("exporting onnx fp32", 0, None) in events
    # Artifacts run one image at a time: 18 steps after the start.
    assert [e for e in events if e[0] == "onnx fp32"] == [("onnx fp32", i, 18) for i in range(19)]


def broken_runners(monkeypatch, damage) -> None:
    """Every format's runner, as evaluate opens it, returns `damage(logits)`; the
    exporters' own checks still run the true file."""
    real = Format.open_runner

    def open_broken(self, path, threads=None):
        runner = real(self, path, threads)
        return lambda x: damage(runner(x))

    monkeypatch.setattr(Format, "open_runner", open_broken)


def test_a_broken_artifact_shows_a_large_drop(checkpoint, folder, monkeypatch):
    """Logits that come out with the classes rotated: the accuracy falls to nothing,
    and the report says so as a drop of most of the torch accuracy."""
    broken_runners(monkeypatch, lambda logits: np.roll(logits, 1, axis=1))
    result = evaluate("fastvit_t8", weights=checkpoint, data=folder, **SMALL)
    onnx_row = result.candidates[1]
    assert onnx_row.metrics["top1"] <= 0.1
    assert onnx_row.drop["top1"] >= 80.0
    assert onnx_row.agreement <= 0.1


def test_a_noisy_artifact_loses_accuracy(checkpoint, folder, monkeypatch):
    rng = np.random.default_rng(0)
    broken_runners(monkeypatch, lambda out: out + rng.normal(0, 50 * out.std(), out.shape))
    result = evaluate("fastvit_t8", weights=checkpoint, data=folder, **SMALL)
    assert result.candidates[1].drop["top1"] >= 20.0
    assert result.candidates[1].agreement < 0.8


def test_csv_of_indices_and_names_with_a_header(checkpoint, folder, tmp_path):
    """Paths relative to the CSV's folder, a header row, labels as indices; with class
    names (--labels), labels as names too: the same accuracy as the folder layout."""
    rows = ["path,label"] + [
        f"{folder.name}/{kind}/{i}.png,{k}" for k, kind in enumerate(CLASSES) for i in range(6)
    ]
    (folder.parent / "set.csv").write_text("\n".join(rows) + "\n")
    by_index = evaluate(
        "fastvit_t8", weights=checkpoint, data=folder.parent / "set.csv", formats=(), **SMALL
    )
    named = [f"{folder}/{kind}/{i}.png,{kind}" for kind in CLASSES for i in range(6)]
    (tmp_path / "named.csv").write_text("\n".join(named))
    by_name = evaluate(
        "fastvit_t8",
        weights=checkpoint,
        data=tmp_path / "named.csv",
        labels=CLASSES,
        formats=(),
        **SMALL,
    )
    assert by_index.layout == by_name.layout == "csv" and by_index.images == 18
    assert by_index.candidates[0].metrics["top1"] >= 0.9
    index_metrics, name_metrics = by_index.candidates[0].metrics, by_name.candidates[0].metrics
    assert name_metrics["top1"] == index_metrics["top1"]
    per_class = index_metrics["per_class"]
    assert name_metrics["per_class"] == {kind: per_class[str(k)] for k, kind in enumerate(CLASSES)}


def test_folders_are_matched_to_class_names_not_to_sorted_order(checkpoint, folder, tmp_path):
    """With names, a subset of the classes is a valid set, and folders go to the class
    of their name: names in another order than the head's move every folder."""
    subset = write_folder(tmp_path / "two", kinds=CLASSES[1:])
    right = evaluate(
        "fastvit_t8", weights=checkpoint, data=subset, labels=CLASSES, formats=(), **SMALL
    )
    assert right.images == 12 and right.candidates[0].metrics["top1"] >= 0.9
    rotated = CLASSES[1:] + CLASSES[:1]  # the head's class 0 is now called "solid"
    wrong = evaluate(
        "fastvit_t8", weights=checkpoint, data=folder, labels=rotated, formats=(), **SMALL
    )
    assert wrong.candidates[0].metrics["top1"] <= 0.1


def test_top1_and_top5_against_a_hand_count(tmp_path, monkeypatch):
    """Six classes, one image each; the "model" ranks each image's true class at
    positions 0, 0, 1, 4, 5, 5: top-1 2/6, top-5 4/6."""
    _, model = fine_tuned("fastvit_t8", 6)
    torch.save(model.state_dict(), tmp_path / "six.pt")
    kinds = [f"class{c}" for c in range(6)]
    for kind in kinds:
        (tmp_path / "set" / kind).mkdir(parents=True)
        Image.fromarray(pictures("solid", 1, 0)[0]).save(tmp_path / "set" / kind / "x.png")
    ranks = [0, 0, 1, 4, 5, 5]

    class Ranked:
        def __init__(self, *_args) -> None:
            pass

        def __call__(self, x):
            logits = np.zeros((len(x), 6), np.float32)
            for i, rank in enumerate(ranks[: len(x)]):
                order = [c for c in range(6) if c != i]
                order.insert(rank, i)  # the classes best first
                logits[i, order] = np.arange(6, 0, -1)
            return logits

    monkeypatch.setattr(evaluate_mod, "TorchRunner", Ranked)
    result = evaluate(
        "fastvit_t8", weights=tmp_path / "six.pt", data=tmp_path / "set", formats=(), **SMALL
    )
    metrics = result.candidates[0].metrics
    assert metrics["top1"] == pytest.approx(2 / 6) and metrics["top5"] == pytest.approx(4 / 6)
    assert result.metric_names == ("top1", "top5")


@pytest.mark.slow
def test_int8_is_exported_and_scored_with_its_drop(checkpoint, folder):
    result = evaluate(
        "fastvit_t8", weights=checkpoint, data=folder, precisions=("fp32", "int8"), **SMALL
    )
    fp32, int8 = result.candidates[1:]
    assert (fp32.precision, int8.precision) == ("fp32", "int8")
    assert fp32.drop["top1"] == 0.0
    base = result.candidates[0].metrics["top1"]
    assert int8.drop["top1"] == pytest.approx(100 * (base - int8.metrics["top1"]))
    assert 0.0 <= int8.agreement <= 1.0


def test_coreml_off_macos_is_skipped_with_a_note(checkpoint, folder, monkeypatch):
    monkeypatch.setattr("platform.system", lambda: "Linux")
    result = evaluate("fastvit_t8", weights=checkpoint, data=folder, formats=("coreml",), **SMALL)
    assert [c.candidate for c in result.candidates] == ["torch"]
    assert any(n.startswith("coreml: skipped") and "macOS" in n for n in result.notes)


# --- the user's mistakes: one BadInput each, before any export ---------------------------


@pytest.fixture(scope="module")
def five_classes(tmp_path_factory):
    _, model = fine_tuned("fastvit_t8", 5)
    path = tmp_path_factory.mktemp("ckpt5") / "five.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture
def no_export(monkeypatch):
    """Every error must come before the first export (the slow part)."""

    def refuse(*_args, **_kwargs):
        raise AssertionError("exported before the data was checked")

    monkeypatch.setattr(api, "export", refuse)


def test_missing_and_empty_data_are_refused(checkpoint, tmp_path, no_export):
    with pytest.raises(BadInput, match="no such file or directory"):
        evaluate("fastvit_t8", weights=checkpoint, data=tmp_path / "nowhere", **SMALL)
    (tmp_path / "empty" / "solid").mkdir(parents=True)
    with pytest.raises(BadInput, match="no images in class folders"):
        evaluate("fastvit_t8", weights=checkpoint, data=tmp_path / "empty", **SMALL)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(BadInput, match=r"give a folder .* or a \.csv"):
        evaluate("fastvit_t8", weights=checkpoint, data=tmp_path / "notes.txt", **SMALL)


def test_a_class_count_other_than_the_heads_is_refused(five_classes, folder, no_export):
    with pytest.raises(BadInput, match="has 3 class folders, but the model's head has 5"):
        evaluate("fastvit_t8", weights=five_classes, data=folder, **SMALL)


def test_a_headless_model_is_refused(folder, tmp_path, no_export):
    _, backbone = fine_tuned("fastvit_t8", 0)
    torch.save(backbone.state_dict(), tmp_path / "headless.pt")
    with pytest.raises(BadInput, match=r"eval scores a head's predictions; .* has no head"):
        evaluate("fastvit_t8", weights=tmp_path / "headless.pt", data=folder, **SMALL)


def test_a_folder_that_is_not_a_class_is_refused(checkpoint, folder, no_export):
    with pytest.raises(BadInput, match="folder 'checker' is not one of the model's 3 classes"):
        evaluate("fastvit_t8", weights=checkpoint, data=folder, labels=("a", "b", "c"), **SMALL)


@pytest.mark.parametrize(
    ("label", "message"),
    [
        ("3", "line 2: label '3' is out of range: the model has 3 classes (0-2)"),
        ("-1", "line 2: label '-1' is out of range"),
        ("cat", "line 2: label 'cat' is not a class index, and the model has no class names"),
    ],
)
def test_a_bad_csv_label_is_refused_with_its_line(
    checkpoint, folder, tmp_path, no_export, label, message
):
    path = tmp_path / "labels.csv"
    path.write_text(f"{folder}/solid/0.png,1\n{folder}/solid/1.png,{label}\n")
    with pytest.raises(BadInput, match=re.escape(message)):
        evaluate("fastvit_t8", weights=checkpoint, data=path, **SMALL)


def test_a_csv_row_naming_a_missing_file_is_refused(checkpoint, tmp_path, no_export):
    path = tmp_path / "labels.csv"
    path.write_text("path,label\nmissing.png,0\n")
    with pytest.raises(BadInput, match=r"line 2: no such image .*missing\.png"):
        evaluate("fastvit_t8", weights=checkpoint, data=path, **SMALL)


def test_unreadable_images_are_skipped_by_name_and_counted(checkpoint, tmp_path):
    data = write_folder(tmp_path / "set", per_class=2)
    (data / "solid" / "broken.png").write_bytes(b"\x89PNG not really")
    warnings = []
    result = evaluate(
        "fastvit_t8", weights=checkpoint, data=data, formats=(), warn=warnings.append, **SMALL
    )
    assert result.images == 6 and result.skipped == ["solid/broken.png"]
    assert warnings == ["skipped solid/broken.png: not a readable image (UnidentifiedImageError)"]


def test_a_set_of_only_unreadable_images_is_refused(checkpoint, tmp_path, no_export):
    for kind in CLASSES:
        (tmp_path / kind).mkdir()
        (tmp_path / kind / "x.jpg").write_bytes(b"junk")
    with pytest.raises(BadInput, match=r"no readable images \(3 files would not decode\)"):
        evaluate("fastvit_t8", weights=checkpoint, data=tmp_path, warn=lambda _m: None, **SMALL)


# --- segmentation -------------------------------------------------------------------------

SEG = "efficientvit_seg_b0_cityscapes"


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory):
    """EfficientViT-B0's segmenter with a 4-class head (the zoo's smallest: 0.7 M)."""
    _, model = fine_tuned(SEG, 4)
    path = tmp_path_factory.mktemp("seg") / "seg4.pt"
    torch.save(model.state_dict(), path)
    return path


def write_seg_set(root, masks: dict[str, np.ndarray], image_sizes: dict | None = None):
    """images/<name>.jpg (natural-ish noise) and masks/<name>.png (mode L)."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for name, mask in masks.items():
        h, w = (image_sizes or {}).get(name, mask.shape)
        pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"{name}.jpg")
        Image.fromarray(mask.astype(np.uint8), "L").save(root / "masks" / f"{name}.png")
    return root


def test_miou_and_pixel_accuracy_against_a_hand_count(segmenter, tmp_path, monkeypatch):
    """The model "predicts" class 0 in the left half and class 1 in the right half of
    its stride-8 map; resized (bicubic, EfficientViT's evaluation) to a 16x8 mask the
    boundary falls between columns 7 and 8. Ground truth: columns 0-3 class 0, 4-11
    class 1, 12-15 class 2, the last row ignored (255), class 3 nowhere. Per row:
      class 0: predicted 8, true 4, both 4 -> IoU 4/8
      class 1: predicted 8, true 8, both 4 -> IoU 4/12
      class 2: predicted 0, true 4, both 0 -> IoU 0
      class 3: absent from both            -> not counted
    mIoU = (1/2 + 1/3 + 0) / 3 = 5/18; pixel accuracy = 8/16."""
    mask = np.zeros((8, 16), np.uint8)
    mask[:, 4:12], mask[:, 12:], mask[7] = 1, 2, 255
    data = write_seg_set(tmp_path / "seg", {"a": mask, "b": mask})

    class Halves:
        def __init__(self, *_args) -> None:
            pass

        def __call__(self, x):
            logits = np.zeros((len(x), 4, 8, 8), np.float32)
            logits[:, 0, :, :4] = logits[:, 1, :, 4:] = 1.0
            return logits

    monkeypatch.setattr(evaluate_mod, "TorchRunner", Halves)
    result = evaluate(SEG, weights=segmenter, data=data, formats=(), **SMALL)
    metrics = result.candidates[0].metrics
    assert result.task == "segmentation" and result.images == 2
    assert metrics["miou"] == pytest.approx(5 / 18)
    assert metrics["pixel_accuracy"] == pytest.approx(0.5)
    assert metrics["per_class_iou"] == pytest.approx({"0": 0.5, "1": 1 / 3, "2": 0.0})
    assert "bicubic" in result.preprocessing


def test_a_segmenter_and_its_onnx_file_score_alike(segmenter, tmp_path):
    """Masks of another size than the model's (80x48 and 40x40): the logits are resized
    to each; the fp32 file's map agrees with torch's on (nearly) every pixel."""
    rng = np.random.default_rng(1)
    masks = {"a": rng.integers(0, 4, (48, 80)), "b": rng.integers(0, 4, (40, 40))}
    masks["b"][:5] = 255
    result = evaluate(SEG, weights=segmenter, data=write_seg_set(tmp_path / "s", masks), **SMALL)
    torch_row, onnx_row = result.candidates
    assert 0.0 < torch_row.metrics["miou"] < 1.0
    assert onnx_row.agreement >= 0.999
    assert abs(onnx_row.drop["miou"]) < 0.5 and abs(onnx_row.drop["pixel_accuracy"]) < 0.5


def test_a_mask_of_the_wrong_size_is_refused_by_name(segmenter, tmp_path, no_export):
    masks = {"a": np.zeros((32, 32)), "odd": np.zeros((32, 32))}
    data = write_seg_set(tmp_path / "s", masks, image_sizes={"odd": (30, 32)})
    with pytest.raises(BadInput, match=r"mask .*odd\.png is 32x32 \(WxH\), but its image is 32x30"):
        evaluate(SEG, weights=segmenter, data=data, **SMALL)


def test_segmentation_data_mistakes_are_refused(segmenter, tmp_path, no_export):
    with pytest.raises(BadInput, match="DIR/images and DIR/masks"):
        evaluate(SEG, weights=segmenter, data=tmp_path, **SMALL)
    data = write_seg_set(tmp_path / "s", {"a": np.full((16, 16), 7)})
    with pytest.raises(BadInput, match=r"a\.png has class 7, but the model has 4 classes"):
        evaluate(SEG, weights=segmenter, data=data, **SMALL)
    (data / "masks" / "a.png").unlink()
    with pytest.raises(BadInput, match=r"no mask for images/a\.jpg \(masks/a\.png is missing\)"):
        evaluate(SEG, weights=segmenter, data=data, **SMALL)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(data / "masks" / "a.png")
    with pytest.raises(BadInput, match=r"a\.png is RGB, not single-channel"):
        evaluate(SEG, weights=segmenter, data=data, **SMALL)


# --- the command line ---------------------------------------------------------------------


def test_cli_table_json_and_markdown(checkpoint, folder, tmp_path):
    out_json, out_md = tmp_path / "eval.json", tmp_path / "eval.md"
    args = ("eval", "fastvit_t8", "--weights", checkpoint, "--data", folder, "--image-size", "64")
    result = ok(*args, "--json", out_json, "--markdown", out_md)
    assert "top-1 %" in result.stdout and "onnx fp32" in result.stdout
    data = json.loads(out_json.read_text())
    assert [c["candidate"] for c in data["candidates"]] == ["torch", "onnx fp32"]
    assert data["candidates"][0]["metrics"]["top1"] >= 0.9 and data["images"] == 18
    markdown = out_md.read_text()
    top1 = f"{100 * data['candidates'][0]['metrics']['top1']:.1f}"
    assert "| candidate | top-1 % | top-1 drop pts | agrees with torch |" in markdown
    assert f"| torch | {top1} | - | - |" in markdown
    assert f"| onnx fp32 | {top1} | +0.0 | 1.000 |" in markdown


def test_cli_json_to_stdout_is_only_json(checkpoint, folder):
    args = ("eval", "fastvit_t8", "-w", checkpoint, "--data", folder, "--image-size", "64")
    data = json.loads(ok(*args, "--formats", "", "--json", "-").stdout)
    assert data["task"] == "classification" and len(data["candidates"]) == 1


def test_cli_errors_are_one_line_exit_2_and_write_nothing(five_classes, folder, tmp_path):
    out_json = tmp_path / "eval.json"
    common = ("--image-size", "64", "--json", out_json)
    assert_user_error(
        mvd("eval", "fastvit_t8", "-w", five_classes, "--data", folder, *common),
        "has 3 class folders, but the model's head has 5 classes",
    )
    assert_user_error(
        mvd("eval", "fastvit_t8", "-w", five_classes, "--data", tmp_path / "none", *common),
        "no such file or directory",
    )
    assert not out_json.exists()
    missing = mvd("eval", "fastvit_t8", "--data", folder)
    assert missing.exit_code == 2 and "--weights" in missing.output
