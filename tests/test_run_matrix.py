"""benchmarks/run_matrix.py's bookkeeping, with `verify` stubbed: an error lands on the
precision that has it, --resume reruns only what did not pass, the table keeps the zoo's
order. (The cells' numbers come from the real verify, tested elsewhere.)"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from mobilevit_deploy.metrics import Metrics

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "run_matrix.py"
# models, or (model, format)s, whose verify is stopped (Ctrl-C, a session's end)
INTERRUPTED_AT: set = set()
RAISES: dict[str, Exception] = {}  # model -> what its verify raises


@pytest.fixture
def run_matrix(monkeypatch, tmp_path):
    spec = importlib.util.spec_from_file_location("run_matrix", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    calls = []

    def fake_verify(name, formats, precisions, image_size, **_kwargs):
        if name in INTERRUPTED_AT or (name, formats[0]) in INTERRUPTED_AT:
            raise KeyboardInterrupt
        if name in RAISES:
            raise RAISES[name]
        calls.append((name, formats[0], tuple(precisions)))
        if "int8" in precisions and name == "fastvit_t12":
            raise RuntimeError("DIV failed to invoke\nmore lines")
        pairs = [
            SimpleNamespace(
                candidate=f"{formats[0]} fused ({p})",
                format=formats[0],
                estimated=False,
                passed=name != "fastvit_t8" or p != "fp16",
                bound="b",
                metrics=Metrics(1e-7, 1e-7, 1.0, 120.0, agreement=1.0, top5=1.0),
            )
            for p in precisions
        ]
        return SimpleNamespace(pairs=pairs, problems=[], image_size=image_size)

    monkeypatch.setattr(module, "verify", fake_verify)
    monkeypatch.setattr(module, "HERE", tmp_path)  # the committed table, for the slices

    def run(*extra, out="matrix.json"):
        """(exit code, cells of the JSON written) of one run over `--formats onnx`."""
        argv = ["run_matrix.py", "--formats", "onnx", "--out", str(tmp_path), *extra]
        monkeypatch.setattr(sys, "argv", argv)
        code = module.main()
        return code, json.loads((tmp_path / out).read_text())

    return run, calls


def test_an_error_is_pinned_to_its_precision_and_resume_reruns_what_failed(run_matrix, tmp_path):
    run, calls = run_matrix
    code, cells = run("--models", "fastvit_t8", "fastvit_t12")
    assert code == 1
    status = {(c["model"], c["precision"]): c["status"] for c in cells}
    assert status == {
        ("fastvit_t8", "fp32"): "pass",
        ("fastvit_t8", "fp16"): "FAIL",
        ("fastvit_t8", "int8"): "pass",
        ("fastvit_t12", "fp32"): "pass",
        ("fastvit_t12", "fp16"): "pass",
        ("fastvit_t12", "int8"): "error",
    }
    error = next(c for c in cells if c["status"] == "error")
    assert error["detail"] == "RuntimeError: DIV failed to invoke"  # first line only
    assert ("fastvit_t12", "onnx", ("fp32",)) in calls  # rerun alone after the error
    table = (tmp_path / "MATRIX.md").read_text()
    not_run = table.split("Not in this table (not run): ")[1].split(".\n")[0].split(", ")
    assert "fastvit_s12" in not_run and "fastvit_t8" not in not_run

    calls.clear()
    _, resumed = run("--models", "fastvit_t12", "fastvit_t8", "fastvit_s12", "--resume")
    assert {name for name, _, _ in calls} == {"fastvit_t8", "fastvit_t12", "fastvit_s12"}
    assert ("fastvit_t8", "onnx", ("fp16",)) in calls, "only the failed cell runs again"
    assert ("fastvit_t12", "onnx", ("int8",)) in calls
    assert len(resumed) == 9 and len({(c["model"], c["precision"]) for c in resumed}) == 9
    calls.clear()
    _, kept = run("--models", "fastvit_s12", "--resume")
    assert calls == [], "a format whose cells all passed is not run again"
    assert len(kept) == 9, "the failed cells of models outside the selection stay"
    order = [c["model"] for c in resumed]
    assert order == sorted(order, key=["fastvit_t8", "fastvit_t12", "fastvit_s12"].index)


def test_shards_split_the_zoo_and_merge_into_one_table(run_matrix, tmp_path):
    run, calls = run_matrix
    models = ("fastvit_t12", "fastvit_s12", "fastvit_sa12", "fastvit_sa24", "fastvit_sa36")
    shards = []
    for k in (1, 2):
        _, cells = run("--models", *models, "--shard", f"{k}/2", out=f"matrix.shard-{k}-of-2.json")
        shards.append({c["model"] for c in cells})
    assert shards[0] | shards[1] == set(models) and not shards[0] & shards[1]
    assert not (tmp_path / "MATRIX.md").exists(), "a shard writes its JSON only"
    calls.clear()
    files = [str(tmp_path / f"matrix.shard-{k}-of-2.json") for k in (1, 2)]
    code, merged = run("--merge", *files)
    assert calls == [] and code == 1  # fastvit_t12's int8 error is kept
    assert {c["model"] for c in merged} == set(models) and len(merged) == 15
    order = [c["model"] for c in merged]
    assert order == sorted(order, key=list(models).index)
    assert "fastvit_sa36" in (tmp_path / "MATRIX.md").read_text()


@pytest.mark.parametrize("bound", [">=15dB", ">=25dB"], ids=["no-search", "an-older-search"])
def test_resume_reruns_int8_cells_made_by_another_int8_rule(run_matrix, tmp_path, bound):
    """Cells bounded by the old 15 dB floor were never held to a target or an agreement
    rule, and cells searched on one set of 8 held-out images missed their target on
    verify's (EfficientViT-B1/B2): --resume measures them again, and the table marks
    them by their rule until then."""
    run, calls = run_matrix
    run("--models", "fastvit_s12")
    cells = json.loads((tmp_path / "matrix.json").read_text())
    assert all(c["images"] == 8 for c in cells)
    for cell in cells:
        if cell["precision"] == "int8":
            assert "of the sets of 8 of 32 held-out images" in cell.pop("int8_rule")
            cell["bound"] = bound
    (tmp_path / "matrix.json").write_text(json.dumps(cells))
    run("--models", "fastvit_s12", "--resume", "--precisions", "fp32")
    table = (tmp_path / "MATRIX.md").read_text()
    assert (
        f"| fastvit_s12 | onnx | int8 | 256x256 | pass | 1.0e-07 | 120.0 | 1.000 | {bound} | 2 |"
        in table
    )
    assert "1 of rule 2 (" in table
    calls.clear()
    _, resumed = run("--models", "fastvit_s12", "--resume")
    assert calls == [("fastvit_s12", "onnx", ("int8",))]
    assert {c["bound"] for c in resumed} == {"b"} and len(resumed) == 3
    assert "of rule 2" not in (tmp_path / "MATRIX.md").read_text()


def test_cells_judged_by_another_near_tie_rule_are_kept_and_marked(run_matrix, tmp_path):
    """Decisive decisions were counted from 3x the RMS error of all of them before
    4.2x that of the agreeing ones: the rules agree where nothing flipped, so --resume
    does not measure such a cell again; the table marks each by its rule, and cells of
    4 images by theirs."""
    run, calls = run_matrix
    _, cells = run("--models", "fastvit_s12")
    stamped = {c["precision"]: c.get("tie_rule") for c in cells}
    rule = "margin over 4.2x the RMS error of the agreeing decisions"
    assert stamped["fp32"] is None and stamped["fp16"] == stamped["int8"] == rule
    table = (tmp_path / "MATRIX.md").read_text()
    assert "*rule*" not in table and table.count(" | 3 |  |") == 3
    for cell in cells:
        cell.pop("tie_rule", None)
    cells.append({**cells[1], "model": "seaformer_seg_tiny_ade20k"})  # fp16, some flipped
    cells[-1]["metrics"] = {"max_rel": 1e-3, "psnr_db": 60.0, "pixel_agreement": 0.9}
    cells.append({**cells[0], "model": "levit_128s"})  # fp32 of a run on 4 images
    del cells[-1]["images"]
    (tmp_path / "matrix.json").write_text(json.dumps(cells))
    calls.clear()
    run("--models", "fastvit_s12", "--resume")
    assert calls == []
    table = (tmp_path / "MATRIX.md").read_text()
    assert "1 of rule 1 (judged on 4 images); 3 of rule 2 (near-ties counted from 3x" in table
    assert "| seaformer_seg_tiny_ade20k | onnx | fp16 |" in table
    assert table.count(" | 2 |  |") == 3 and table.count(" | 1 |  |") == 1


def _cell(model: str, status: str, seconds: float) -> dict:
    return {
        "model": model,
        "format": "onnx",
        "precision": "fp32",
        "status": status,
        "seconds": seconds,
        "input": "256x256",
    }


def test_slices_are_balanced_by_the_committed_timings(run_matrix, tmp_path):
    """Every 2nd model would put FastViT-T8 and S12 (190 s) in one slice and 2 s in the
    other; the committed table's seconds put each heavy model in its own slice."""
    run, _ = run_matrix
    seconds = {"fastvit_t8": 100.0, "fastvit_t12": 1.0, "fastvit_s12": 90.0, "fastvit_sa12": 1.0}
    table = [_cell(m, "pass", t) for m, t in seconds.items()]
    (tmp_path / "matrix.json").write_text(json.dumps(table))
    shards = []
    for k in (1, 2):
        argv = ("--models", *seconds, "--shard", f"{k}/2", "--precisions", "fp32")
        _, cells = run(*argv, out=f"matrix.shard-{k}-of-2.json")
        shards.append({c["model"] for c in cells})
    assert shards == [{"fastvit_t8"}, {"fastvit_t12", "fastvit_s12", "fastvit_sa12"}]


def test_a_slice_weighs_what_resume_will_run_and_guesses_the_untimed(monkeypatch, tmp_path):
    """With --resume a passed cell costs nothing; a cell never timed costs the mean cell
    of its format at its input size."""
    spec = importlib.util.spec_from_file_location("run_matrix", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "HERE", tmp_path)
    table = [_cell("fastvit_t8", "pass", 10.0), _cell("fastvit_t12", "FAIL", 30.0)]
    (tmp_path / "matrix.json").write_text(json.dumps(table))
    models = ["fastvit_t8", "fastvit_t12", "fastvit_s12"]
    args = SimpleNamespace(resume=True, seg_size="mobile")
    costs = module.model_costs(models, ["onnx"], ["fp32"], args)
    assert costs == {"fastvit_t8": 0.0, "fastvit_t12": 30.0, "fastvit_s12": 20.0}
    args.resume = False
    assert module.model_costs(models, ["onnx"], ["fp32"], args)["fastvit_t8"] == 10.0


def test_a_shard_file_follows_its_slice_when_the_slices_move(run_matrix, tmp_path):
    """The slices follow matrix.json's timings, so a model can change slices between
    runs: a shard drops the models it no longer has from its file (a merge could let
    that stale FAIL win over the new slice's cell) and resumes the ones it gained from
    matrix.json instead of measuring them again."""
    run, calls = run_matrix
    models = ["fastvit_t8", "fastvit_t12", "fastvit_s12", "fastvit_sa12"]
    (tmp_path / "matrix.json").write_text(json.dumps([_cell(m, "pass", 5.0) for m in models]))
    # the file of an earlier slice 2 of 2: T12, and T8 when it had failed
    earlier = [_cell("fastvit_t8", "FAIL", 5.0), _cell("fastvit_t12", "pass", 5.0)]
    (tmp_path / "matrix.shard-2-of-2.json").write_text(json.dumps(earlier))
    argv = ("--models", *models, "--shard", "2/2", "--resume", "--precisions", "fp32")
    _, cells = run(*argv, out="matrix.shard-2-of-2.json")
    assert calls == [], "SA12 passed in matrix.json: not measured again"
    assert {c["model"] for c in cells} == {"fastvit_t12", "fastvit_sa12"}


def test_a_shards_first_resume_starts_from_matrix_json(run_matrix, tmp_path):
    """Two shards side by side on one machine: each resumes its own models' cells of the
    whole run's matrix.json and writes only those, so the merge keeps every new cell."""
    run, calls = run_matrix
    models = ("fastvit_t8", "fastvit_t12", "fastvit_s12", "fastvit_sa12")
    run("--models", *models[:2], "--precisions", "fp32")
    calls.clear()
    for k in (1, 2):
        _, cells = run(
            "--models",
            *models,
            "--shard",
            f"{k}/2",
            "--resume",
            "--precisions",
            "fp32",
            out=f"matrix.shard-{k}-of-2.json",
        )
        assert {c["model"] for c in cells} == set(models[k - 1 :: 2])
    assert sorted(name for name, _, _ in calls) == ["fastvit_s12", "fastvit_sa12"], (
        "the cells matrix.json had are not measured again"
    )
    files = [str(tmp_path / f"matrix.shard-{k}-of-2.json") for k in (1, 2)]
    _, merged = run("--merge", *files)
    assert sorted(c["model"] for c in merged) == sorted(models)


def age_int8_cells(path: Path) -> None:
    """Make the int8 cells of `path` look measured before the int8 search (15 dB floor)."""
    cells = json.loads(path.read_text())
    for cell in cells:
        if cell["precision"] == "int8":
            cell["bound"] = ">=15dB"
            cell.pop("int8_rule", None)
    path.write_text(json.dumps(cells))


def test_a_stopped_resume_keeps_the_old_cells_it_had_not_replaced(run_matrix, tmp_path):
    """A resumed run that stops before a model keeps that model's old cells: before, the
    cells to measure again left the table at the start, and a session's end lost them."""
    run, _calls = run_matrix
    run("--models", "fastvit_t12", "fastvit_s12")
    age_int8_cells(tmp_path / "matrix.json")
    INTERRUPTED_AT.add("fastvit_s12")
    try:
        with pytest.raises(KeyboardInterrupt):
            run("--models", "fastvit_t12", "fastvit_s12", "--resume")
    finally:
        INTERRUPTED_AT.clear()
    kept = json.loads((tmp_path / "matrix.json").read_text())
    assert len(kept) == 6
    old = [c for c in kept if c["model"] == "fastvit_s12" and c["precision"] == "int8"]
    assert [c["bound"] for c in old] == [">=15dB"]


def test_resume_fills_the_tables_holes_before_it_measures_stale_cells(run_matrix, tmp_path):
    """A session's end cuts a resumed run short: the cells never measured (a model not
    reached) come before stale cells of models earlier in the zoo, and a cell measured
    once in a run (here an error) is not measured twice."""
    run, calls = run_matrix
    run("--models", "fastvit_t8", "fastvit_s12", "--precisions", "fp32,int8")
    age_int8_cells(tmp_path / "matrix.json")
    calls.clear()
    models = ("fastvit_t8", "fastvit_t12", "fastvit_s12")
    code, resumed = run("--models", *models, "--resume", "--precisions", "fp32,int8")
    assert calls == [
        ("fastvit_t12", "onnx", ("fp32", "int8")),
        ("fastvit_t12", "onnx", ("fp32",)),
        ("fastvit_t12", "onnx", ("int8",)),
        ("fastvit_t8", "onnx", ("int8",)),
        ("fastvit_s12", "onnx", ("int8",)),
    ]
    assert code == 1 and len(resumed) == 6


def test_a_stopped_run_keeps_the_formats_it_measured_of_a_model(run_matrix, tmp_path):
    """A big segmenter takes an hour a format: a run stopped in its second format keeps
    the first's cells (the table was written once a model was done)."""
    run, _calls = run_matrix
    INTERRUPTED_AT.add(("fastvit_s12", "tflite"))
    try:
        with pytest.raises(KeyboardInterrupt):
            run("--models", "fastvit_s12", "--formats", "onnx,tflite")
    finally:
        INTERRUPTED_AT.clear()
    kept = json.loads((tmp_path / "matrix.json").read_text())
    assert {(c["format"], c["precision"]) for c in kept} == {
        ("onnx", "fp32"),
        ("onnx", "fp16"),
        ("onnx", "int8"),
    }


def test_a_long_errors_cause_at_its_end_stays_in_the_table(run_matrix, monkeypatch):
    """ai-edge-quantizer names a tensor by its whole module chain, then gives the cause:
    the first 300 characters held only the name (EfficientViT-L3's TFLite int8)."""
    run, _calls = run_matrix
    name = "a/" * 300
    message = f"Failed to get quantization parameters for tensor: {name}. Error: the cause"
    monkeypatch.setitem(RAISES, "fastvit_t8", ValueError(message))
    _, cells = run("--models", "fastvit_t8", "--precisions", "fp32")
    detail = cells[0]["detail"]
    assert detail.startswith("ValueError: Failed to get quantization parameters")
    assert detail.endswith("Error: the cause") and len(detail) <= 300


def test_a_run_of_a_few_models_keeps_the_rest_of_the_table(run_matrix, tmp_path):
    """The docstring's own example (`--family levit --formats onnx`) without --resume
    wrote a table of its few cells over the whole zoo's."""
    run, calls = run_matrix
    run("--models", "fastvit_t8", "fastvit_s12", "--precisions", "fp32")
    calls.clear()
    _, cells = run("--models", "fastvit_s12", "--precisions", "fp32")
    assert calls == [("fastvit_s12", "onnx", ("fp32",))], "without --resume it measures again"
    assert sorted(c["model"] for c in cells) == ["fastvit_s12", "fastvit_t8"]


def test_resume_at_another_segmenter_size_measures_again(run_matrix, tmp_path):
    """A cell passed at the mobile size says nothing of the native one: --resume
    --seg-size native used to keep it as settled, under a header saying native."""
    run, calls = run_matrix
    model = "seaformer_seg_tiny_ade20k"
    _, mobile = run("--models", model, "--precisions", "fp32")
    calls.clear()
    _, native = run("--models", model, "--precisions", "fp32", "--resume", "--seg-size", "native")
    assert calls == [(model, "onnx", ("fp32",))]
    assert [c["input"] for c in mobile] == ["256x256"] and [c["input"] for c in native] == [
        "512x512"
    ]
