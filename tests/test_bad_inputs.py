"""Bad input that used to reach the work (issue 29): each is one line, exit 2, first.

Output paths the permission bits allow but the file system refuses (/proc, /sys for
root), weights that are a URL of another scheme or a text file, a directory given as
labels, an eval CSV with a third column or one image under two labels, and sizes that
only torch's allocator refused.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import SMALL, assert_user_error, mvd
from PIL import Image

from mobilevit_deploy import files, limits
from mobilevit_deploy.configure import read_labels_file
from mobilevit_deploy.errors import BadInput
from mobilevit_deploy.eval_data import read_labelled_set
from mobilevit_deploy.files import atomic_artifact, atomic_path, check_output_file
from mobilevit_deploy.weights import read_checkpoint
from mobilevit_deploy.zoo import get_spec

as_root = pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0,
    reason="only root passes os.access for /proc and /sys; others are refused by it already",
)

# Directories whose permission bits let root in but whose file system makes no file.
REFUSING = [Path("/proc/x.onnx"), Path("/sys/kernel/x.onnx")]


@as_root
@pytest.mark.parametrize("path", REFUSING, ids=str)
def test_an_output_the_file_system_refuses_is_found_before_the_work(path):
    with pytest.raises(BadInput, match=re.escape(f"cannot write {path}: ")):
        check_output_file(path)


@as_root
@pytest.mark.parametrize(
    "args",
    [
        ["export", "fastvit_t8", *SMALL, "-o", "/proc/x.onnx"],
        ["export", "fastvit_t8", *SMALL, "-o", "/sys/kernel/x.onnx"],
        ["reparam", "fastvit_t8", "-o", "/proc/x.pt"],
    ],
    ids=lambda args: f"{args[0]} {args[-1]}",
)
def test_the_cli_refuses_an_output_the_file_system_refuses(args, monkeypatch):
    from mobilevit_deploy import api

    monkeypatch.setattr(api, "load_model", _no_work)
    assert_user_error(mvd(*args), f"cannot write {args[-1]}")


def _no_work(*_args, **_kwargs):
    raise AssertionError("the work started before the bad input was refused")


@as_root
@pytest.mark.parametrize(
    ("writer", "final"),
    [
        (atomic_path, "/proc/x.onnx"),
        (atomic_artifact, "/proc/x.onnx"),
        (files.atomic_dir, "/proc/x.mlpackage"),
    ],
    ids=lambda v: getattr(v, "__name__", None),
)
def test_the_atomic_writers_turn_a_refused_temp_name_into_bad_input(writer, final, monkeypatch):
    """A caller that did not check (or a directory that changed since) gets one line."""
    monkeypatch.setattr(files, "ensure_writable_dir", lambda directory, *_: directory)
    with pytest.raises(BadInput, match=re.escape(f"cannot write {final}: ")), writer(Path(final)):
        raise AssertionError("the body ran")


def test_the_probe_leaves_nothing_behind(tmp_path):
    check_output_file(tmp_path / "out" / "x.onnx")
    assert list((tmp_path / "out").iterdir()) == []


def test_an_empty_output_path_is_refused(tmp_path, monkeypatch):
    """`-o ''` used to write ./fastvit_t8.onnx."""
    monkeypatch.chdir(tmp_path)
    assert_user_error(mvd("export", "fastvit_t8", *SMALL, "-o", ""), "-o/--output is empty")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/x.pt", "s3://bucket/x.pt", "hf://org/model"])
def test_weights_of_a_scheme_that_is_not_downloaded_are_refused_by_name(url):
    scheme = url.split(":", 1)[0]
    with pytest.raises(BadInput, match=f"{scheme}:// URLs are not supported"):
        read_checkpoint(url)
    assert_user_error(
        mvd("info", "fastvit_t8", "--weights", url), f"{scheme}:// URLs are not supported"
    )


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("labels.pt", "cat\ndog\n"),
        ("model.pth", "<!DOCTYPE html>\n<html><body>Not Found</body></html>\n"),
        ("model.safetensors", "version https://git-lfs.github.com/spec/v1\n"),
    ],
)
def test_a_text_file_as_weights_is_named_as_text(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    first = text.splitlines()[0]
    message = f"{path} is a text file (it begins {first[:40]!r}), not a PyTorch or safetensors"
    with pytest.raises(BadInput) as raised:
        read_checkpoint(path)
    assert str(raised.value).startswith(message)
    assert "(101)" not in assert_user_error(mvd("info", "fastvit_t8", "--weights", path), message)


def test_binary_garbage_as_weights_says_it_is_no_torch_file(tmp_path):
    path = tmp_path / "noise.pt"
    path.write_bytes(bytes(range(256)))
    with pytest.raises(BadInput, match=r"neither the zip nor the pickle that torch\.save writes"):
        read_checkpoint(path)


def test_a_directory_as_labels_is_named_a_directory(tmp_path):
    with pytest.raises(BadInput, match=re.escape(f"--labels {tmp_path} is a directory")):
        read_labels_file(tmp_path)
    assert_user_error(
        mvd("info", "fastvit_t8", "--labels", tmp_path), f"--labels {tmp_path} is a directory"
    )


@pytest.fixture
def images(tmp_path) -> Path:
    """Three small pictures beside where the CSV goes."""
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 60 * i, np.uint8)).save(tmp_path / f"{i}.png")
    return tmp_path


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ("0.png,1\n1.png,2,train\n", "line 2: expected 2 columns (path,label), got 3"),
        ("path,label,split\n0.png,1,train\n", "line 1: expected 2 columns (path,label), got 3"),
        ("0.png,1\n1.png,2\n0.png,3\n", "line 3: 0.png is labelled '3', but line 1 labels it '1'"),
        ("0.png,1\n./0.png,3\n", "line 2: ./0.png is labelled '3', but line 1 labels it '1'"),
    ],
    ids=["third column", "third column in the header", "two labels", "two labels, two spellings"],
)
def test_an_eval_csv_that_says_two_things_is_refused_by_line(images, rows, message):
    path = images / "set.csv"
    path.write_text(rows)
    with pytest.raises(BadInput) as raised:
        read_labelled_set(path, get_spec("fastvit_t8"))
    assert f"{path} {message}" in str(raised.value)


@pytest.mark.parametrize(
    ("rows", "count"),
    [("0.png,1,\n1.png,2,,\n", 2), ("0.png,1\n0.png,1\n1.png,2\n", 3)],
    ids=["trailing empty cells", "same image, same label"],
)
def test_an_eval_csv_that_is_merely_untidy_is_read(images, rows, count):
    path = images / "set.csv"
    path.write_text(rows)
    assert len(read_labelled_set(path, get_spec("fastvit_t8"))) == count


def test_the_cli_refuses_a_conflicting_eval_csv_before_exporting(images, monkeypatch):
    import torch

    from mobilevit_deploy import api

    weights = images / "fastvit_t8.pt"
    torch.save(get_spec("fastvit_t8").build().state_dict(), weights)
    monkeypatch.setattr(api, "export", _no_work)
    path = images / "set.csv"
    path.write_text("0.png,1\n0.png,2\n")
    result = mvd("eval", "fastvit_t8", *SMALL, "--weights", weights, "--data", path)
    assert_user_error(result, "line 2: 0.png")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["info", "fastvit_t8", "--image-size", "100000"], "--image-size 100000x100000"),
        (["info", "fastvit_t8", "--image-size", "1000000000"], "from 1 to 4096 pixels"),
        (["info", "fastvit_t8", "--image-size", "64x8192"], "--image-size 64x8192"),
        (["info", "fastvit_t8", "--num-classes", "2000000000"], "from 0 (headless) to 100000"),
        (["export", "seaformer_tiny", "--num-classes", "99999999999"], "got 99999999999"),
        (["export", "fastvit_t8", *SMALL, "--num-classes", "-1"], "got -1"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_sizes_that_cannot_be_built_are_refused_before_torch_allocates(args, fragment, tmp_path):
    assert_user_error(mvd(*args, *(["-o", tmp_path] if args[0] == "export" else [])), fragment)
    assert list(tmp_path.iterdir()) == []


def test_the_largest_real_sizes_pass():
    assert limits.check_image_hw((1024, 2048)) == (1024, 2048)
    assert limits.check_num_classes(21_841) == 21_841
    assert limits.check_num_classes(0) == 0


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (math.nan, "--min-time must be a finite number (from 0 to 3600), got nan"),
        (math.inf, "--min-time must be a finite number (from 0 to 3600), got inf"),
        (-1.0, "--min-time must be from 0 to 3600, got -1"),
        ("1", "--min-time must be a number (from 0 to 3600), got '1'"),
    ],
)
def test_check_real_refuses_non_finite_and_out_of_range(value, message):
    with pytest.raises(BadInput, match=f"^{re.escape(message)}$"):
        limits.check_real("--min-time", value, 0, 3600)


@pytest.mark.parametrize(
    ("value", "high", "message"),
    [
        (0, None, "--min-runs must be at least 1, got 0"),
        (999, 2, "--threads must be from 1 to 2, got 999"),
        (1.5, 2, "--threads must be a whole number (from 1 to 2), got 1.5"),
        (True, 2, "--threads must be a whole number (from 1 to 2), got True"),
    ],
)
def test_check_count_refuses_out_of_range_and_non_integers(value, high, message):
    name = message.split()[0]
    with pytest.raises(BadInput, match=f"^{re.escape(message)}$"):
        limits.check_count(name, value, 1, high)


def test_checks_return_what_they_accept():
    assert limits.check_count("--threads", 2, 1, 2) == 2
    assert limits.check_real("--int8-target", 0.0, 0, 100) == 0.0
