"""The real client: TFLite files exported with default options load in MediaPipe Tasks'
ImageClassifier and ImageSegmenter (its Python API runs the same C++ graph as Android
and iOS) and agree with mvd's own LiteRT run of the same file on the same image.

Under stress weights, so that each decision is clear of its runner-up. The image has the
input's size, so MediaPipe's own resize is the identity; its segmenter's category mask
is its bilinear resize of the logits to the image, with the grid's corners aligned, so
the pixels that fall on the logits' grid carry their argmax exactly.
"""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
import torch

from mobilevit_deploy import api
from mobilevit_deploy.exporters.tflite_metadata import LABELS_FILE
from mobilevit_deploy.images import natural_images, to_model_input
from mobilevit_deploy.runtimes.litert import LiteRTRunner
from mobilevit_deploy.stress import apply_stress_weights
from mobilevit_deploy.zoo import list_models

mp = pytest.importorskip("mediapipe")
vision = pytest.importorskip("mediapipe.tasks.python.vision")

SIZE = 64  # a multiple of every family's stride, small enough to export the zoo quickly


def _exported(name: str, tmp_path, labels=None, **options):
    """A stressed model of `name` at SIZE, exported to TFLite with default options."""
    classes = len(labels) if labels else None
    model = api.load_model(name, image_size=SIZE, num_classes=classes, labels=labels)
    calibration = torch.from_numpy(to_model_input(natural_images(4, SIZE, 100), model.mvd_spec))
    apply_stress_weights(model, calibration, seed=0)
    return api.export(name, "tflite", model=model, output=tmp_path / f"{name}.tflite", **options)


def _base(path):
    from mediapipe.tasks.python import BaseOptions

    return BaseOptions(model_asset_path=str(path))


def classified(path, image: np.ndarray) -> list:
    options = vision.ImageClassifierOptions(base_options=_base(path), max_results=3)
    with vision.ImageClassifier.create_from_options(options) as classifier:
        found = classifier.classify(mp.Image(image_format=mp.ImageFormat.SRGB, data=image))
    return found.classifications[0].categories


def category_mask(path, image: np.ndarray) -> np.ndarray:
    options = vision.ImageSegmenterOptions(base_options=_base(path), output_category_mask=True)
    with vision.ImageSegmenter.create_from_options(options) as segmenter:
        found = segmenter.segment(mp.Image(image_format=mp.ImageFormat.SRGB, data=image))
    return found.category_mask.numpy_view().copy()


def on_grid(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """The mask's pixels that an align-corners resize from `grid` maps onto grid points."""
    picks = []
    for size, cells in zip(mask.shape[:2], grid, strict=True):
        step = (size - 1) / max(cells - 1, 1)
        assert step == int(step), f"{size} pixels do not fall on a grid of {cells}"
        picks.append(np.arange(cells) * int(step))
    return mask[np.ix_(*picks)]


def check_agrees(artifact) -> None:
    """MediaPipe's answer on two images is mvd's LiteRT answer for the same file."""
    record = artifact.metadata
    runner = LiteRTRunner(artifact.path)
    images = natural_images(2, SIZE, seed=7)
    for image in images:
        x = ((image / 255.0 - record["mean"]) / record["std"]).astype(np.float32)
        ours = runner(x.transpose(2, 0, 1)[None])[0]
        if record["task"] == "classification":
            top = classified(artifact.path, image)[0]
            names = record.get("class_labels") or [str(i) for i in range(len(ours))]
            assert top.category_name == names[int(ours.argmax())], record["model"]
            assert top.score == pytest.approx(float(ours.max()), rel=1e-4, abs=1e-4)
        else:
            mask = category_mask(artifact.path, image)
            assert mask.shape[:2] == image.shape[:2]
            theirs = on_grid(mask.reshape(mask.shape[:2]), ours.shape[1:])
            assert (theirs == ours.argmax(0)).mean() == 1.0, record["model"]


@pytest.fixture(scope="module")
def named_classifier(tmp_path_factory):
    return _exported("fastvit_t8", tmp_path_factory.mktemp("mp"), labels=["cat", "dog", "bird"])


def test_a_classifier_with_names_loads_in_mediapipe(named_classifier):
    record = named_classifier.metadata
    assert record["input_layout"] == "NHWC" and record["normalize_inside"]
    # the export says so, each default that changed in a note
    assert [n for n in named_classifier.notes if "a new default" in n] == [
        "tflite: channels-last (NHWC) input, as MediaPipe takes it (a new default); "
        "--no-nhwc keeps NCHW",
        "tflite: RGB input in [0, 1], (x - mean) / std inside the file (a new default); "
        "--no-normalize-inside takes the normalised input",
    ]
    check_agrees(named_classifier)
    found = classified(named_classifier.path, natural_images(1, SIZE, seed=1)[0])
    assert {c.category_name for c in found} == {"cat", "dog", "bird"}


def test_the_labels_file_is_packed_as_the_populator_packs_it(named_classifier):
    """A zip archive after the flatbuffer, which zipfile (and so MediaPipe's metadata
    extractor) opens from the whole file."""
    with zipfile.ZipFile(named_classifier.path) as archive:
        assert archive.namelist() == [LABELS_FILE]
        assert archive.read(LABELS_FILE) == b"cat\ndog\nbird\n"


@pytest.mark.slow
def test_an_int8_file_loads_in_mediapipe_as_the_fp32_one_does(tmp_path):
    """int8 inside, float32 in and out: the same app code runs it."""
    artifact = _exported(
        "fastvit_t8", tmp_path, precision="int8", int8_target=0, calibration_images=8
    )
    assert artifact.metadata["input_details"] == {"shape": [1, SIZE, SIZE, 3], "dtype": "float32"}
    check_agrees(artifact)


@pytest.mark.slow
def test_pooled_features_load_in_mediapipes_image_embedder(tmp_path):
    """A headless model's file carries input metadata and a plain output: MediaPipe's
    ImageEmbedder takes it, and its embedding is mvd's LiteRT output."""
    artifact = api.export(
        "fastvit_t8", "tflite", output=tmp_path / "e.tflite", image_size=SIZE, num_classes=0
    )
    image = natural_images(1, SIZE, seed=7)[0]
    options = vision.ImageEmbedderOptions(base_options=_base(artifact.path))
    with vision.ImageEmbedder.create_from_options(options) as embedder:
        found = embedder.embed(mp.Image(image_format=mp.ImageFormat.SRGB, data=image))
    record = artifact.metadata
    x = ((image / 255.0 - record["mean"]) / record["std"]).astype(np.float32)
    ours = LiteRTRunner(artifact.path)(x.transpose(2, 0, 1)[None])[0]
    theirs = found.embeddings[0].embedding
    assert np.abs(theirs - ours).max() <= 1e-5 * np.abs(ours).max()
    assert not zipfile.is_zipfile(artifact.path)  # no classes, no labels file


ZOO = [s.name for s in list_models() if s.output_kind in ("classification", "segmentation")]


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO)
def test_every_classifier_and_segmenter_loads_in_mediapipe(name, tmp_path):
    check_agrees(_exported(name, tmp_path))
