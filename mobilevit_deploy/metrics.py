"""Agreement metrics between a reference output and a candidate output.

Errors are relative to the reference's scale (its largest magnitude), so one bound
serves logits of any size. fp32 must land near float epsilon: a correct fold of a
stressed FastViT-T8 differs by ~3e-7 of the scale, one BatchNorm folded with the
wrong eps by ~6e-4 (docs/architecture.md), hence the 1e-5 bound, 150x tighter than timm's.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np

# A decision whose reference margin (top-1 logit minus the runner-up) is within
# NEAR_TIE_FACTOR x the candidate's noise is a coin toss at that precision, not a
# defect: agreement is judged on the other, decisive, inputs (or pixels), and the raw
# agreement is still reported. A margin is a difference of two outputs, so its error is
# about sqrt(2) x the noise of one; 3 of those puts a flip of a decisive decision at
# odds of about 1 in 700 under a Gaussian model, rare enough that a matrix of
# thousands of decisions does not fail good files by chance. The noise is the RMS
# error of the decisions that agree, so flips cannot widen the band that excuses them.
NEAR_TIE_FACTOR = 3.0 * math.sqrt(2.0)
# An agreement rate over fewer decisive inputs (or pixels) than this is not judged:
# one flip of two inputs is 50%, a rate that says nothing about the file.
MIN_DECISIVE = 3


Outputs = np.ndarray | tuple[np.ndarray, ...]


@dataclass(frozen=True)
class Metrics(Mapping):
    """One candidate's agreement with its reference, the same type for classifiers,
    segmenters and feature maps: the decision fields are None where there is no
    decision (features), `top5` where there is no top-5 (segmenters), and `outputs`
    holds each output's own where there are several (the fields are the worst of them).

    It reads as a mapping too, with the keys of the JSON reports (`top1` or
    `pixel_agreement` name `agreement` for readers of a task's report), so a report is
    `dict(metrics)` and nothing has to know which task wrote it."""

    max_abs: float
    max_rel: float
    cosine: float
    psnr_db: float
    task: str = "classification"
    agreement: float | None = None  # of the decision: top-1, or the argmax of each pixel
    near_ties: float | None = None  # the share of decisions within the near-tie band
    decisive_agreement: float | None = None  # agreement of the decisive ones
    decisive: int | None = None  # how many were decisive
    top5: float | None = None
    outputs: tuple[Metrics, ...] = ()

    def with_psnr(self, psnr_db: float) -> Metrics:
        """The same metrics judged on another PSNR (the int8 search's set quantile)."""
        return dataclasses.replace(self, psnr_db=psnr_db)

    def to_dict(self) -> dict:
        data = {
            "max_abs": self.max_abs,
            "max_rel": self.max_rel,
            "cosine": self.cosine,
            "psnr_db": self.psnr_db,
        }
        if self.agreement is not None:
            data.update(
                agreement=self.agreement,
                near_ties=self.near_ties,
                decisive_agreement=self.decisive_agreement,
                decisive=self.decisive,
            )
            if self.task == "classification":
                data.update(top1=self.agreement, top5=self.top5)
            else:
                data["pixel_agreement"] = self.agreement
        if self.outputs:
            data["outputs"] = [m.to_dict() for m in self.outputs]
        return data

    def __getitem__(self, key: str):
        return self.to_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())


def compare(
    reference: Outputs,
    candidate: Outputs,
    task: str = "classification",
    tie_factor: float = NEAR_TIE_FACTOR,
) -> Metrics:
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
        return Metrics(
            max_abs=max(m.max_abs for m in each),
            max_rel=max(m.max_rel for m in each),
            cosine=min(m.cosine for m in each),
            psnr_db=min(m.psnr_db for m in each),
            task=task,
            outputs=tuple(each),
        )
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
) -> Metrics:
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
    result = Metrics(
        max_abs=float(diff.max()),
        max_rel=float(diff.max()) / scale,
        cosine=float(cosine.min()),
        psnr_db=_psnr(scale, rmse),
        task=task,
    )
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
    return dataclasses.replace(
        result,
        agreement=float(np.mean(agrees)),
        near_ties=float(1 - np.mean(decisive)),
        decisive_agreement=float(np.mean(agrees[decisive])) if decisive.any() else 1.0,
        decisive=int(np.sum(decisive)),
        top5=_top5(ref, out) if task == "classification" else None,
    )


def _top5(ref: np.ndarray, out: np.ndarray) -> float:
    """The mean overlap of the top-5 sets (all classes for a head of fewer than 5)."""
    k = min(5, ref.shape[1])
    top5_r = np.argsort(-ref, axis=1)[:, :k]
    top5_o = np.argsort(-out, axis=1)[:, :k]
    overlap = [len(set(a) & set(b)) / k for a, b in zip(top5_r, top5_o, strict=True)]
    return float(np.mean(overlap))
