"""Report writers and the bench report's schema (never its timings)."""

import json
import xml.etree.ElementTree as ET

import pytest

from mobilevit_deploy.bench import BASELINE, benchmark
from mobilevit_deploy.errors import BadInput
from mobilevit_deploy.metrics import Metrics
from mobilevit_deploy.plots import _short_label, plot_bench, plot_zoo
from mobilevit_deploy.report import (
    bench_markdown,
    verify_markdown,
    write_json,
    write_verify_junit,
)
from mobilevit_deploy.verify import PairResult, VerifyReport

RESULT_KEYS = {
    "runtime",
    "median_ms",
    "p90_ms",
    "min_ms",
    "mean_ms",
    "std_ms",
    "throughput_per_s",
    "n_total",
    "n_clipped",
    "samples_ms",
    "ratio_to_baseline",
    "gflops",
    "percent_of_peak",
    # The decision table: each row's accuracy against the float64 reference.
    "precision",
    "runtime_name",
    "max_rel",
    "psnr_db",
    "agreement",
    "passed",
    "bound",
    "file_bytes",
}


@pytest.fixture(scope="module")
def bench_report():
    return benchmark(
        "fastvit_t8", image_size=64, min_time_s=0.05, min_runs=3, runtimes=("onnxruntime",)
    )


def test_bench_report_schema(bench_report, tmp_path):
    r = bench_report
    assert {
        "model",
        "image_size",
        "batch",
        "threads",
        "onnxruntime_session",
        "baseline",
        "machine",
        "machine_line",
        "macs_per_image",
        "matmul_peak_gflops",
        "stopping",
        "results",
        "accuracy_inputs",
        "fastest_passing",
        "skipped",
    } <= set(r)
    assert r["image_size"] == [64, 64] and r["batch"] == 1
    assert r["stopping"] == {"min_runs": 3, "min_time_s": 0.05}
    assert all(x["n_total"] >= 3 for x in r["results"])
    assert r["onnxruntime_session"]["graph_optimization_level"] == "all"
    assert r["onnxruntime_session"]["allow_spinning"] is False
    assert [x["runtime"] for x in r["results"]] == [BASELINE, "onnxruntime, fused (mvd)"]
    for result in r["results"]:
        assert set(result) >= RESULT_KEYS
        assert result["p90_ms"] >= result["median_ms"] >= result["min_ms"] > 0
        assert result["gflops"] == pytest.approx(
            2 * r["macs_per_image"] / 1e9 / (result["median_ms"] / 1e3)
        )
    assert r["results"][0]["ratio_to_baseline"] == 1.0
    assert all(x["passed"] and x["precision"] == "fp32" for x in r["results"])
    fastest = min(r["results"], key=lambda x: x["median_ms"])["runtime"]
    assert r["fastest_passing"] == fastest and r["skipped"] == []
    path = write_json(tmp_path / "b.json", r)
    assert json.loads(path.read_text())["model"] == "fastvit_t8"


def test_unknown_runtime_is_bad_input():
    with pytest.raises(BadInput, match="unknown runtime"):
        benchmark("fastvit_t8", image_size=64, runtimes=("tensorrt",))


def test_bench_markdown_and_plots(bench_report, tmp_path):
    text = bench_markdown(bench_report)
    assert "| runtime | median ms |" in text and "1.00x" in text
    assert bench_report["machine_line"] in text
    for path in (
        plot_bench(bench_report, tmp_path / "b.png"),
        plot_zoo(
            [
                {"name": "m", "gmacs": 1.0, "params_m": 2.0, "unfused_ms": 3.0, "fused_ms": 2.0},
                {
                    "name": "seaformer_seg_tiny_ade20k",
                    "task": "segmentation",
                    "input": "256x256",
                    "gmacs": 0.1,
                    "params_m": 1.7,
                    "unfused_ms": 5.0,
                    "fused_ms": 4.0,
                },
            ],
            tmp_path / "z.png",
        ),
    ):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _verify_report(passed: bool) -> VerifyReport:
    metrics = Metrics(
        max_abs=1e-6,
        max_rel=2e-7 if passed else 3e-3,
        cosine=1.0,
        psnr_db=float("inf"),
        agreement=1.0,
        near_ties=0.0,
        decisive_agreement=1.0,
        decisive=2,
        top5=1.0,
    )
    pair = PairResult("onnx fused", "fp32", 1e-5, metrics, passed)
    return VerifyReport("fastvit_t8", (64, 64), "stress", "2 images", [pair])


@pytest.mark.parametrize("passed", [True, False])
def test_verify_json_junit_markdown(tmp_path, passed):
    report = _verify_report(passed)
    data = json.loads(write_json(tmp_path / "v.json", report.to_dict()).read_text())
    assert data["passed"] is passed
    assert data["pairs"][0]["metrics"]["psnr_db"] == "inf"  # JSON has no Infinity
    suite = ET.parse(write_verify_junit(tmp_path / "v.xml", report)).getroot()
    assert suite.get("tests") == "2" and suite.get("failures") == ("0" if passed else "1")
    failures = suite.findall("testcase/failure")
    assert bool(failures) is not passed
    assert ("FAIL" in verify_markdown(report)) is not passed


def test_zoo_plot_labels_tell_variants_apart():
    """Colour says the family; the label keeps the variant, dataset and input size."""
    seg = {"name": "efficientvit_seg_b0_cityscapes", "task": "segmentation", "input": "512x1024"}
    assert _short_label(seg) == "b0 City 512x1024"
    assert _short_label({"name": "levit_128s", "task": "classification"}) == "128s"
