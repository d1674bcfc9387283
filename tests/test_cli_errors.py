"""The `mvd` command line on bad input: exit 2 (3 for a missing backend) and one
`error:` line on stderr, never a traceback, and nothing left behind; and the entry
points (`python -m`, `--help` without heavy imports).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import SMALL, VERIFY_SMALL, assert_user_error, mvd, no_partial_files

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- errors: exit 2 and one line, never a traceback ---------------------------------


def test_unknown_model_suggests_close_names():
    message = assert_user_error(mvd("info", "fastvit_sa13"), "fastvit_sa13", "Did you mean")
    assert "fastvit_sa12" in message
    # The closest name comes first.
    assert message.index("fastvit_sa12") < message.index("fastvit_sa36")


@pytest.mark.parametrize("command", ["export", "reparam", "verify", "bench"])
def test_unknown_model_in_every_command(tmp_path, command):
    extra = ["-o", tmp_path / "out.pt"] if command == "reparam" else []
    assert_user_error(mvd(command, "fastvit_sa13", *extra), "Did you mean fastvit_sa12")


def test_missing_weights_file(tmp_path):
    missing = tmp_path / "nope.pt"
    assert_user_error(
        mvd("export", "fastvit_t8", "--weights", missing, "-o", tmp_path / "m.onnx", *SMALL),
        str(missing),
        "no such file",
    )
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_corrupt_checkpoint(tmp_path, suffix):
    junk = tmp_path / f"junk{suffix}"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    out = tmp_path / "m.onnx"
    assert_user_error(mvd("export", "fastvit_t8", "--weights", junk, "-o", out), str(junk))
    assert not out.exists()


def test_random_bytes_are_not_called_pickled_code(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    message = assert_user_error(mvd("export", "fastvit_t8", "--weights", junk))
    assert "pickled code" not in message


def test_checkpoint_that_does_not_fit(tmp_path):
    ckpt = tmp_path / "foreign.safetensors"
    from safetensors.torch import save_file

    save_file({"stem.0.weight": torch.zeros(1)}, str(ckpt))
    assert_user_error(
        mvd("export", "fastvit_t8", "--weights", ckpt, "-o", tmp_path / "m.onnx"),
        "does not fit the model",
        "missing keys",
        "unexpected keys: stem.0.weight",
    )


def test_output_under_a_file(tmp_path):
    """Works as root too: no permission bit makes a file a directory."""
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a directory")
    assert_user_error(
        mvd("export", "fastvit_t8", *SMALL, "-o", blocker / "out.onnx"),
        "file.txt exists and is not a directory",
    )
    assert blocker.read_text() == "not a directory"
    assert no_partial_files(tmp_path)


@pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only dirs"
)
def test_unwritable_output_directory(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        result = mvd("export", "fastvit_t8", *SMALL, "-o", locked / "out.onnx")
        assert_user_error(result, str(locked), "not writable")
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)


def test_unwritable_output_directory_as_seen_by_access(tmp_path, monkeypatch):
    """The same check where root ignores permission bits: os.access says no for one dir."""
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access

    def access(path, mode, *args, **kwargs):
        if Path(path) == locked and mode & os.W_OK:
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)
    result = mvd("reparam", "fastvit_t8", "-o", locked / "x.pt")
    assert_user_error(result, f"output directory {locked} is not writable")
    assert list(locked.iterdir()) == []


@pytest.mark.parametrize("command", ["export", "info", "verify", "bench"])
def test_image_size_not_a_multiple_of_the_stride(command):
    assert_user_error(
        mvd(command, "fastvit_t8", "--image-size", "250"), "250x250", "multiples of 32"
    )


def test_image_size_not_a_number():
    assert_user_error(mvd("export", "fastvit_t8", "--image-size", "big"), "'big'", "HxW")


def test_unknown_format():
    assert_user_error(
        mvd("export", "fastvit_t8", "--format", "tensorrt"), "unknown format 'tensorrt'", "onnx"
    )


def test_a_missing_backend_names_the_extra_and_exits_3(monkeypatch):
    import dataclasses

    from mobilevit_deploy.exporters import formats

    gone = dataclasses.replace(formats.FORMATS["coreml"], python_modules=("no_such_module_x",))
    monkeypatch.setitem(formats.FORMATS, "coreml", gone)
    result = mvd("export", "fastvit_t8", "--format", "coreml")
    assert result.exit_code == 3, result.output
    assert "pip install 'mobilevit_deploy[coreml]'" in result.stderr
    assert "Traceback" not in result.output


def test_unsupported_precision():
    assert_user_error(mvd("export", "fastvit_t8", "--precision", "fp8"), "fp8", "fp32, fp16, int8")


def test_unknown_runtime():
    assert_user_error(
        mvd("bench", "fastvit_t8", "--runtime", "tensorrt"), "tensorrt", "onnxruntime"
    )


def test_unknown_pretrained_tag():
    assert_user_error(
        mvd("export", "fastvit_t8", "--pretrained", "nosuch"), "'nosuch'", "in1k_reparam"
    )


def test_weights_and_pretrained_together(tmp_path):
    assert_user_error(
        mvd("export", "fastvit_t8", "--pretrained", "in1k", "--weights", tmp_path / "x.pt"),
        "either --weights or --pretrained",
    )


def test_reparam_output_suffix(tmp_path):
    out = tmp_path / "x.onnx"
    assert_user_error(mvd("reparam", "fastvit_t8", "-o", out), str(out), ".safetensors")
    assert not out.exists()


def test_out_of_range_opset():
    assert_user_error(mvd("export", "fastvit_t8", "--opset", "99"), "opset 99", "13 to 20")


def test_directory_as_weights(tmp_path):
    assert_user_error(mvd("export", "fastvit_t8", "--weights", tmp_path), "is a directory")


def test_unknown_family():
    assert_user_error(mvd("list", "--family", "resnet"), "unknown family 'resnet'", "fastvit")


def test_zero_images():
    assert_user_error(mvd("verify", "fastvit_t8", "--num-images", "0"), "--num-images", "from 1")


def test_missing_images_folder(tmp_path):
    assert_user_error(mvd(*VERIFY_SMALL, "--images", tmp_path / "none"), "not a directory")


def test_missing_argument_is_a_usage_error():
    result = mvd("export")
    assert result.exit_code == 2
    assert "Missing argument" in result.stderr


# --- entry points ---------------------------------------------------------------


def test_python_dash_m_help():
    proc = subprocess.run(
        [sys.executable, "-m", "mobilevit_deploy", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    for command in ("list", "info", "reparam", "export", "verify", "bench", "doctor"):
        assert command in proc.stdout


_IMPORT_SPY = """
import json, sys

HEAVY = ("torch", "onnx", "onnxruntime", "onnxslim", "coremltools", "litert_torch",
         "ai_edge_litert")
attempted = []

class Spy:  # sees every import attempt, including of packages not installed here
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HEAVY:
            attempted.append(name)
        return None

sys.meta_path.insert(0, Spy())
from typer.testing import CliRunner
from mobilevit_deploy.cli import app

codes = [CliRunner().invoke(app, args).exit_code for args in (["--help"], ["export", "--help"])]
loaded = sorted(m for m in sys.modules if m.split(".")[0] in HEAVY)
print(json.dumps({"codes": codes, "attempted": sorted(set(attempted)), "loaded": loaded,
                  "coremltools": "coremltools" in sys.modules}))
"""


def test_help_imports_no_heavy_or_optional_backend():
    proc = subprocess.run(
        [sys.executable, "-c", _IMPORT_SPY], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    assert data["codes"] == [0, 0]
    assert data["coremltools"] is False
    assert data["attempted"] == []
    assert data["loaded"] == []


def test_an_option_is_none_only_where_none_is_its_default():
    """`min_target=None` used to pass the choices check and reach the exporter."""
    from mobilevit_deploy import api
    from mobilevit_deploy.errors import BadInput

    with pytest.raises(BadInput, match="--min-target None is not supported"):
        api.export("fastvit_t8", "coreml", min_target=None)
    with pytest.raises(BadInput, match="--opset None"):
        api.export("fastvit_t8", "onnx", opset=None)
