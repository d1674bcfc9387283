"""Latency timing that a report can quote and a reader can reproduce.

Kept separate from any model or runtime so the statistics can be tested with fake clocks.

Outlier rule: a sample is dropped when it is above median + 3 * 1.4826 * MAD, where MAD is the
median absolute deviation from the median (1.4826 * MAD estimates the standard deviation of
normal jitter, so the cut sits near three sigmas). Only the slow tail is clipped: interference
from other processes, page faults or frequency changes make a run slower, never faster. At least
5 samples are always kept (the fastest ones, if the rule would leave fewer), and when MAD is 0
(a coarse clock that returns equal samples) nothing is clipped, because the spread is unknown.

Runs continue until both `min_runs` runs and `min_time_s` of measured time are reached, so
fast models still get many samples and slow ones still get enough of them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

MAD_SCALE = 1.4826
CLIP_SIGMAS = 3.0
MIN_KEPT = 5
# Sums of float intervals can land a hair under the target (ten 0.1 s runs sum to 0.99999...);
# without the slack that round-off would buy an extra run.
_TIME_SLACK_S = 1e-9


@dataclass
class TimingResult:
    samples_ms: list[float]
    n_total: int
    n_clipped: int
    median_ms: float
    p90_ms: float
    min_ms: float
    mean_ms: float
    std_ms: float
    throughput_per_s: float

    def to_dict(self) -> dict:
        """Plain dict for a JSON report; an infinite throughput (zero median) becomes None."""
        out = asdict(self)
        if not math.isfinite(out["throughput_per_s"]):
            out["throughput_per_s"] = None
        return out


def _keep_mask(values: np.ndarray) -> np.ndarray:
    keep = np.ones(values.shape, dtype=bool)
    median = float(np.median(values))
    mad = float(np.median(np.abs(values - median)))
    if mad == 0.0:
        return keep
    keep = values <= median + CLIP_SIGMAS * MAD_SCALE * mad
    floor = min(MIN_KEPT, values.size)
    if int(keep.sum()) < floor:
        # A stable sort keeps the earliest of equal samples, so the result is deterministic.
        keep = np.zeros(values.shape, dtype=bool)
        keep[np.argsort(values, kind="stable")[:floor]] = True
    return keep


def summarize(samples_ms: Sequence[float], batch: int = 1) -> TimingResult:
    """Clip the slow tail (see module docstring) and describe what is left.

    Kept samples stay in measurement order so a drift over the run remains visible.
    """
    if len(samples_ms) == 0:
        raise ValueError("summarize needs at least one sample")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    values = np.asarray(samples_ms, dtype=np.float64)
    kept = values[_keep_mask(values)]
    median = float(np.median(kept))
    return TimingResult(
        samples_ms=[float(v) for v in kept],
        n_total=int(values.size),
        n_clipped=int(values.size - kept.size),
        median_ms=median,
        p90_ms=float(np.percentile(kept, 90)),
        min_ms=float(kept.min()),
        mean_ms=float(kept.mean()),
        std_ms=float(kept.std(ddof=1)) if kept.size > 1 else 0.0,
        throughput_per_s=batch * 1000.0 / median if median > 0 else math.inf,
    )


def _check_args(batch: int, warmup: int, min_runs: int, max_runs: int) -> None:
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if min_runs < 1 or max_runs < 1:
        raise ValueError(f"min_runs and max_runs must be >= 1, got {min_runs}, {max_runs}")


def time_callable(
    fn: Callable[[], object],
    *,
    batch: int = 1,
    warmup: int = 3,
    min_runs: int = 10,
    min_time_s: float = 1.0,
    max_runs: int = 10_000,
    clock: Callable[[], float] = time.perf_counter,
) -> TimingResult:
    """Time `fn` after untimed warm-up calls (first calls pay for allocation and kernel choice).

    `batch` is how many items one call processes; it only scales the throughput.
    """
    return interleaved(
        {"fn": fn},
        batch=batch,
        warmup=warmup,
        min_runs=min_runs,
        min_time_s=min_time_s,
        max_runs=max_runs,
        clock=clock,
    )["fn"]


def interleaved(
    fns: Mapping[str, Callable[[], object]],
    *,
    batch: int = 1,
    warmup: int = 3,
    min_runs: int = 10,
    min_time_s: float = 1.0,
    max_runs: int = 10_000,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, TimingResult]:
    """Time several candidates round-robin (A, B, C, B, C, A, ...) for a fair comparison.

    Timing A fully and then B lets a slow drift of the machine (heat, a neighbour's job) land
    on one of them only; interleaving spreads it over all. The price: each call runs after a
    different candidate, so caches are colder than in a back-to-back loop, and absolute numbers
    may be slightly higher than `time_callable` gives. Every candidate runs the same number of
    rounds; rounds stop once each has `min_runs` runs and `min_time_s` of its own measured
    time, or after `max_runs` rounds.
    """
    _check_args(batch, warmup, min_runs, max_runs)
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    totals = dict.fromkeys(names, 0.0)
    rounds = 0
    while names and rounds < max_runs:
        if rounds >= min_runs and min(totals.values()) >= min_time_s - _TIME_SLACK_S:
            break
        # Rotate the order each round so no candidate always runs right after the same
        # other one (a runtime's spinning worker threads slow whoever comes next).
        shift = rounds % len(names)
        for name in names[shift:] + names[:shift]:
            start = clock()
            fns[name]()
            elapsed = clock() - start
            samples[name].append(elapsed * 1000.0)
            totals[name] += elapsed
        rounds += 1
    return {name: summarize(samples[name], batch) for name in names}
