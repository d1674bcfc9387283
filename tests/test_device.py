"""The device protocol, against a local `--device <this Python>`: the runner mvd sends
then imports this machine's numpy and runtimes, so the fast suite needs no ARM."""

from __future__ import annotations

import shlex
import sys

import numpy as np
import onnx
import pytest
from cli_helpers import VERIFY_SMALL, json_out
from onnx import TensorProto, helper

from mobilevit_deploy import device
from mobilevit_deploy.device import arm64
from mobilevit_deploy.device.stamp import core_name, device_stamp
from mobilevit_deploy.errors import BackendUnavailable, BadInput
from mobilevit_deploy.runtimes import open_runner, run_per_sample

PYTHON = shlex.quote(sys.executable)


@pytest.fixture
def onnx_file(tmp_path):
    """Two outputs of different shapes: a Relu and a sum over the channels."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])
    relu = helper.make_tensor_value_info("relu", TensorProto.FLOAT, [1, 3, 4, 4])
    total = helper.make_tensor_value_info("total", TensorProto.FLOAT, [1, 1, 4, 4])
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    graph = helper.make_graph(
        [
            helper.make_node("Relu", ["x"], ["relu"]),
            helper.make_node("ReduceSum", ["x", "axes"], ["total"], keepdims=1),
        ],
        "g",
        [x],
        [relu, total],
        [axes],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "two.onnx"
    onnx.save(model, path)
    return path


def test_runs_a_file_on_the_device_as_here(onnx_file):
    x = np.random.default_rng(0).standard_normal((1, 3, 4, 4), dtype=np.float32)
    here = open_runner("onnx", onnx_file)(x)
    runner = open_runner("onnx", onnx_file, device=PYTHON)
    there = runner(x)
    assert len(there) == 2
    for a, b in zip(here, there, strict=True):
        np.testing.assert_array_equal(a, b)
    assert runner.last_seconds > 0
    runs = runner.time(x, min_time_s=0.0, min_runs=5)
    assert len(runs) >= 5 and all(s > 0 for s in runs)
    assert runner.facts["machine"] and runner.facts["versions"]["onnxruntime"]
    assert not device.is_emulated(runner.facts)


def test_one_python_per_device_for_many_files(onnx_file):
    first = open_runner("onnx", onnx_file, device=PYTHON)
    second = open_runner("onnx", onnx_file, device=PYTHON)
    assert first._session is second._session
    assert first.handle != second.handle


def test_a_device_without_the_runtime_names_what_to_install(onnx_file, tmp_path):
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "onnxruntime.py").write_text("raise ImportError('not on this device')\n")
    dev = f"env PYTHONPATH={shlex.quote(str(blocked))} {PYTHON}"
    with pytest.raises(BackendUnavailable, match=r"has no onnxruntime: pip install onnxruntime=="):
        open_runner("onnx", onnx_file, device=dev)


def test_a_device_without_numpy_says_so(onnx_file):
    with pytest.raises(BackendUnavailable, match="has no numpy: pip install numpy there"):
        open_runner("onnx", onnx_file, device=f"{PYTHON} -S")  # -S: no site-packages


def test_a_device_that_dies_mid_run_is_one_line(onnx_file):
    dev = f"{PYTHON} -X dev"  # its own session, not the one the other tests share
    runner = open_runner("onnx", onnx_file, device=dev)
    runner._session.process.kill()
    with pytest.raises(device.DeviceLost, match="killed by signal 9") as caught:
        runner(np.zeros((1, 3, 4, 4), np.float32))
    assert caught.value.exit_code == 3 and "\n" not in str(caught.value)


def test_a_command_that_is_no_python_is_one_line(onnx_file):
    with pytest.raises(BackendUnavailable, match="cannot start no-such-python"):
        open_runner("onnx", onnx_file, device="no-such-python")
    with pytest.raises(device.DeviceLost, match=r"device 'false' .*\(exit code 1\)"):
        open_runner("onnx", onnx_file, device="false")


def test_formats_that_run_only_here_are_refused(onnx_file):
    with pytest.raises(BadInput, match="runs onnx, tflite and executorch files"):
        open_runner("coreml", onnx_file, device=PYTHON)


def test_arm64_says_how_to_build_it(tmp_path, monkeypatch):
    monkeypatch.setenv("MVD_ARM_DEVICE_DIR", str(tmp_path))
    with pytest.raises(BackendUnavailable, match="run `make arm-device`"):
        arm64.command("arm64")
    with pytest.raises(BackendUnavailable, match="unknown core 'cortex-x9'"):
        arm64.command("arm64:cortex-x9")


def test_arm64_picks_the_core(monkeypatch):
    assert arm64.core_of("arm64") == "cortex-a76"
    assert arm64.core_of("arm64:cortex-a72") == "cortex-a72"
    monkeypatch.setenv("MVD_ARM64_CPU", "neoverse-n1")
    assert arm64.core_of("arm64") == "neoverse-n1"


def test_an_emulated_core_is_named_by_its_midr_and_hwcap_not_the_hosts_cpuinfo():
    facts = {
        "machine": "aarch64",
        "cpuinfo": "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: avx2 avx512f\n",
        "midr": "0x00000000414fd0b1",
        "hwcap": ["fp", "asimd", "fphp", "asimdhp", "asimddp"],
        "qemu_cpu": "cortex-a76",
        "cpu_count": 2,
        "versions": {"onnxruntime": "1.31.1"},
    }
    stamp = device_stamp(facts)
    assert stamp["cpu_model"] == "Cortex-A76 (emulated by qemu-user)"
    assert stamp["isa"] == ["dotprod", "fp16", "neon"]
    assert stamp["emulated"] and stamp["notes"][0].startswith("fp16: computed in fp16")


def test_a_real_board_is_named_from_its_cpuinfo():
    cpuinfo = "processor\t: 0\nFeatures\t: fp asimd crc32\nCPU part\t: 0xd08\n"
    stamp = device_stamp({"machine": "aarch64", "cpuinfo": cpuinfo, "midr": "", "hwcap": []})
    assert stamp["isa"] == ["neon"] and not stamp["emulated"]
    assert stamp["cpu_model"] == "Cortex-A72"
    assert core_name("0x00000000410fd083") == "Cortex-A72"


def test_verify_runs_the_files_on_the_device_and_judges_here():
    report = json_out(*VERIFY_SMALL, "--formats", "onnx", "--device", PYTHON, "--json", "-")
    assert report["passed"]
    assert any(n.startswith(f"files ran on the device {PYTHON!r}") for n in report["notes"])


def test_doctor_describes_a_device():
    data = json_out("doctor", "--device", PYTHON, "--json", "-")
    assert data["machine"]["arch"] and not data["emulated"]
    assert {f["name"] for f in data["formats"]} == {"onnx", "tflite", "executorch"}
    assert "not_on_this_platform" in json_out("doctor", "--json", "-")


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_a_tflite_file_runs_on_the_device_as_here(tmp_path, precision):
    """The default TFLite file (NHWC, the normalisation inside, int8 input and output at
    int8): the device's runner feeds and reads it as runtimes/litert.py does."""
    from mobilevit_deploy import api
    from mobilevit_deploy.images import natural_images, to_model_input

    artifact = api.export(
        "fastvit_t8", "tflite", output=tmp_path / "m.tflite", image_size=64, precision=precision
    )
    spec = api.load_model("fastvit_t8", image_size=64).mvd_spec
    x = to_model_input(natural_images(2, (64, 64), 0), spec)
    here = run_per_sample(open_runner("tflite", artifact.path), x)
    there = run_per_sample(open_runner("tflite", artifact.path, device=PYTHON), x)
    np.testing.assert_array_equal(here, there)


@pytest.mark.slow
def test_eval_scores_the_files_on_the_device(tmp_path):
    from test_eval import SMALL, shapes_checkpoint, write_folder

    from mobilevit_deploy.evaluate import evaluate

    checkpoint = shapes_checkpoint(tmp_path / "fastvit_t8_3cls.pt")
    folder = write_folder(tmp_path / "set")
    here = evaluate("fastvit_t8", weights=checkpoint, data=folder, **SMALL)
    there = evaluate("fastvit_t8", weights=checkpoint, data=folder, device=PYTHON, **SMALL)
    assert [c.candidate for c in there.candidates] == ["torch", "onnx fp32"]
    assert there.candidates[1].metrics["top1"] == here.candidates[1].metrics["top1"]
    assert there.candidates[1].agreement == 1.0
