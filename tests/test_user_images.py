"""`--images DIR`: odd sizes, grayscale, RGBA and palette files work; bad files are
skipped with a warning that names them."""

import dataclasses

import numpy as np
import pytest
from PIL import Image

from mobilevit_deploy.errors import BadInput
from mobilevit_deploy.user_images import load_images
from mobilevit_deploy.verify import verify
from mobilevit_deploy.zoo import get_spec


@pytest.fixture
def image_dir(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (53, 37), dtype=np.uint8), "L").save(tmp_path / "g.png")
    rgba = rng.integers(0, 255, (40, 90, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).convert("P").save(
        tmp_path / "p.gif"
    )
    Image.fromarray(rng.integers(0, 255, (200, 300, 3), dtype=np.uint8)).save(tmp_path / "j.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (tmp_path / "notes.txt").write_text("not an image, ignored by its suffix")
    return tmp_path


def test_every_kind_of_file_becomes_a_model_sized_rgb_image(image_dir):
    warnings = []
    images = load_images(image_dir, get_spec("fastvit_t8"), (64, 64), warn=warnings.append)
    assert images.shape == (4, 64, 64, 3) and images.dtype == np.uint8
    assert warnings == ["skipped broken.jpg: not a readable image (UnidentifiedImageError)"]


def test_preprocessing_is_resize_then_centre_crop(tmp_path):
    """A 100x200 image whose left and right quarters are black: crop_pct 0.5 resizes the
    short side to 128 (width 256) and keeps the centre 64x64, which is all white."""
    pixels = np.zeros((100, 200, 3), np.uint8)
    pixels[:, 50:150] = 255
    Image.fromarray(pixels).save(tmp_path / "x.png")
    spec = get_spec("fastvit_t8")
    half = type(spec.preprocessing)(crop_pct=0.5, interpolation="bilinear")
    images = load_images(tmp_path, dataclasses.replace(spec, preprocessing=half), (64, 64))
    assert images.min() == 255


def test_verify_on_user_images_reports_them(image_dir):
    warnings = []
    report = verify(
        "fastvit_t8", image_size=64, num_images=3, images_dir=image_dir, warn=warnings.append
    )
    assert report.passed
    assert report.inputs.startswith(f"3 images from {image_dir}")
    # Sorted: a.png, broken.jpg (skipped, named), g.png, j.jpg -> the limit of 3 is reached.
    assert warnings == ["skipped broken.jpg: not a readable image (UnidentifiedImageError)"]


def test_a_folder_without_images_is_bad_input(tmp_path):
    (tmp_path / "x.jpg").write_bytes(b"junk")
    with pytest.raises(BadInput, match="no readable image"):
        load_images(tmp_path, get_spec("fastvit_t8"), (64, 64))
    with pytest.raises(BadInput, match="not a directory"):
        load_images(tmp_path / "missing", get_spec("fastvit_t8"), (64, 64))
