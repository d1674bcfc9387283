"""OpenVINO as a runtime of the ONNX files: equivalence with onnxruntime under stress
weights, bf16 where the CPU has it, the precisions the CPU reports, doctor's row, and
the decision table of `mvd bench`."""

import json
import platform

import numpy as np
import pytest
import torch
from conftest import stressed, test_inputs
from rich.console import Console
from typer.testing import CliRunner

from mobilevit_deploy import api
from mobilevit_deploy.bench import benchmark, fastest_passing, render
from mobilevit_deploy.cli import app
from mobilevit_deploy.errors import BackendUnavailable, BadInput
from mobilevit_deploy.images import natural_images, to_model_input
from mobilevit_deploy.info import runtime_rows
from mobilevit_deploy.judge import REDUCED_PRECISION, bound_for
from mobilevit_deploy.machine import machine_stamp
from mobilevit_deploy.metrics import compare
from mobilevit_deploy.runtimes import openvino as ov_runtime
from mobilevit_deploy.runtimes.onnxruntime import OrtRunner
from mobilevit_deploy.runtimes.openvino import OpenVINORunner, inference_precisions
from mobilevit_deploy.runtimes.torch_runtime import TorchRunner
from mobilevit_deploy.stress import apply_stress_weights

pytest.importorskip("openvino")

NAME, SIZE = "fastvit_t8", 64
NO_BF16 = "this CPU has no native bf16 (OpenVINO's OPTIMIZATION_CAPABILITIES lacks BF16)"


def run_per_sample(runner, x):
    """One image at a time, as the files are exported (batch 1)."""
    return np.concatenate([runner(x[i : i + 1]) for i in range(len(x))])


@pytest.fixture(scope="module")
def fused(tmp_path_factory):
    """A stressed FastViT-T8, its fused fp32 ONNX file, inputs and the float64 reference."""
    model = stressed(NAME, SIZE)
    x = test_inputs(NAME, SIZE, count=4, seed=3)
    path = tmp_path_factory.mktemp("openvino") / "t8.onnx"
    api.export(NAME, model=model, output=path, image_size=SIZE)
    return path, x, TorchRunner(model, torch.float64)(x)


def test_fp32_matches_onnxruntime(fused):
    path, x, reference = fused
    runner = OpenVINORunner(path, threads=1)
    got = run_per_sample(runner, x)
    assert compare(run_per_sample(OrtRunner(path), x), got)["max_rel"] < 1e-5
    assert compare(reference, got)["max_rel"] < 1e-5
    # Asked for, not left to the plugin: on bf16 CPUs its default is bf16.
    assert str(runner.compiled.get_property("INFERENCE_PRECISION_HINT")) == "<Type: 'float32'>"
    assert runner.options["inference_num_threads"] == 1
    assert runner.options["performance_hint"] == "LATENCY"


def test_bf16_is_computed_in_bf16(fused):
    if "bf16" not in inference_precisions():
        pytest.skip(NO_BF16)
    path, x, reference = fused
    runner = OpenVINORunner(path, threads=1, precision="bf16")
    assert str(runner.compiled.get_property("INFERENCE_PRECISION_HINT")) == "<Type: 'bfloat16'>"
    metrics = compare(reference, run_per_sample(runner, x))
    # 8 mantissa bits: well below fp32's ~130 dB, far above a broken graph.
    assert 30 < metrics["psnr_db"] < 80, metrics


def test_several_outputs_come_back_as_a_tuple_in_graph_order(tmp_path):
    model = api.load_model(NAME, image_size=SIZE, features=True)
    calibration = to_model_input(natural_images(4, SIZE, 1), model.mvd_spec)
    apply_stress_weights(model, torch.from_numpy(calibration))
    path = api.export(NAME, model=model, output=tmp_path / "f.onnx", image_size=SIZE).path
    x = test_inputs(NAME, SIZE, count=1)
    got, want = OpenVINORunner(path, 1)(x), OrtRunner(path)(x)
    assert isinstance(got, tuple) and len(got) == len(want) == 4
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        assert compare(w, g, "features")["max_rel"] < 1e-5


@pytest.mark.slow
def test_int8_qdq_file_runs_as_onnxruntime_runs_it(tmp_path):
    model = stressed(NAME, SIZE)
    x = test_inputs(NAME, SIZE, count=4, seed=3)
    artifact = api.export(
        NAME, model=model, output=tmp_path / "q.onnx", image_size=SIZE, precision="int8"
    )
    path = artifact.path
    reference = TorchRunner(model, torch.float64)(x)
    openvino = compare(reference, run_per_sample(OpenVINORunner(path, 1), x))["psnr_db"]
    onnxruntime = compare(reference, run_per_sample(OrtRunner(path), x))["psnr_db"]
    # Both dequantize the same scales; their integer kernels round differently.
    assert abs(openvino - onnxruntime) < 3.0, (openvino, onnxruntime)
    assert openvino > artifact.metadata["int8_target_db"] - 3.0


class _Plugin:
    """Stands in for ov.Core: answers OPTIMIZATION_CAPABILITIES with a chosen list."""

    def __init__(self, capabilities):
        self.capabilities = capabilities

    def get_property(self, device, name):
        assert (device, name) == ("CPU", "OPTIMIZATION_CAPABILITIES")
        return self.capabilities


def test_a_cpu_without_bf16_or_fp16_reports_none_and_refuses_them(fused, monkeypatch):
    monkeypatch.setattr(ov_runtime, "_core", lambda: _Plugin(["FP32", "INT8", "BIN"]))
    assert inference_precisions() == ()
    for precision in ("bf16", "fp16"):
        with pytest.raises(BadInput, match=f"no native {precision}"):
            OpenVINORunner(fused[0], precision=precision)
    monkeypatch.setattr(ov_runtime, "_core", lambda: _Plugin(["BF16", "FP32", "FP16", "INT8"]))
    assert inference_precisions() == ("bf16", "fp16")
    with pytest.raises(BadInput, match="not int4"):
        OpenVINORunner(fused[0], precision="int4")


def test_this_cpu_reports_the_bf16_its_flags_have():
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the bf16 flag maps to OpenVINO's BF16 on x86 only")
    if "bf16" not in machine_stamp()["isa"]:
        pytest.skip("this CPU has no avx512_bf16 / amx_bf16 flag")
    assert "bf16" in inference_precisions()


# --- doctor -------------------------------------------------------------------------


def test_doctor_lists_openvino_with_the_cpus_precisions():
    result = CliRunner().invoke(app, ["doctor", "--json", "-"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    rows = {r["name"]: r for r in data["runtimes"]}
    assert list(rows) == ["onnxruntime", "openvino", "coremltools", "litert", "executorch"]
    openvino = rows["openvino"]
    assert openvino["runs"] == "onnx" and openvino["install"] is None
    assert openvino["version"] == data["machine"]["versions"]["openvino"]
    assert openvino["version"].startswith("2026.4")
    assert openvino["inference_precisions"] == list(inference_precisions())
    assert rows["coremltools"]["runs"] == "coreml (macOS only)"
    assert "inference_precisions" not in rows["onnxruntime"]
    table = CliRunner().invoke(app, ["doctor"]).stdout
    assert "runtimes" in table and "openvino" in table


def test_a_runtime_not_installed_is_named_with_its_install_hint():
    rows = {r["name"]: r for r in runtime_rows({"onnxruntime": "1.31.1"})}
    assert rows["onnxruntime"]["version"] == "1.31.1"
    assert rows["openvino"] == {
        "name": "openvino",
        "runs": "onnx",
        "version": None,
        "install": "pip install 'mobilevit_deploy[openvino]'",
        "inference_precisions": None,
    }
    assert rows["litert"]["install"] == "pip install 'mobilevit_deploy[tflite]'"


# --- the decision table of `mvd bench` ----------------------------------------------


def test_the_int8_bound_is_the_files_target_else_the_floor():
    floor = REDUCED_PRECISION["int8"]["min_psnr_db"]
    assert bound_for("int8", record={"int8_target_db": 34.5}).limit == 34.5
    assert bound_for("int8", record={"int8_target_db": None}).limit == floor
    assert bound_for("int8", record={}).limit == floor


def test_fastest_passing_skips_failures_and_torch_eager():
    rows = [
        {"runtime": "torch eager", "runtime_name": "torch", "passed": True, "median_ms": 1.0},
        {"runtime": "broken", "runtime_name": "openvino", "passed": False, "median_ms": 2.0},
        {"runtime": "slow", "runtime_name": "onnxruntime", "passed": True, "median_ms": 9.0},
        {"runtime": "fast", "runtime_name": "litert", "passed": True, "median_ms": 5.0},
    ]
    assert fastest_passing(rows) == "fast"
    assert fastest_passing(rows[:2]) is None


@pytest.fixture(scope="module")
def decided():
    """A bench of onnxruntime, OpenVINO (fp32 and bf16) and torch eager, with the
    OpenVINO fp32 runner broken: it answers instantly with constant logits, so it is
    the fastest row of all and must still not be chosen."""
    real = ov_runtime.OpenVINORunner

    def runner(path, threads=None, precision="fp32"):
        made = real(path, threads, precision)
        if precision != "fp32":
            return made
        return lambda x: np.full((len(x), 1000), 0.5, np.float32)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ov_runtime, "OpenVINORunner", runner)
        return benchmark(
            NAME,
            image_size=SIZE,
            threads=1,
            min_time_s=0.05,
            min_runs=3,
            runtimes=("onnxruntime", "openvino", "torch"),
            precisions=("fp32", "bf16"),
        )


BROKEN = "openvino, fused (mvd)"


def test_bench_marks_the_fastest_passing_row_and_never_a_failing_one(decided):
    rows = {r["runtime"]: r for r in decided["results"]}
    broken = rows[BROKEN]
    assert broken["passed"] is False and broken["psnr_db"] < 20
    assert broken["median_ms"] == min(r["median_ms"] for r in rows.values())
    chosen = rows[decided["fastest_passing"]]
    assert decided["fastest_passing"] != BROKEN
    assert chosen["passed"] is True and chosen["runtime_name"] != "torch"
    deployable = [r for r in rows.values() if r["passed"] and r["runtime_name"] != "torch"]
    assert chosen["median_ms"] == min(r["median_ms"] for r in deployable)


def test_bench_rows_carry_their_accuracy_bound_and_size(decided):
    rows = {r["runtime"]: r for r in decided["results"]}
    for label, row in rows.items():
        assert {"precision", "runtime_name", "psnr_db", "agreement", "passed", "bound"} <= set(row)
        if row["runtime_name"] == "torch":
            assert row["file_bytes"] is None
        else:
            assert row["file_bytes"] > 1e6, label  # a T8 file is ~15 MiB
    for label in ("torch eager, unfused", "torch eager, fused (mvd)", decided["baseline"]):
        assert rows[label]["precision"] == "fp32" and rows[label]["bound"] == "1e-05"
        assert rows[label]["passed"] is True and rows[label]["psnr_db"] > 100
    assert rows["onnxruntime, fused (mvd)"]["runtime_name"] == "onnxruntime"
    if "bf16" in inference_precisions():
        bf16 = rows["openvino, fused bf16 (mvd)"]
        assert bf16["runtime_name"] == "openvino" and bf16["precision"] == "bf16"
        assert bf16["bound"] == ">=40dB, agree>=0.9"
        assert 30 < bf16["psnr_db"] < 80 and bf16["agreement"] == 1.0
        # OpenVINO computes bf16 from the fp32 file: the size of the file it ran.
        assert bf16["file_bytes"] == rows[BROKEN]["file_bytes"]
        assert decided["skipped"] == []
    else:
        assert decided["skipped"] == ["openvino bf16: this CPU has no native bf16"]


def test_bench_table_shows_accuracy_and_marks_the_fastest(decided):
    console = Console(record=True, width=160)
    render(decided, console)
    text = console.export_text()
    decision = text[text.index("accuracy vs torch unfused (fp64)") :].splitlines()
    assert "PSNR dB" in decision[2] and "agree" in decision[2] and "MiB" in decision[2]

    def verdict(label):
        row = next(ln for ln in decision if f"│ {label} " in ln)
        return row.rstrip().rstrip("│").split("│")[-1].strip()

    assert verdict(decided["fastest_passing"]) == "fastest"
    assert verdict(BROKEN) == "FAIL"
    assert verdict("torch eager, fused (mvd)") == "pass"


def test_bench_without_openvino_names_the_extra_before_any_work(monkeypatch):
    monkeypatch.setattr(ov_runtime, "available", lambda: False)
    with pytest.raises(BackendUnavailable, match=r"mobilevit_deploy\[openvino\]"):
        benchmark(NAME, image_size=SIZE, runtimes=("onnxruntime", "openvino"))


def test_bf16_is_a_bench_precision_that_other_runtimes_skip():
    with pytest.raises(BadInput, match="unknown precision"):
        benchmark(NAME, image_size=SIZE, precisions=("fp32", "fp8"))
    args = ["bench", NAME, "--image-size", "64", "--runtime", "onnxruntime"]
    args += ["--precisions", "fp32,bf16", "--min-time", "0.05", "--min-runs", "3"]
    result = CliRunner().invoke(app, [*args, "--threads", "1", "--json", "-"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [r["runtime"] for r in data["results"]] == [data["baseline"], "onnxruntime, fused (mvd)"]
    assert data["skipped"] == ["bf16: only the openvino runtime runs it (--runtime openvino)"]
    assert data["fastest_passing"] in {r["runtime"] for r in data["results"]}
