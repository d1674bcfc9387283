"""Accuracy-targeted int8: the most sensitive layers stay float until a target holds.

Quantizing every layer of these models costs 16-25 dB of output fidelity under stress
weights, and on real weights it can collapse a classifier (docs/architecture.md).
What users do about it, and what NNCF's accuracy control and Intel Neural Compressor
automate, is to rank layers by their share of the error and give the worst ones back
to float until a bound holds. This module does that for every int8 format:

1. The all-int8 file (only the modules that declare `int8_keeps_float` in float) is
   exported by the format's own exporter and run by its own runtime on held-out images
   (never calibrated on), against the fused fp32 model in torch, and judged as verify
   judges int8 (judge.py: the PSNR, and the decision on decisive inputs), with a
   margin on both (SEARCH_MARGIN_DB, SEARCH_TIE_FACTOR).
2. If it misses the target, modules are ranked once on the ONNX QDQ graph of
   onnxruntime.quantization (onnx_precision.int8_module_gain): each module's own
   nodes read float inputs again, and the share of the output's noise that goes is
   measured; so are the modules that read one quantized activation, together (a
   residual block's first convolution and its add: alone, either can gain nothing).
   One ranking serves every
   format, because a module's own ops are what each can leave float: ONNX by node-name
   scope, TFLite by a recipe regex on its module chain, ExecuTorch by a PT2E filter on
   the module stack. Only the module's own ops: a block owns its residual add, and
   keeping a FastViT block float with its children keeps every weight float.
3. The float set grows through the ranking (its first 1, 2, 4, ... entries), then
   bisects between the last miss and the first hit; each step is a real file of the
   format, run by its runtime. A step's PSNR is the one that 90% of the sets of
   `JUDGED_SET` (verify's default count) of its held-out images reach, and it must be
   `SEARCH_MARGIN_DB` above the target: a PSNR over a few images is the set's (its
   error and its peak), and a file must hold its target on the next such set, verify's.
   One set is not enough: the stressed all-int8 EfficientViT-B1 TFLite file scores
   26.9 dB on one set of 8, 21.7-26.4 dB across its sets of 8, and 23.8 dB on verify's.

The record says which modules stayed float, the PSNR of every step, and what the
float modules cost against the all-int8 file in size and latency. The chosen file is
stamped with it (the format's `restamp`) rather than exported again, where the format
can; ExecuTorch, whose record is a method of the program, exports it once more.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import ExportFailed, VerificationFailed
from ..files import artifact_size, atomic_artifact
from ..judge import bound_for, judge
from ..metrics import compare, set_psnr_quantile
from ..runtimes import run_per_sample
from ..runtimes.torch_runtime import TorchRunner
from ..timing import interleaved
from . import ExportJob, called_modules, float_modules
from .formats import FORMATS, Format
from .metadata import ArtifactMetadata

SEARCH_MARGIN_DB = 1.0
# The search counts more decisions as decisive than verify does (metrics.NEAR_TIE_FACTOR,
# 4.2): from a margin of 3x the noise, so that flips 3-4.2x from their runner-up count
# against a step's agreement, as the 1 dB margin does for its PSNR.
SEARCH_TIE_FACTOR = 3.0
# A step's PSNR is the one that this share of the sets of JUDGED_SET held-out images
# (verify's default count) reach: its 10th percentile (metrics.set_psnr_quantile).
JUDGED_SET = 8
JUDGED_QUANTILE = 0.1
# Steps of bisection after the doubling found a hit: each is one export and run.
BISECT_STEPS = 3
# Images each module's trial runs in the ranking (one onnxruntime session per module).
RANKING_IMAGES = 4


@dataclass(frozen=True)
class Attempt:
    keep: tuple[str, ...]
    psnr_db: float
    agreement: float | None  # on decisive inputs (metrics.py); None for features
    path: Path
    hit: bool  # judged as verify judges int8 (judge.py), at the aimed PSNR
    metadata: ArtifactMetadata | None = None  # as the exporter recorded the file
    error: str | None = None  # the format could not make this step's file: a miss


def rank_modules(
    job: ExportJob, images: np.ndarray, tmp: Path, progress: Callable[[str], None]
) -> list[tuple[tuple[str, ...], float]]:
    """(module paths, the share of the output's int8 noise that keeping their own nodes
    float removes), worst first: every module that owns a quantized node
    (onnx.node_owner) alone, and the modules that read one quantized activation
    together (onnx_precision.int8_module_gain); the declared float modules are left out
    (they are float already). A module kept float keeps exactly its own nodes float,
    not its children: a block owns only its residual add, so keeping it float costs no
    weights."""
    import onnx

    from .onnx import declared_scopes, export_onnx, node_owner, owner_scopes
    from .onnx_precision import graph_digest, int8_module_gain, to_int8

    onnx_job = dataclasses.replace(
        job,
        output=tmp / "ranking.onnx",
        precision="fp32",
        options=FORMATS["onnx"].make_options({}),
        keep_float=(),
    )
    export_onnx(onnx_job)
    graph = onnx.load(str(onnx_job.output))
    called = called_modules(job.model, job.example)
    declared = declared_scopes(job.model, called)
    trials = images[:RANKING_IMAGES]
    key = graph_digest(graph, job.calibration, trials, extra=repr(declared))
    if key not in _RANKINGS:
        quantized = to_int8(graph, job.calibration, lambda name: name.startswith(declared))
        scopes = owner_scopes(job.model, called)

        def owner(name: str) -> str | None:
            return None if name.startswith(declared) else node_owner(scopes, name)

        gains = int8_module_gain(graph, quantized, owner, trials, progress)
        _RANKINGS[key] = sorted(gains.items(), key=lambda item: -item[1])
    return list(_RANKINGS[key])


# Rankings measured in this process, by onnx_precision.graph_digest. The ranking
# depends on the float graph, the calibration, its images and the declared float
# modules, not on the format being searched, so `verify --formats
# onnx,tflite,executorch` (and each model of the matrix) ranks once instead of once per
# format: one onnxruntime session per module, most of an int8 search's time.
_RANKINGS: dict[str, list[tuple[tuple[str, ...], float]]] = {}


def weight_share(model: nn.Module, declared: list[str], kept: list[str]) -> float:
    """The fraction of the model's weights (parameters) left float: the whole of each
    declared module, and the weights a kept module holds itself (not its children's)."""
    total = sum(p.numel() for p in model.parameters())
    inside = {id(p) for path in declared for p in model.get_submodule(path).parameters()}
    inside |= {id(p) for path in kept for p in model.get_submodule(path).parameters(False)}
    counted = sum(p.numel() for p in model.parameters() if id(p) in inside)
    return counted / total if total else 0.0


def search_int8(
    fmt: Format,
    job: ExportJob,
    target_db: float,
    held_out: np.ndarray,
    progress: Callable[[str], None] = lambda _msg: None,
) -> ArtifactMetadata:
    """Export `job` (int8) with as few modules float as the target allows, and record the
    search (module docstring). VerificationFailed if only every ranked module float
    (the float program) reaches the target, or not even that."""
    export = fmt.load("exporter")
    reference = run_per_sample(TorchRunner(job.model.eval(), torch.float32), held_out, JUDGED_SET)
    goal = target_db + SEARCH_MARGIN_DB
    declared = [path for path, _ in float_modules(job.model)]
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        shared = tmp / "shared"  # what the steps' exports share (ExportJob.scratch)
        shared.mkdir()
        attempts: list[Attempt] = []

        def attempt(keep: tuple[str, ...]) -> Attempt:
            progress(f"int8 with {len(keep)} more modules float: exporting and measuring")
            out = tmp / f"candidate{len(attempts)}{fmt.suffix}"
            try:
                made = export(dataclasses.replace(job, output=out, keep_float=keep, scratch=shared))
            except ExportFailed as exc:
                if not keep:  # the all-int8 file: the format cannot take the model at all
                    raise
                # Some float sets make a graph the format refuses (XNNPACK, for one of
                # EfficientViT-B1's: it lowers and loads, then fails to run); the
                # search goes on past it as past a miss.
                progress(f"int8 with {len(keep)} more modules float: {exc}; counted a miss")
                tried = Attempt(keep, float("-inf"), None, out, False, error=str(exc))
                attempts.append(tried)
                return tried
            got = run_per_sample(fmt.open_runner(out), held_out, len(job.example))
            # Agreement over every held-out image; the PSNR is that of most sets of 8.
            metrics = compare(reference, got, job.spec.output_kind, SEARCH_TIE_FACTOR)
            metrics = metrics.with_psnr(
                set_psnr_quantile(reference, got, JUDGED_SET, JUDGED_QUANTILE)
            )
            hit = judge(metrics, bound_for("int8", int8_target_db=goal)).passed
            tried = Attempt(keep, metrics.psnr_db, metrics.decisive_agreement, out, hit, made)
            attempts.append(tried)
            return tried

        def first(count: int) -> Attempt:  # the modules of the first `count` entries
            keep = tuple(dict.fromkeys(p for entry in ranked[:count] for p in entry))
            return next((a for a in attempts if a.keep == keep), None) or attempt(keep)

        base = attempt(())
        chosen, ranked, modules = base, [], 0
        if not base.hit:
            progress("ranking modules by their share of the int8 error")
            scores = rank_modules(job, held_out, tmp, progress)
            ranked = [entry for entry, _ in scores]
            modules = len({p for entry in ranked for p in entry})
            every = _entries_to_cover(ranked)
            chosen = _grow(len(ranked), first, first_guess(scores, base.psnr_db, goal), every)
        if chosen is None or (ranked and len(chosen.keep) == modules):
            raise VerificationFailed(
                _unreachable(fmt, target_db, modules, attempts, every_float=chosen is not None)
            )
        cost = _cost(fmt, base, chosen, job.example)
        search = {
            "target_db": target_db,
            "aimed_db": goal,
            "tie_factor": SEARCH_TIE_FACTOR,
            "held_out_images": len(held_out),
            "judged_set": min(JUDGED_SET, len(held_out)),
            "judged_quantile": JUDGED_QUANTILE,
            "psnr_db": chosen.psnr_db,
            "psnr_db_all_int8": base.psnr_db,
            "kept_float": list(chosen.keep),
            "declared_float": declared,
            "ranked_modules": modules,
            "float_weight_share": weight_share(job.model, declared, list(chosen.keep)),
            "steps": [
                {"extra_float": len(a.keep), "agreement": a.agreement}
                | ({"psnr_db": None, "error": a.error} if a.error else {"psnr_db": a.psnr_db})
                for a in attempts
            ],
            **cost,
        }
        progress(f"int8 with {len(chosen.keep)} more modules float: writing {job.output.name}")
        final = {"int8_target_db": target_db, "int8_float_modules": [*declared, *chosen.keep]}
        if fmt.restamp is None:  # the record is part of the program: made again with it
            source = tmp / f"final{fmt.suffix}"
            metadata = dataclasses.replace(
                job.metadata, **final, details={**job.metadata.details, "int8_search": search}
            )
            metadata = export(
                dataclasses.replace(job, output=source, metadata=metadata, keep_float=chosen.keep)
            )
            _check_made_again(fmt, source, chosen.path, held_out[: len(job.example)], job)
        else:
            source, made = chosen.path, chosen.metadata
            metadata = dataclasses.replace(
                made, **final, details={**made.details, "int8_search": search}
            )
        with atomic_artifact(job.output) as staged:
            shutil.copyfile(source, staged.path)
            staged.record = metadata.to_dict()
            if fmt.restamp is not None:
                fmt.load("restamp")(staged.path, staged.record)
        return metadata


# How far the file made again with its record may be from the searched one, relative
# to the output's scale: the same program on the same runtime gives the same numbers.
MADE_AGAIN_MAX_REL = 1e-6


def _check_made_again(
    fmt: Format, made: Path, searched: Path, images: np.ndarray, job: ExportJob
) -> None:
    """The file shipped must be the one measured. A format without `restamp` exports
    the chosen float set again; quantization and lowering are deterministic here (a
    set of output writers that changed between runs made an ExecuTorch file differ by
    116 KB, docs/architecture.md), and this keeps it so: an error, not a file whose
    record describes another."""
    outputs = [
        run_per_sample(fmt.open_runner(p), images, len(job.example)) for p in (searched, made)
    ]
    off = compare(outputs[0], outputs[1], job.spec.output_kind).max_rel
    if off > MADE_AGAIN_MAX_REL:
        raise ExportFailed(
            f"int8 {fmt.name}: the file made again with the chosen float set computes "
            f"{off:.1e} of the output scale away from the one the search measured; "
            "this is a bug of mobilevit_deploy, please report it"
        )


def _unreachable(
    fmt: Format, target_db: float, ranked: int, attempts: list[Attempt], every_float: bool
) -> str:
    """Why no int8 file is made: no float set hit, or (`every_float`) only every ranked
    module float did, which is a miss too: it is the float program under an int8 label
    (stressed SeaFormer-Small in ExecuTorch: 22.4 dB with 125 of its 129 modules float,
    117 dB with all, at 3.6x the size)."""
    fewer = [a for a in attempts if len(a.keep) < ranked] if every_float else attempts
    best = max(fewer, key=lambda a: a.psnr_db)
    reach = (
        f"reaches {target_db:g} dB only with all {ranked} ranked modules float, which "
        f"is the float program, not int8 (best with fewer: {best.psnr_db:.1f} dB with "
        f"{len(best.keep)} float"
        if every_float
        else f"does not reach {target_db:g} dB even with all {ranked} ranked modules "
        f"float (best {best.psnr_db:.1f} dB"
    )
    refused = [a for a in attempts if a.error]
    why = (
        f"; {fmt.name} could not make {len(refused)} of its {len(attempts)} files, "
        f"the last with {len(refused[-1].keep)} modules float: {refused[-1].error}"
        if refused
        else ""
    )
    return f"int8 {fmt.name} {reach} on held-out images); lower --int8-target or export fp16{why}"


def first_guess(scores: list[tuple[tuple[str, ...], float]], psnr_db: float, goal: float) -> int:
    """How many of the ranked entries to try first: the fewest whose noise adds up to
    the share the goal asks to remove (from psnr_db to goal: 1 - 10^(-gap/10) of the
    noise power), if the modules' gains added up to the output's noise. The total is
    the single modules': a group of co-readers repeats its members' gains."""
    needed = 1 - 10 ** (-(goal - psnr_db) / 10)
    total = sum(max(score, 0.0) for entry, score in scores if len(entry) == 1) or 1.0
    running = 0.0
    for k, (_, score) in enumerate(scores, 1):
        running += score
        if running >= needed * total:
            return k
    return len(scores)


def describe(search: dict) -> str:
    """The search in one line, for export and verify output."""
    held_out, size = search["held_out_images"], search.get("judged_set", 0)
    judged = (
        f"{1 - search['judged_quantile']:.0%} of the sets of {size} of its {held_out}"
        if size and size < held_out
        else str(held_out)
    )
    line = (
        f"int8 at {search['psnr_db']:.1f} dB on {judged} held-out images "
        f"(target {search['target_db']:g}; all-int8 {search['psnr_db_all_int8']:.1f} dB)"
    )
    if not search["kept_float"]:
        return line + ": no module kept float beyond the declared ones"
    return line + (
        f": {len(search['kept_float'])} of {search['ranked_modules']} modules kept float "
        f"({search['float_weight_share']:.0%} of the weights with the declared ones), "
        f"{search['bytes'] / search['bytes_all_int8']:.2f}x the all-int8 size, "
        f"{search['latency_ratio_to_all_int8']:.2f}x its latency"
    )


def _entries_to_cover(ranked: list[tuple[str, ...]]) -> int:
    """How many of the ranked entries hold every ranked module."""
    modules = {p for entry in ranked for p in entry}
    covered: set[str] = set()
    for k, entry in enumerate(ranked, 1):
        covered |= set(entry)
        if covered == modules:
            return k
    return len(ranked)


def _grow(
    count: int, first: Callable[[int], Attempt], start: int, every: int | None = None
) -> Attempt | None:
    """The first hit of the first `start`, 2x, 4x ... of the `count` ranked entries
    float (`first(k)`), then bisection between the last miss and that hit (BISECT_STEPS
    at most); None if all of them float still miss. A hit at `every` entries or more
    (every module float: no int8 file, search_int8) bisects on past BISECT_STEPS, so
    that a smaller hit, if there is one, is not missed for want of steps."""
    every = count if every is None else every
    low, high, hit, k = 0, 0, None, max(1, min(start, count))
    while count and hit is None:
        tried = first(k)
        if tried.hit:
            high, hit = k, tried
        elif k == count:
            return None
        else:
            low, k = k, min(2 * k, count)
    steps = 0
    while hit is not None and high - low > 1 and (steps < BISECT_STEPS or high >= every):
        steps += 1
        k = (low + high) // 2
        tried = first(k)
        if tried.hit:
            high, hit = k, tried
        else:
            low = k
    return hit


def _cost(fmt: Format, base: Attempt, chosen: Attempt, image: np.ndarray) -> dict:
    """Size and latency of the chosen file against the all-int8 one, timed interleaved
    on the example input (a short measurement: `mvd bench` is the careful one)."""
    if chosen is base:
        size = artifact_size(base.path)
        return {"bytes": size, "bytes_all_int8": size, "latency_ratio_to_all_int8": 1.0}
    runners = {a.path.name: fmt.open_runner(a.path) for a in (base, chosen)}
    timed = interleaved(
        {name: (lambda r=r: r(image)) for name, r in runners.items()},
        warmup=2,
        min_runs=5,
        min_time_s=0.3,
    )
    base_ms, chosen_ms = timed[base.path.name].median_ms, timed[chosen.path.name].median_ms
    return {
        "bytes": artifact_size(chosen.path),
        "bytes_all_int8": artifact_size(base.path),
        "latency_ms": chosen_ms,
        "latency_ms_all_int8": base_ms,
        "latency_ratio_to_all_int8": chosen_ms / base_ms,
    }
