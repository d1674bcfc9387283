"""The `mvd` command line, in process through typer's CliRunner: what works.

Every command is run the way a user types it and judged by what it leaves behind:
exit codes (0 ok, 1 verification failed), JSON on stdout, files and their metadata,
ONNX graphs, JUnit XML. The key test plants a wrong BatchNorm fold (eps 1e-3 instead
of the norm's own) and requires `mvd verify` to fail on it. Bad input is in
test_cli_errors.py.
"""

from __future__ import annotations

import hashlib
import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from cli_helpers import (
    SMALL,
    VERIFY_SMALL,
    assert_user_error,
    json_out,
    mvd,
    no_partial_files,
    ok,
    onnx_ops,
    sidecar,
)

from mobilevit_deploy import cli
from mobilevit_deploy.exporters.onnx import read_metadata
from mobilevit_deploy.reparam import fuse
from mobilevit_deploy.runtimes.onnxruntime import OrtRunner

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FASTVITS = (
    "fastvit_t8",
    "fastvit_t12",
    "fastvit_s12",
    "fastvit_sa12",
    "fastvit_sa24",
    "fastvit_sa36",
    "fastvit_ma36",
)
T8_PARAMS = {"train": 4_026_232, "deploy": 3_996_040, "fused": 3_992_392}


# --- list, info, doctor -----------------------------------------------------------


def test_list_table_shows_the_whole_zoo(monkeypatch):
    monkeypatch.setattr(cli.out, "_width", 160)  # a narrow terminal would fold names
    result = ok("list")
    for name in FASTVITS:
        assert f"│ {name} " in result.stdout
    assert "4,026,232" in result.stdout


def test_list_json():
    rows = json_out("list", "--json", "-")
    by_name = {r["name"]: r for r in rows}
    assert set(FASTVITS) <= set(by_name)
    t8 = by_name["fastvit_t8"]
    assert t8["params"] == T8_PARAMS["train"]
    assert t8["family"] == "fastvit"
    assert t8["input_size"] == [256, 256]
    assert {"in1k", "in1k_reparam"} <= set(t8["weights"])
    assert by_name["fastvit_ma36"]["params"] > by_name["fastvit_sa36"]["params"]


def test_list_family_filter():
    rows = json_out("list", "--family", "fastvit", "--json", "-")
    assert {r["name"] for r in rows} == set(FASTVITS)


def test_info_json():
    data = json_out("info", "fastvit_t8", "--json", "-")
    assert data["name"] == "fastvit_t8"
    assert data["params"] == T8_PARAMS
    assert data["macs"] > 0
    assert data["input_size"] == [256, 256]
    assert "onnx" in data["formats"]
    assert data["formats"]["onnx"] == "fp32, fp16, int8"
    assert data["preprocessing"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert {w["tag"] for w in data["weights"]} >= {"in1k", "in1k_reparam"}


def test_info_at_a_smaller_size_counts_fewer_macs():
    full = json_out("info", "fastvit_t8", "--json", "-")
    half = json_out("info", "fastvit_t8", "--image-size", "128", "--json", "-")
    assert half["input_size"] == [128, 128]
    assert 0 < half["macs"] < full["macs"] / 3  # ~1/4: the cost is mostly per pixel


def test_info_table():
    result = ok("info", "fastvit_t8")
    for text in ("fastvit / classification", "4,026,232", "3,996,040", "onnx (fp32, fp16, int8)"):
        assert text in result.stdout


def test_doctor_json():
    data = json_out("doctor", "--json", "-")
    machine = data["machine"]
    assert machine["logical_cores"] >= 1
    assert machine["versions"]["torch"] == torch.__version__
    assert data["machine_line"]
    formats = {f["name"]: f for f in data["formats"]}
    assert formats["onnx"]["export"] == "yes"
    assert formats["onnx"]["run"] == "yes"
    assert set(formats) >= {"onnx", "coreml", "tflite"}
    assert "mobilevit_deploy[coreml]" in formats["coreml"]["install"]


def test_doctor_table():
    result = ok("doctor")
    assert result.stdout.startswith("machine: ")
    assert "onnx" in result.stdout


# --- reparam, and loading its file back -------------------------------------------


def test_reparam_then_export_loads_fused_weights(tmp_path):
    ckpt = tmp_path / "x.pt"
    result = ok("reparam", "fastvit_t8", "-o", ckpt)
    assert result.stdout.startswith(f"wrote {ckpt}")
    assert "70 BatchNorms -> 0" in result.stdout
    saved = torch.load(ckpt, weights_only=True)
    assert saved["mvd"]["form"] == "fused"
    assert not [k for k in saved["state_dict"] if k.endswith(("running_mean", "running_var"))]

    onnx_path = tmp_path / "y.onnx"
    ok("export", "fastvit_t8", "--weights", ckpt, "-o", onnx_path, *SMALL)
    meta = sidecar(onnx_path)
    assert meta["weights_form"] == "fused"
    assert meta["weights"] == str(ckpt)
    assert meta["weights_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert read_metadata(onnx_path)["weights_form"] == "fused"

    # The saved weights are the seeded random model's: the same function as exporting
    # that model directly.
    direct = tmp_path / "direct.onnx"
    ok("export", "fastvit_t8", "-o", direct, *SMALL)
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
    a, b = OrtRunner(onnx_path)(x), OrtRunner(direct)(x)
    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()


def test_reparam_json(tmp_path):
    out = tmp_path / "x.safetensors"
    data = json_out("reparam", "fastvit_t8", "-o", out, "--json", "-")
    assert data["output"] == str(out)
    assert data["model"] == "fastvit_t8"
    assert data["params_before"] == T8_PARAMS["train"]
    assert data["params_after"] == T8_PARAMS["fused"]
    assert data["batchnorms_before"] == 70
    assert data["max_rel"] < 1e-5
    from safetensors import safe_open

    with safe_open(str(out), "pt") as fh:
        assert fh.metadata()["form"] == "fused"
        total = sum(math.prod(fh.get_slice(k).get_shape()) for k in fh.keys())  # noqa: SIM118
    assert total == T8_PARAMS["fused"]


def _wrong_eps_bn_affine(calls: list):
    """fuse.bn_affine, but folding with eps 1e-3 instead of the norm's own eps."""
    original = fuse.bn_affine

    def wrong(bn):
        calls.append(bn.eps)
        own = bn.eps
        bn.eps = 1e-3
        try:
            return original(bn)
        finally:
            bn.eps = own

    return wrong


def test_reparam_refuses_to_write_a_wrong_fold(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(fuse, "bn_affine", _wrong_eps_bn_affine(calls))
    out = tmp_path / "bad.pt"
    assert_user_error(mvd("reparam", "fastvit_t8", "-o", out), "changed its output", code=1)
    assert calls
    assert not out.exists()
    assert no_partial_files(tmp_path)


# --- export ---------------------------------------------------------------------


def test_export_json(tmp_path):
    out = tmp_path / "m.onnx"
    data = json_out("export", "fastvit_t8", *SMALL, "-o", out, "--json", "-")
    assert out.is_file()
    assert Path(data["path"]) == out
    assert Path(data["sidecar"]) == tmp_path / "m.onnx.json"
    assert Path(data["sidecar"]).is_file()
    assert data["size_mib"] == pytest.approx(out.stat().st_size / 2**20)
    meta = data["metadata"]
    assert meta == sidecar(out)
    assert meta["input_shape"] == [1, 3, 64, 64]
    assert meta["reparameterized"] is True
    assert meta["weights_form"] is None  # no weights given
    embedded = read_metadata(out)
    assert embedded["model"] == "fastvit_t8"
    assert embedded["input_shape"] == [1, 3, 64, 64]
    graph = onnx.load(str(out))
    onnx.checker.check_model(graph, full_check=True)
    assert graph.producer_name == "mobilevit_deploy"
    assert graph.opset_import[0].version == 17
    ops = onnx_ops(out)
    assert ops["BatchNormalization"] == 0
    assert OrtRunner(out)(np.zeros((1, 3, 64, 64), np.float32)).shape == (1, 1000)


def test_export_default_output_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = ok("export", "fastvit_t8", *SMALL)
    assert (tmp_path / "fastvit_t8.onnx").is_file()
    assert (tmp_path / "fastvit_t8.onnx.json").is_file()
    assert "fused" in result.stdout


def test_export_rectangular_image_size(tmp_path):
    out = tmp_path / "r.onnx"
    data = json_out("export", "fastvit_t8", "--image-size", "64x96", "-o", out, "--json", "-")
    assert data["metadata"]["input_shape"] == [1, 3, 64, 96]
    assert OrtRunner(out)(np.zeros((1, 3, 64, 96), np.float32)).shape == (1, 1000)


def test_export_dynamic_batch(tmp_path):
    out = tmp_path / "dyn.onnx"
    ok("export", "fastvit_t8", *SMALL, "-o", out, "--dynamic-batch")
    graph = onnx.load(str(out)).graph
    for value in (graph.input[0], graph.output[0]):
        dim = value.type.tensor_type.shape.dim[0]
        assert dim.WhichOneof("value") == "dim_param"
        assert dim.dim_param == "batch"
    assert sidecar(out)["input_shape"] == ["batch", 3, 64, 64]
    x = np.random.default_rng(0).standard_normal((3, 3, 64, 64)).astype(np.float32)
    runner_ = OrtRunner(out)
    batched = runner_(x)
    assert batched.shape == (3, 1000)
    np.testing.assert_allclose(batched[1:2], runner_(x[1:2]), rtol=1e-4, atol=1e-5)


def test_export_static_batch(tmp_path):
    out = tmp_path / "b2.onnx"
    ok("export", "fastvit_t8", *SMALL, "-o", out, "--batch", "2")
    dim = onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim.dim_value == 2
    assert sidecar(out)["input_shape"] == [2, 3, 64, 64]


def test_export_opset_18(tmp_path):
    out = tmp_path / "o18.onnx"
    ok("export", "fastvit_t8", *SMALL, "-o", out, "--opset", "18")
    versions = {o.domain: o.version for o in onnx.load(str(out)).opset_import}
    assert versions[""] == 18


def test_export_no_simplify_keeps_the_raw_graph(tmp_path):
    slim, raw = tmp_path / "slim.onnx", tmp_path / "raw.onnx"
    ok("export", "fastvit_t8", *SMALL, "-o", slim)
    ok("export", "fastvit_t8", *SMALL, "-o", raw, "--no-simplify")
    slim_ops, raw_ops = onnx_ops(slim), onnx_ops(raw)
    # onnxslim removes the exporter's Identity/Constant nodes; the compute is the same.
    assert raw_ops["Identity"] + raw_ops["Constant"] > 0
    assert slim_ops["Identity"] == slim_ops["Constant"] == 0
    assert sum(raw_ops.values()) > sum(slim_ops.values())
    assert raw_ops["Conv"] == slim_ops["Conv"]
    x = np.random.default_rng(1).standard_normal((1, 3, 64, 64)).astype(np.float32)
    np.testing.assert_allclose(OrtRunner(raw)(x), OrtRunner(slim)(x), rtol=1e-4, atol=1e-4)


def test_export_no_reparam_keeps_the_training_structure(tmp_path):
    fused, plain = tmp_path / "fused.onnx", tmp_path / "plain.onnx"
    ok("export", "fastvit_t8", *SMALL, "-o", fused)
    ok("export", "fastvit_t8", *SMALL, "-o", plain, "--no-reparam")
    fused_ops, plain_ops = onnx_ops(fused), onnx_ops(plain)
    # Constant folding in the exporter folds many Conv+BN pairs of the unfused model
    # too, but not all: BatchNorms outside a Conv->BN pair and the parallel branches
    # (more Convs and Adds) remain. The fused export has neither.
    assert fused_ops["BatchNormalization"] == 0
    assert plain_ops["BatchNormalization"] > 0
    assert plain_ops["Conv"] > fused_ops["Conv"]
    assert plain_ops["Add"] > fused_ops["Add"]
    assert sidecar(plain)["reparameterized"] is False
    assert sidecar(fused)["reparameterized"] is True
    # Same seeded weights: the two graphs compute the same function.
    x = np.random.default_rng(2).standard_normal((2, 3, 64, 64)).astype(np.float32)
    a = np.concatenate([OrtRunner(plain)(x[i : i + 1]) for i in range(2)])
    b = np.concatenate([OrtRunner(fused)(x[i : i + 1]) for i in range(2)])
    assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()


# --- verify ---------------------------------------------------------------------


def junit_suite(path: Path) -> ET.Element:
    suite = ET.parse(path).getroot()
    assert suite.tag == "testsuite"
    return suite


def test_verify_passes_and_writes_reports(tmp_path):
    report, junit, md = tmp_path / "v.json", tmp_path / "v.xml", tmp_path / "v.md"
    result = ok(*VERIFY_SMALL, "--json", report, "--junit", junit, "--markdown", md)
    assert "verified" in result.stdout
    data = json.loads(report.read_text())
    assert data["passed"] is True
    assert data["problems"] == []
    assert data["weights"].startswith("stress weights")
    pairs = {p["candidate"]: p for p in data["pairs"]}
    assert {"torch fused (fp64)", "torch fused (fp32)", "onnx fused"} <= set(pairs)
    assert all(p["passed"] and p["metrics"]["max_rel"] <= p["tolerance"] for p in pairs.values())
    suite = junit_suite(junit)
    assert suite.get("failures") == "0"
    assert int(suite.get("tests")) == len(pairs) + 1
    assert not suite.findall(".//failure")
    assert "verified" in md.read_text()


def test_verify_json_to_stdout():
    data = json.loads(ok(*VERIFY_SMALL, "--json", "-").stdout)
    assert data["passed"] is True
    assert data["image_size"] == [64, 64]


def test_verify_catches_a_wrong_batchnorm_fold(tmp_path, monkeypatch):
    """The gate itself: a fold with the wrong eps must fail, in every report."""
    calls: list = []
    monkeypatch.setattr(fuse, "bn_affine", _wrong_eps_bn_affine(calls))
    report, junit = tmp_path / "v.json", tmp_path / "v.xml"
    result = mvd(*VERIFY_SMALL, "--json", report, "--junit", junit)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert "verification failed" in result.stdout
    assert calls and all(eps == 1e-5 for eps in calls)  # the norms' own eps, overridden

    data = json.loads(report.read_text())
    assert data["passed"] is False
    pairs = {p["candidate"]: p for p in data["pairs"]}
    for candidate in ("torch fused (fp64)", "onnx fused"):
        assert pairs[candidate]["passed"] is False
        assert pairs[candidate]["metrics"]["max_rel"] > pairs[candidate]["tolerance"]
    suite = junit_suite(junit)
    assert int(suite.get("failures")) > 0
    failed = {c.get("name") for c in suite.iter("testcase") if c.find("failure") is not None}
    assert "onnx fused" in failed


# --- bench ----------------------------------------------------------------------


def test_bench_json(tmp_path):
    """Timings are not asserted, only that every candidate ran and is reported.

    One thread: with all cores, torch eager slows ~10x as soon as another process
    shares the machine (measured 24 ms -> 214 ms per run on 2 busy cores).
    """
    report = tmp_path / "b.json"
    args = ["bench", "fastvit_t8", *SMALL, "--min-time", "0.05", "--min-runs", "3"]
    result = ok(*args, "--threads", "1", "--json", report)
    assert "vs baseline" in result.stdout
    data = json.loads(report.read_text())
    assert data["model"] == "fastvit_t8"
    assert data["image_size"] == [64, 64]
    assert data["threads"] == 1
    assert data["onnxruntime_session"]["intra_op_num_threads"] == 1
    results = {r["runtime"]: r for r in data["results"]}
    assert set(results) == {
        "onnxruntime, unfused (plain export)",
        "onnxruntime, fused (mvd)",
        "torch eager, unfused",
        "torch eager, fused (mvd)",
    }
    assert data["baseline"] == "onnxruntime, unfused (plain export)"
    assert results[data["baseline"]]["ratio_to_baseline"] == 1.0
    for r in results.values():
        assert r["n_total"] >= 3
        assert r["median_ms"] > 0
        assert r["ratio_to_baseline"] > 0
    assert data["macs_per_image"] > 0
