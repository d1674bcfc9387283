"""The one judge: every verdict of mvd (verify's rows, bench's candidates, the int8
search's steps, the matrix's cells) is `judge(metrics, bound_for(...))`.

A bound comes from the candidate's precision, the file's own record (an int8 file is
held to the target its export searched for, whatever that was, 0 dB included) and the
model's fp32 noise floor; nothing else decides it, so two commands cannot judge one
file differently.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .metrics import MIN_DECISIVE, Metrics

# Max error relative to the reference scale, per precision of the candidate. fp64 is
# the fuse math alone (a fused float64 copy against the unfused one): an exact fold
# lands near 1e-14, so 1e-9 leaves room for summation order and nothing else. fp32 sits
# between a correct fold of a stressed FastViT-T8 (3e-7 of the scale) and one BatchNorm
# folded with the wrong eps (6e-4): 1e-5 passes the first and fails the second by 60x
# (docs/architecture.md, "Verification bounds").
DEFAULT_TOLERANCES = {"fp64": 1e-9, "fp32": 1e-5}
# A fused fp32 model cannot beat the float arithmetic it runs on: where the unfused
# model's own fp32 run is already further than the bound from the float64 reference (a
# 512x512 SeaFormer-L segmenter: 1.5e-5), fp32 candidates get twice that. Twice, because
# the fused graph sums in another order and its rounding is as large again.
NOISE_FLOOR_FACTOR = 2.0
# The default int8 target: between what all-int8 files of the stressed zoo keep
# (26-43 dB in ONNX) and what a saturated calibration leaves (under 20 dB), so the
# accuracy search runs where a family needs it and a broken calibration fails.
DEFAULT_INT8_TARGET_DB = 25.0
# Reduced precisions are judged by fidelity: PSNR against the reference scale, and the
# decision (top-1, or the argmax map) on decisive inputs. 40 dB is 1% RMS error of the
# scale, far below what moves a decisive top-1; a broken fp16 graph (overflow, an fp16
# accumulation that collapses) falls tens of dB below it. 0.9 of decisive decisions
# allows one flip in ten that the near-tie rule could not excuse, and no more.
REDUCED_PRECISION = {
    "fp16": {"min_psnr_db": 40.0, "min_agreement": 0.9},
    # bf16 (OpenVINO computing the fp32 file) is asked fp16's fidelity: it is offered as
    # the same trade, and a model it cannot hold (SeaFormer: 32-37 dB) must say so.
    "bf16": {"min_psnr_db": 40.0, "min_agreement": 0.9},
    "int8": {"min_psnr_db": DEFAULT_INT8_TARGET_DB, "min_agreement": 0.9},
}


@dataclass(frozen=True)
class Bound:
    """What a row must meet. `limit` is the max error relative to the output scale
    (fp64, fp32) or the PSNR floor in dB (reduced precisions); `source` says where the
    value came from, for the report."""

    precision: str
    limit: float
    source: str

    @property
    def min_agreement(self) -> float | None:
        return REDUCED_PRECISION.get(self.precision, {}).get("min_agreement")

    @property
    def by_psnr(self) -> bool:
        return self.precision in REDUCED_PRECISION


@dataclass(frozen=True)
class Verdict:
    passed: bool
    bound: Bound
    words: str  # the bound in words, as the report's column shows it


def bound_for(
    precision: str,
    *,
    record: Mapping | None = None,
    tolerances: Mapping[str, float] | None = None,
    noise_floor: float = 0.0,
    int8_target_db: float | None = None,
) -> Bound:
    """The bound of a candidate at `precision`.

    `record` is the file's embedded record: an int8 file is held to its own
    `int8_target_db`. `int8_target_db` overrides that (the int8 search judges its steps
    at the target plus its margin). `tolerances` are a model spec's tighter or looser
    fp32 / fp64 bounds; `noise_floor` the unfused model's own fp32 error (max rel)."""
    if precision == "int8":
        target = int8_target_db
        if target is None and record is not None:
            target = record.get("int8_target_db")
        if target is not None:
            return Bound("int8", float(target), "the file's int8 target")
        return Bound("int8", DEFAULT_INT8_TARGET_DB, "the default int8 target")
    if precision in REDUCED_PRECISION:
        return Bound(precision, REDUCED_PRECISION[precision]["min_psnr_db"], "precision floor")
    limit = {**DEFAULT_TOLERANCES, **(tolerances or {})}[precision]
    if precision == "fp32" and NOISE_FLOOR_FACTOR * noise_floor > limit:
        return Bound("fp32", NOISE_FLOOR_FACTOR * noise_floor, "the model's fp32 noise floor")
    return Bound(precision, limit, "max error of the output scale")


def judge(metrics: Metrics, bound: Bound) -> Verdict:
    """Pass/fail of one candidate's metrics (metrics.compare) at `bound`. Features
    have no decision to agree on: PSNR alone judges their reduced precisions, as it
    does where too few inputs are decisive to judge an agreement rate."""
    if not bound.by_psnr:
        return Verdict(metrics.max_rel <= bound.limit, bound, f"{bound.limit:.0e}")
    psnr_ok = metrics.psnr_db >= bound.limit
    floor = f">={bound.limit:g}dB"
    if metrics.decisive_agreement is None:
        return Verdict(psnr_ok, bound, floor)
    if metrics.decisive < MIN_DECISIVE:
        return Verdict(psnr_ok, bound, f"{floor} (too few decisive inputs to judge)")
    agreed = metrics.decisive_agreement >= bound.min_agreement
    return Verdict(psnr_ok and agreed, bound, f"{floor}, agree>={bound.min_agreement:g}")
