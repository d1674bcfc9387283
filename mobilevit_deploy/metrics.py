"""Agreement metrics between a reference output and a candidate output.

Errors are relative to the reference's scale (its largest magnitude), so one bound
serves logits of any size. fp32 must land near float epsilon: a correct fold of a
stressed FastViT-T8 differs by ~3e-7 of the scale, one BatchNorm folded with the
wrong eps by ~6e-4 (docs/architecture.md), hence the 1e-5 bound, 150x tighter than timm's.
"""

from __future__ import annotations

import math

import numpy as np

# Max error relative to the reference scale, per precision of the candidate. fp64 is
# the fuse math alone (a fused float64 copy against the unfused one): ~1e-14 when exact.
DEFAULT_TOLERANCES = {"fp64": 1e-9, "fp32": 1e-5}
# fp32 candidates may differ from the float64 reference by this many times what the
# unfused model's own fp32 run differs by (its noise floor), when that is larger than
# the fp32 bound: a fused fp32 model cannot beat the float arithmetic it runs on.
NOISE_FLOOR_FACTOR = 2.0
# Reduced precisions are judged by fidelity, not by a max error: PSNR against the
# reference scale and agreement of the decision (top-1 or the argmax map). Measured
# on stressed FastViT-T8 at 256 (stress weights are adversarial for quantization:
# random-sign scales widen every activation range): fp16 74-79 dB and top-1 1.0.
#
# A decision whose reference margin (top-1 logit minus the runner-up) is within
# NEAR_TIE_FACTOR x the candidate's noise is a coin toss at that precision, not a
# defect: agreement is judged on the other, decisive, inputs (or pixels) and the raw
# agreement is still reported. Stressed EfficientViT-B0 at 64: fp16 at 60.9 dB flipped
# one of six inputs, a tie by that rule; a broken fp16 graph also loses its PSNR.
# The noise is the RMS error of the decisions that agree (inputs, or pixels), so that
# flips cannot widen the band that excuses them: with the RMS error of all inputs, a
# 52 dB file with 30 of 200 decisions flipped by an error on their runner-up had every
# flip a tie.
# The factor is a heuristic. A margin is a difference of two outputs: were their errors
# independent and as large as the rest, its error would be sqrt(2) x the noise, and
# 4.2 is 3 of those. At 3x (no sqrt(2)) a flip has odds of about 1 in 60 by that model,
# a few in a matrix of thousands of decisive inputs, and three stressed files failed on
# one such flip each (margins 3.1-3.4x the RMS error): FastViT-T8 TFLite int8, LeViT-192
# TFLite int8 at 42.2 dB, SeaFormer-Small ExecuTorch fp16 at 58.6 dB. The last two
# agreed on all 26 inputs decisive at 3x of 32 other images.
NEAR_TIE_FACTOR = 3.0 * math.sqrt(2.0)
# An agreement rate over fewer decisive inputs (or pixels) than this is not judged: one
# flip of one input is 0%. Stressed FastViT-T8 at 224, TFLite int8 at 29.5 dB, judged
# at 3x: 7 of 8 inputs near-tied, and the eighth (margin 10.5% of the scale, just past
# 3x the RMS error of 3.4%) flipped where that input's own error peaked at 26%.
MIN_DECISIVE = 3
# int8 files are searched to a target PSNR (int8_search.py) and held to it, with the
# decision judged on decisive inputs as fp16 is: a collapsed file fails on both counts.
# The default, 25 dB, lies between the two. All-int8 files of the stressed zoo at
# their own sizes keep 26-43 dB in ONNX (FastViT-T8 26.1, EfficientViT-B0 27.2,
# LeViT-128S 42.6, SepViT-Lite 41.8), SeaFormer-Tiny apart (22.6, which the search
# lifts), so the search runs where a family needs it, not on every export; a
# calibration that saturates (ranges 1000x too wide) leaves under 20 dB. A higher
# default costs much more float: 30 dB on FastViT-T8 at 128 kept 80% of the weights
# float. Trained weights can quantize worse than stress weights (a public EfficientViT
# collapsed at w8a16): the target is on the user's images (--calibration-images).
DEFAULT_INT8_TARGET_DB = 25.0
REDUCED_PRECISION = {
    "fp16": {"min_psnr_db": 40.0, "min_agreement": 0.9},
    # bf16 is OpenVINO computing the fp32 file (bench only). Stressed models at their
    # own sizes, 8 natural-looking images: FastViT T8/SA12/SA36 53.9/52.1/49.5 dB,
    # LeViT-128S 55.4, SepViT-Lite 54.6, EfficientViT-B0/B1 44.0/42.2, decisive
    # agreement 1.0 in all; 17-19 dB below OpenVINO's fp16 on each (3 fewer mantissa
    # bits). SeaFormer Tiny/Small/Base reach 37.3/32.5/34.1 dB with every decision
    # agreeing, and fail this floor: fp16's fidelity, asked of bf16 too.
    "bf16": {"min_psnr_db": 40.0, "min_agreement": 0.9},
    "int8": {"min_psnr_db": DEFAULT_INT8_TARGET_DB, "min_agreement": 0.9},
}


def judge(metrics: dict, precision: str, bound: float) -> tuple[bool, str]:
    """Pass/fail of one pair, and its bound in words for the report. `bound` is the max
    error relative to the scale (fp64, fp32) or the PSNR floor in dB (reduced
    precisions: the table's, or an int8 file's own target). Features have no decision
    to agree on: PSNR alone judges their reduced precisions."""
    rule = REDUCED_PRECISION.get(precision)
    if rule is None:
        return metrics["max_rel"] <= bound, f"{bound:.0e}"
    if "decisive_agreement" not in metrics:
        return metrics["psnr_db"] >= bound, f">={bound:g}dB"
    if metrics.get("decisive", MIN_DECISIVE) < MIN_DECISIVE:
        return metrics["psnr_db"] >= bound, f">={bound:g}dB (too few decisive inputs to judge)"
    agreement = metrics["decisive_agreement"]
    passed = metrics["psnr_db"] >= bound and agreement >= rule["min_agreement"]
    return passed, f">={bound:g}dB, agree>={rule['min_agreement']:g}"


Outputs = np.ndarray | tuple[np.ndarray, ...]


def compare(
    reference: Outputs,
    candidate: Outputs,
    task: str = "classification",
    tie_factor: float = NEAR_TIE_FACTOR,
) -> dict:
    """Metrics of one candidate. Several outputs (feature maps) are compared each
    against its own scale; the pair is as good as its worst output, and `outputs`
    keeps every output's own metrics. `tie_factor` is the near-tie margin in units of
    the candidate's noise (NEAR_TIE_FACTOR; the int8 search counts from less)."""
    if isinstance(reference, tuple):
        if not isinstance(candidate, tuple) or len(candidate) != len(reference):
            raise ValueError("the candidate's outputs differ in number from the reference's")
        each = [
            _compare_one(r, c, task, tie_factor) for r, c in zip(reference, candidate, strict=True)
        ]
        worst = {
            "max_abs": max(m["max_abs"] for m in each),
            "max_rel": max(m["max_rel"] for m in each),
            "cosine": min(m["cosine"] for m in each),
            "psnr_db": min(m["psnr_db"] for m in each),
        }
        return {**worst, "outputs": each}
    return _compare_one(reference, candidate, task, tie_factor)


def set_psnr_quantile(
    reference: Outputs, candidate: Outputs, set_size: int, quantile: float, draws: int = 500
) -> float:
    """The `quantile` of the PSNR of sets of `set_size` images drawn from these (fixed
    draws, without replacement within a set): what a PSNR measured on another set of
    that many images of the kind can be expected to be at least, at that quantile. A
    set's PSNR is compare's (its own peak over its RMS error, each output's, the worst),
    from per-image peaks and squared errors."""
    refs, outs = (o if isinstance(o, tuple) else (o,) for o in (reference, candidate))
    pairs = list(zip(refs, outs, strict=True))
    count = len(pairs[0][0])
    peaks, errors = [], []
    for ref, out in pairs:
        ref = np.asarray(ref, dtype=np.float64).reshape(count, -1)
        out = np.asarray(out, dtype=np.float64).reshape(count, -1)
        peaks.append(np.abs(ref).max(axis=1))
        errors.append(np.mean((ref - out) ** 2, axis=1))
    size = min(set_size, count)
    rng = np.random.default_rng(0)
    sets = (
        [np.arange(count)]
        if size == count
        else [rng.choice(count, size, replace=False) for _ in range(draws)]
    )
    values = [
        min(
            _psnr(max(float(peak[rows].max()), 1e-30), math.sqrt(float(error[rows].mean())))
            for peak, error in zip(peaks, errors, strict=True)
        )
        for rows in sets
    ]
    return float(np.quantile(values, quantile, method="lower"))  # -inf stays -inf


def _psnr(scale: float, rmse: float) -> float:
    """dB of the scale over the RMS error; -inf where the candidate has inf or NaN (a
    broken fp16 graph's overflow), so it fails every bound instead of raising."""
    if rmse == 0:
        return math.inf
    if not math.isfinite(rmse):
        return -math.inf
    return 20 * math.log10(scale / rmse)


def _compare_one(
    reference: np.ndarray, candidate: np.ndarray, task: str, tie_factor: float
) -> dict:
    ref = np.asarray(reference, dtype=np.float64)
    out = np.asarray(candidate, dtype=np.float64)
    if ref.shape != out.shape:
        raise ValueError(f"shape {out.shape} differs from the reference {ref.shape}")
    diff = np.abs(ref - out)
    scale = max(float(np.abs(ref).max()), 1e-30)
    squared = diff**2
    rmse = float(np.sqrt(np.mean(squared)))
    flat_r, flat_o = ref.reshape(len(ref), -1), out.reshape(len(out), -1)
    norms = np.linalg.norm(flat_r, axis=1) * np.linalg.norm(flat_o, axis=1)
    cosine = np.sum(flat_r * flat_o, axis=1) / np.maximum(norms, 1e-300)
    result = {
        "max_abs": float(diff.max()),
        "max_rel": float(diff.max()) / scale,
        "cosine": float(cosine.min()),
        "psnr_db": _psnr(scale, rmse),
    }
    if task == "features":  # maps or embeddings: no decision to agree on
        return result
    agrees = ref.argmax(1) == out.argmax(1)
    if ref.shape[1] > 1:
        top2 = -np.partition(-ref, 1, axis=1)[:, :2]
        per_decision = np.mean(squared, axis=1)  # an input's, or a pixel's
        noise = math.sqrt(float(np.mean(per_decision[agrees]))) if agrees.any() else 0.0
        decisive = top2[:, 0] - top2[:, 1] > tie_factor * noise
    else:  # one class: no runner-up to tie with
        decisive = np.ones_like(agrees)
    # `agreement` is the decision's, whatever the task (top-1, or argmax per pixel);
    # `top1` / `pixel_agreement` name the same number for readers of the JSON.
    result["agreement"] = float(np.mean(agrees))
    result["near_ties"] = float(1 - np.mean(decisive))
    result["decisive_agreement"] = float(np.mean(agrees[decisive])) if decisive.any() else 1.0
    result["decisive"] = int(np.sum(decisive))
    if task == "classification":
        result["top1"] = float(np.mean(agrees))
        k = min(5, ref.shape[1])  # a head of fewer than 5 classes: all of them
        top5_r = np.argsort(-ref, axis=1)[:, :k]
        top5_o = np.argsort(-out, axis=1)[:, :k]
        overlap = [len(set(a) & set(b)) / k for a, b in zip(top5_r, top5_o, strict=True)]
        result["top5"] = float(np.mean(overlap))
    else:
        result["pixel_agreement"] = float(np.mean(agrees))
    return result
