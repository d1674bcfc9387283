"""benchmarks/run_zoo.py's summary, table and header, on fake mvd bench reports (the
numbers themselves come from the real benchmark, tested elsewhere): the fastest
verified candidate beside the plain export, "none passed", the ISA sentence, and
--resume re-running a record that did not measure what is asked."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from torch import nn

from mobilevit_deploy.bench import BASELINE, fastest_passing

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "run_zoo.py"
NO_BF16 = {"arch": "x86_64", "isa": ["avx", "avx2", "fma"]}
SAPPHIRE = {"arch": "x86_64", "isa": ["amx", "avx", "avx2", "avx512f", "bf16", "fma", "vnni"]}


@pytest.fixture(scope="module")
def run_zoo():
    spec = importlib.util.spec_from_file_location("run_zoo", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def row(label, runtime, precision, ms, *, passed=True, psnr=120.0, agreement=1.0):
    return {
        "runtime": label,
        "runtime_name": runtime,
        "precision": precision,
        "median_ms": ms,
        "ratio_to_baseline": ms / 10.0,
        "gflops": 50.0,
        "psnr_db": psnr,
        "agreement": agreement,
        "passed": passed,
        "bound": "b",
        "file_bytes": 1000,
    }


def fake_report(*, openvino_passes=True, fused_passes=True, stamp=NO_BF16, skipped=()):
    """A classifier's report: plain 10 ms, fused 8, openvino bf16 5.1 (49.9 dB),
    onnxruntime int8 4 ms but failing, torch eager 3 ms (never chosen)."""
    rows = [
        row(BASELINE, "onnxruntime", "fp32", 10.0),
        row("onnxruntime, fused (mvd)", "onnxruntime", "fp32", 8.0, passed=fused_passes),
        row(
            "openvino, fused bf16 (mvd)",
            "openvino",
            "bf16",
            5.1,
            passed=openvino_passes,
            psnr=49.94,
        ),
        row("onnxruntime, fused int8 (mvd)", "onnxruntime", "int8", 4.0, passed=False, psnr=20.0),
        row("torch eager, unfused", "torch", "fp32", 3.5),
        row("torch eager, fused (mvd)", "torch", "fp32", 3.0),
    ]
    return {
        "model": "tiny",
        "image_size": [32, 32],
        "threads": 2,
        "machine": stamp,
        "machine_line": "Fake CPU (x86_64, 2 cores)",
        "macs_per_image": 2e8,
        "matmul_peak_gflops": 188.0,
        "stopping": {"min_runs": 20, "min_time_s": 0.05},
        "accuracy_inputs": "8 natural-looking images",
        "results": rows,
        "fastest_passing": fastest_passing(rows),
        "skipped": list(skipped),
        "zoo_candidates": {
            "runtimes": ["onnxruntime", "openvino", "torch"],
            "precisions": ["fp32", "int8", "bf16"],
        },
    }


SPEC = SimpleNamespace(
    name="tiny",
    task="classification",
    build=lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)),
)


def test_the_fastest_verified_candidate_is_named_beside_the_plain_export(run_zoo):
    summary = run_zoo.summarize(fake_report(), SPEC)
    cells = dict(zip(run_zoo.HEADERS, run_zoo.table_row(summary, 200.0), strict=True))
    # Torch eager (3 ms) is never chosen and int8 (4 ms) failed its bound.
    assert cells["fastest verified"] == "openvino bf16"
    assert cells["verified ms (vs plain)"] == "5.1 (0.51x)"
    assert cells["verified PSNR dB"] == "49.9"
    # The existing columns stay.
    assert cells["ORT unfused ms"] == "10.0"
    assert cells["ORT fused ms"] == "8.0"
    assert cells["fused / unfused"] == "**0.80**"
    assert cells["eager unfused ms"] == "3.5" and cells["eager fused ms"] == "3.0"
    assert cells["params M (train / fused)"] == "0.00 / 0.00"


def test_none_passed_and_not_measured(run_zoo):
    report = fake_report(openvino_passes=False)
    for r in report["results"]:
        if r["runtime_name"] != "torch":
            r["passed"] = False
    report["fastest_passing"] = fastest_passing(report["results"])
    assert report["fastest_passing"] is None
    cells = run_zoo.table_row(run_zoo.summarize(report, SPEC), 200.0)
    assert cells[-3:] == ["none passed", "-", "-"]

    old = fake_report()
    del old["fastest_passing"], old["zoo_candidates"]
    assert run_zoo.table_row(run_zoo.summarize(old, SPEC), 200.0)[-3:] == ["not measured", "-", "-"]


def test_the_plain_export_as_fastest_is_said_to_be_it(run_zoo):
    report = fake_report(openvino_passes=False, fused_passes=False)
    assert report["fastest_passing"] == BASELINE
    cells = run_zoo.table_row(run_zoo.summarize(report, SPEC), 200.0)
    assert cells[-3:] == ["onnxruntime fp32 (plain export)", "10.0 (1.00x)", "120.0"]


def test_isa_sentence_with_and_without_bf16_and_vnni(run_zoo):
    asked = (("onnxruntime", "openvino", "torch"), ("fp32", "int8", "bf16"))
    without = run_zoo.isa_sentence(NO_BF16, *asked)
    assert without == (
        "From the stamp's ISA flags (AVX AVX2 FMA), this CPU has no BF16: OpenVINO bf16 not "
        "measured, and has no VNNI: int8 is timed without its int8 dot products."
    )
    with_both = run_zoo.isa_sentence(SAPPHIRE, *asked)
    assert "this CPU has BF16: OpenVINO bf16 is a candidate" in with_both
    assert "has VNNI: int8 can use its int8 dot products" in with_both
    assert "no BF16" not in with_both and "no VNNI" not in with_both
    # BF16 present but not asked for: said so rather than claimed measured.
    plain = run_zoo.isa_sentence(SAPPHIRE, ("onnxruntime", "torch"), ("fp32",))
    assert "has BF16, but OpenVINO bf16 was not asked for" in plain
    arm = run_zoo.isa_sentence({"arch": "aarch64", "isa": ["dotprod", "neon"]})
    assert (
        "has no BF16" in arm and "has no VNNI (x86's; ARM int8 dot products here: DOTPROD)" in arm
    )
    assert "unknown" in run_zoo.isa_sentence({"arch": "x86_64"})


def test_the_share_of_peak_is_of_the_highest_rate_a_job_measured(run_zoo):
    """A job's own matmul measurement ran low when the machine was busy (109 of 207
    GFLOP/s), which put a model at 101% of "the peak"."""
    quiet, busy = fake_report(), {**fake_report(), "matmul_peak_gflops": 50.0}
    summaries = [run_zoo.summarize(r, SPEC) for r in (quiet, busy)]
    text = run_zoo.results_markdown([busy, quiet], summaries, 3.0)
    assert "the highest that a job measured (188 GFLOP/s)" in text
    rows = [line for line in text.splitlines() if line.startswith("| tiny")]
    assert len(rows) == 2 and all("| 50 (27%) |" in line for line in rows)


def test_results_header_says_the_candidates_their_bounds_and_the_cpu(run_zoo):
    reports = [
        fake_report(skipped=["openvino fp16: this CPU has no native fp16"]),
        fake_report(
            skipped=[
                "openvino fp16: this CPU has no native fp16",
                "onnx int8: misses its 25 dB target\nsecond line",
            ]
        ),
    ]
    summaries = [run_zoo.summarize(r, SPEC) for r in reports]
    text = run_zoo.results_markdown(reports, summaries, 3.0, note="Reused: none.")
    head, table = text.split("## Classification\n\n")
    assert (
        "Candidates: the fused model in onnxruntime, openvino and torch eager at fp32, int8 and "
        "bf16" in head
    )
    assert "fp32 within 1e-05 of the output scale" in head
    assert "bf16 at least 40 dB PSNR with decisive agreement >= 0.9" in head
    assert "int8 at least its file's own accuracy target" in head
    assert "fp16" not in head.split("Candidates:")[1], "fp16 was no candidate"
    assert "against the float64 unfused model" in head
    assert "this CPU has no BF16: OpenVINO bf16 not measured" in head
    assert "Skipped: openvino fp16: this CPU has no native fp16." in head
    assert "Not candidates (results.json `skipped` says why): tiny 32x32 (onnx int8)." in head
    assert "(188 GFLOP/s). Reused: none." in head  # the note ends the method paragraph
    lines = table.splitlines()
    assert lines[0].endswith("| fastest verified | verified ms (vs plain) | verified PSNR dB |")
    assert lines[0].startswith("| model | input | params M (train / fused) | GMACs | ORT unfused")
    assert lines[2].endswith("| openvino bf16 | 5.1 (0.51x) | 49.9 |")


def test_header_of_records_from_before_candidates_were_judged(run_zoo):
    old = fake_report()
    del old["fastest_passing"], old["zoo_candidates"]
    new = fake_report()
    mixed = run_zoo.results_markdown([new, old], [], 3.0)
    assert "1 of 2 records predate candidate judging" in mixed
    none = run_zoo.results_markdown([old], [], 3.0)
    assert "No record judged its candidates" in none


def test_candidate_lists_parse_in_bench_order(run_zoo):
    runtimes = run_zoo.name_list(run_zoo.RUNTIMES)
    precisions = run_zoo.name_list(run_zoo.PRECISIONS, always=("fp32",))
    assert runtimes("torch, openvino,onnxruntime") == ("onnxruntime", "openvino", "torch")
    assert precisions("bf16,int8") == ("fp32", "int8", "bf16")
    with pytest.raises(Exception, match="unknown tensorrt"):
        runtimes("onnxruntime,tensorrt")
    with pytest.raises(SystemExit):
        run_zoo.main(["--runtimes", "openvino,torch", "--report-only"])


def test_run_job_passes_the_candidates_and_drops_eager_above_512(run_zoo, monkeypatch):
    calls = []
    monkeypatch.setattr(run_zoo, "benchmark", lambda name, **kw: calls.append(kw) or {})
    args = SimpleNamespace(
        threads=1,
        min_time=0.05,
        runtimes=("onnxruntime", "openvino", "torch"),
        precisions=("fp32", "int8"),
    )
    small = run_zoo.run_job(SPEC, (32, 32), args)
    big = run_zoo.run_job(SPEC, (512, 1024), args)
    assert calls[0]["runtimes"] == ("onnxruntime", "openvino", "torch")
    assert calls[0]["precisions"] == ("fp32", "int8")
    assert calls[1]["runtimes"] == ("onnxruntime", "openvino")
    assert (calls[0]["min_runs"], calls[1]["min_runs"]) == (20, 5)
    # The record keeps what the zoo asked, the same for both: one kind of record.
    assert small["zoo_candidates"] == big["zoo_candidates"]
    assert big["zoo_candidates"]["runtimes"] == ["onnxruntime", "openvino", "torch"]


def test_resume_reruns_a_record_that_measured_other_candidates(run_zoo, monkeypatch, tmp_path):
    name = "seaformer_tiny"
    record = tmp_path / "runs" / f"{name}@224x224.json"
    record.parent.mkdir()
    calls = []

    def fake_benchmark(model, **kwargs):
        calls.append(kwargs["precisions"])
        return {k: v for k, v in fake_report().items() if k != "zoo_candidates"}

    monkeypatch.setattr(run_zoo, "benchmark", fake_benchmark)
    monkeypatch.setattr(run_zoo, "machine_stamp", lambda: NO_BF16)
    base = ["--models", name, "--out", str(tmp_path), "--resume", "--min-time", "0.05"]
    wide = [*base, "--runtimes", "onnxruntime,openvino,torch", "--precisions", "fp32,int8,bf16"]

    old = fake_report()
    del old["fastest_passing"], old["zoo_candidates"]
    record.write_text(json.dumps(old))
    assert run_zoo.main(base) == 0
    assert calls == [("fp32",)], "a record from before candidates were judged is re-run"
    assert json.loads(record.read_text())["zoo_candidates"]["precisions"] == ["fp32"]

    assert run_zoo.main(base) == 0
    assert len(calls) == 1, "a record of the same candidates is reused"

    assert run_zoo.main(wide) == 0
    assert calls[-1] == ("fp32", "int8", "bf16"), "other candidates asked: re-run"
    results = (tmp_path / "RESULTS.md").read_text()
    assert "| openvino bf16 | 5.1 (0.51x) | 49.9 |" in results


def test_resume_reruns_a_record_from_another_machine(run_zoo, monkeypatch, tmp_path):
    """One table's latencies come from one machine: a record of the same candidates
    measured on another CPU (or with other library versions) is measured again, and
    a rebooted machine (another kernel build) is the same machine."""
    record = tmp_path / "runs" / "seaformer_tiny@224x224.json"
    record.parent.mkdir()
    calls = []

    def fake_benchmark(model, **kwargs):
        calls.append(model)
        return {k: v for k, v in fake_report(stamp=SAPPHIRE).items() if k != "zoo_candidates"}

    monkeypatch.setattr(run_zoo, "benchmark", fake_benchmark)
    monkeypatch.setattr(run_zoo, "machine_stamp", lambda: {**SAPPHIRE, "os": "Linux-reboot"})
    argv = ["--models", "seaformer_tiny", "--out", str(tmp_path), "--resume"]
    argv += ["--runtimes", "onnxruntime,openvino,torch", "--precisions", "fp32,int8,bf16"]
    record.write_text(json.dumps(fake_report(stamp=NO_BF16)))
    assert run_zoo.main(argv) == 0
    assert calls == ["seaformer_tiny"]
    assert json.loads(record.read_text())["machine"] == SAPPHIRE
    assert run_zoo.main(argv) == 0
    assert calls == ["seaformer_tiny"], "a record of this machine is reused"


def test_results_go_to_results_md_and_never_into_the_readme(run_zoo, monkeypatch, tmp_path):
    """The front page is written by people; the measured tables live in RESULTS.md,
    which the README links to."""
    here = tmp_path / "benchmarks"
    (here / "runs").mkdir(parents=True)
    (here / "runs" / "seaformer_tiny@224x224.json").write_text(json.dumps(fake_report()))
    readme = tmp_path / "README.md"
    readme.write_text("# front page\n<!-- results:start -->\n<!-- results:end -->\n")
    monkeypatch.setattr(run_zoo, "HERE", here)
    assert run_zoo.main(["--models", "seaformer_tiny", "--report-only"]) == 0
    assert "| seaformer_tiny |" in (here / "RESULTS.md").read_text()
    assert readme.read_text() == "# front page\n<!-- results:start -->\n<!-- results:end -->\n"
