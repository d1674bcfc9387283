"""One request for every command: the shared option group, checked once, before any work."""

from __future__ import annotations

import inspect
import os

import pytest
from cli_helpers import assert_user_error, mvd

from mobilevit_deploy.cli import app
from mobilevit_deploy.cli_options import SHARED
from mobilevit_deploy.exporters.formats import all_options
from mobilevit_deploy.request import Request

# The commands that build a model or make files: each takes the whole group.
SHARED_COMMANDS = ("export", "verify", "bench", "eval", "report", "reparam", "info")


def test_every_command_takes_the_whole_shared_group():
    """A command that lacks an option of the group fails here, by name."""
    wanted = set(SHARED) | {f.name for _, f in all_options()}
    for command in app.registered_commands:
        name = command.name or command.callback.__name__
        if name not in SHARED_COMMANDS:
            continue
        params = set(inspect.signature(command.callback).parameters)
        missing = sorted(wanted - params)
        assert not missing, f"mvd {name} lacks {missing}"
    listed = {c.name or c.callback.__name__ for c in app.registered_commands}
    assert set(SHARED_COMMANDS) <= listed


@pytest.mark.parametrize(
    "args, fragments",
    [
        (("bench", "fastvit_t8", "--threads", "-1"), ("--threads", "from 1")),
        (("report", "fastvit_t8", "--threads", "-2"), ("--threads",)),
        (("bench", "fastvit_t8", "--threads", "999"), ("--threads",)),
        (("bench", "fastvit_t8", "--min-runs", "0"), ("--min-runs",)),
        (("bench", "fastvit_t8", "--min-time", "-1"), ("--min-time",)),
        (("bench", "fastvit_t8", "--min-time", "nan"), ("--min-time", "finite")),
        (("bench", "fastvit_t8", "--min-time", "inf"), ("--min-time", "finite")),
        (("export", "fastvit_t8", "--precision", "int8", "--int8-target", "nan"), ("finite",)),
        (("export", "fastvit_t8", "--precision", "int8", "--int8-target", "-10"), ("from 0",)),
        (("verify", "fastvit_t8", "--formats", ","), ("no format",)),
        (("verify", "fastvit_t8", "--formats", "onnx,onnx"), ("onnx given twice",)),
        (("info", "fastvit_t8", "--image-size", "100000"), ("--image-size", "4096")),
        (("info", "fastvit_t8", "--image-size", "1000000000"), ("--image-size",)),
        (("info", "fastvit_t8", "--num-classes", "2000000000"), ("--num-classes",)),
        (("export", "seaformer_tiny", "--num-classes", "99999999999"), ("--num-classes",)),
        (("export", "fastvit_t8", "--stages", "1,2"), ("--features",)),
        (("reparam", "fastvit_t8", "-o", "x.pt", "--int8-target", "30"), ("reparam",)),
        (("info", "fastvit_t8", "--opset", "13"), ("--opset", "info")),
        (("export", "fastvit_t8", "--precision", "fp16,int8"), ("one",)),
        (("export", "fastvit_t8", "--device", "python3"), ("--device",)),
        (("verify", "fastvit_t8", "--formats", "onnx", "--nhwc"), ("--nhwc", "tflite")),
        (("verify", "fastvit_t8", "--formats", "onnx,tensorrt"), ("tensorrt",)),
        (("verify", "fastvit_t8", "--json", "."), ("directory",)),
        (("bench", "fastvit_t8", "--markdown", "."), ("directory",)),
        (("export", "fastvit_t8", "-o", "model.tflite"), ("tflite",)),
    ],
)
def test_bad_requests_are_one_line_before_any_work(monkeypatch, tmp_path, args, fragments):
    """Found late, these errors came after minutes of exporting and timing."""
    import mobilevit_deploy.api as api_module

    def no_loading(*_args, **_kwargs):
        raise AssertionError("the model was loaded before the request was checked")

    monkeypatch.setattr(api_module, "load_model", no_loading)
    monkeypatch.chdir(tmp_path)
    assert_user_error(mvd(*args), *fragments)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root")
@pytest.mark.parametrize(
    "args",
    [
        ("export", "fastvit_t8", "-o", "/proc/x.onnx"),
        ("export", "fastvit_t8", "-o", "/sys/kernel/x.onnx"),
        ("reparam", "fastvit_t8", "-o", "/proc/x.pt"),
        ("verify", "fastvit_t8", "--junit", "/proc/x.xml"),
        ("eval", "fastvit_t8", "--data", ".", "--markdown", "/proc/x.md"),
        ("bench", "fastvit_t8", "--plot", "/proc/x.png"),
        ("info", "fastvit_t8", "--json", "/proc/x.json"),
    ],
)
def test_unwritable_outputs_are_refused_before_any_work(monkeypatch, args):
    """Root passes os.access on /proc and /sys; only writing tells."""
    import mobilevit_deploy.api as api_module

    monkeypatch.setattr(api_module, "load_model", lambda *a, **k: pytest.fail("loaded"))
    assert_user_error(mvd(*args), "/")


def test_the_request_parses_and_checks_its_values():
    request = Request.of(image_size="64x96", precisions="fp16,int8", calibration_images="8")
    assert request.image_size == (64, 96)
    assert request.precisions == ("fp16", "int8")
    assert request.calibration_images == 8
    assert Request.of(opset=13).format_options == {"opset": 13}
    with pytest.raises(TypeError, match="unexpected keyword"):
        Request.of(imagesize=64)


def test_json_path_means_the_same_in_every_command(tmp_path):
    """`--json -` prints, `--json PATH` writes; no command has a flag of that name."""
    for command in ("list", "doctor"):
        assert mvd(command, "--json", "-").stdout.lstrip().startswith(("[", "{"))
    out = tmp_path / "list.json"
    result = mvd("list", "--json", out)
    assert result.exit_code == 0 and out.read_text().startswith("[")
