"""The timing statistics and run-count rules, checked with fixed samples and fake clocks.

No test here measures real wall-clock time: a fake clock makes every count exact.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from mobilevit_deploy.timing import TimingResult, interleaved, summarize, time_callable

JITTER = [10.0, 10.4, 9.9, 10.1, 10.3, 10.0, 9.8, 10.2, 10.1, 10.05]


class FakeClock:
    """Returns `now` and then moves on by `step`; `advance` moves time from inside a callable."""

    def __init__(self, step: float = 0.0) -> None:
        self.now = 0.0
        self.step = step
        self.calls = 0

    def __call__(self) -> float:
        self.calls += 1
        t = self.now
        self.now += self.step
        return t

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_statistics_match_numpy_when_nothing_is_clipped() -> None:
    r = summarize(JITTER)
    ref = np.asarray(JITTER)
    assert r.n_total == 10 and r.n_clipped == 0
    assert r.samples_ms == JITTER
    assert r.median_ms == float(np.median(ref))
    assert r.p90_ms == float(np.percentile(ref, 90))
    assert r.min_ms == 9.8
    assert r.mean_ms == pytest.approx(float(ref.mean()))
    assert r.std_ms == pytest.approx(float(ref.std(ddof=1)))


def test_p90_interpolates_linearly() -> None:
    r = summarize([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    assert r.p90_ms == pytest.approx(5.5)
    assert r.median_ms == 3.5


def test_hundredfold_outlier_is_clipped_and_jitter_kept() -> None:
    samples = [*JITTER[:4], 1000.0, *JITTER[4:]]
    r = summarize(samples)
    assert r.n_total == 11
    assert r.n_clipped == 1
    assert r.samples_ms == JITTER  # measurement order survives clipping
    assert r.median_ms == float(np.median(JITTER))
    assert r.std_ms == pytest.approx(float(np.std(JITTER, ddof=1)))


def test_fast_outlier_is_never_clipped() -> None:
    r = summarize([*JITTER, 0.1])
    assert r.n_clipped == 0
    assert r.min_ms == 0.1


def test_never_fewer_than_five_kept() -> None:
    # The rule alone would keep only the four fast samples; the fastest slow one is added back.
    samples = [1.0, 100.0, 1.0, 2.0, 101.0, 1.0, 102.0]
    r = summarize(samples)
    assert r.samples_ms == [1.0, 100.0, 1.0, 2.0, 1.0]
    assert r.n_clipped == 2


def test_fewer_than_five_samples_are_all_kept() -> None:
    r = summarize([1.0, 2.0, 1000.0])
    assert r.n_clipped == 0
    assert r.samples_ms == [1.0, 2.0, 1000.0]


def test_zero_mad_keeps_everything() -> None:
    samples = [5.0] * 6 + [50.0]
    r = summarize(samples)
    assert r.n_clipped == 0
    assert r.samples_ms == samples
    assert r.median_ms == 5.0


def test_single_sample_has_zero_std() -> None:
    r = summarize([7.0])
    assert (r.median_ms, r.p90_ms, r.min_ms, r.mean_ms, r.std_ms) == (7.0, 7.0, 7.0, 7.0, 0.0)


def test_throughput_counts_batch_items() -> None:
    assert summarize([4.0] * 6, batch=8).throughput_per_s == 2000.0
    assert summarize([4.0] * 6).throughput_per_s == 250.0


def test_empty_or_bad_batch_rejected() -> None:
    with pytest.raises(ValueError):
        summarize([])
    with pytest.raises(ValueError):
        summarize([1.0], batch=0)


def test_to_dict_is_json_ready() -> None:
    d = summarize(JITTER, batch=2).to_dict()
    assert set(d) == set(TimingResult.__dataclass_fields__)
    assert json.loads(json.dumps(d))["n_total"] == 10
    assert summarize([0.0]).to_dict()["throughput_per_s"] is None


def test_min_time_decides_when_runs_are_fast() -> None:
    clock = FakeClock(step=0.1)  # every timed run measures exactly one step
    calls: list[int] = []
    r = time_callable(lambda: calls.append(1), warmup=2, min_runs=3, min_time_s=1.0, clock=clock)
    assert r.n_total == 10  # 10 x 0.1 s reaches 1 s despite float round-off
    assert len(calls) == 12  # warm-up calls happen but are not timed
    assert clock.calls == 20
    assert r.median_ms == pytest.approx(100.0)


def test_min_runs_decides_when_time_is_reached_early() -> None:
    r = time_callable(lambda: None, warmup=0, min_runs=25, min_time_s=1.0, clock=FakeClock(0.1))
    assert r.n_total == 25


def test_max_runs_caps_the_loop() -> None:
    r = time_callable(lambda: None, min_runs=50, min_time_s=10.0, max_runs=4, clock=FakeClock(0.1))
    assert r.n_total == 4
    frozen = time_callable(lambda: None, min_runs=1, min_time_s=1.0, max_runs=7, clock=FakeClock())
    assert frozen.n_total == 7


def test_time_callable_clips_a_slow_run() -> None:
    clock = FakeClock()
    durations_ms = [500.0] * 3 + JITTER[:5] + [1000.0] + JITTER[5:]  # warm-up is slow too
    durations = iter(durations_ms)

    def fn() -> None:
        clock.advance(next(durations) / 1000.0)

    r = time_callable(fn, warmup=3, min_runs=11, min_time_s=0.0, clock=clock)
    assert r.n_total == 11 and r.n_clipped == 1
    assert r.samples_ms == pytest.approx(JITTER)


def test_interleaved_rotates_after_own_warmup() -> None:
    """Each round starts one candidate later, so none always follows the same one."""
    clock = FakeClock()
    order: list[str] = []

    def make(name: str, seconds: float):
        def fn() -> None:
            order.append(name)
            clock.advance(seconds)

        return fn

    fns = {"a": make("a", 0.001), "b": make("b", 0.002), "c": make("c", 0.003)}
    results = interleaved(fns, batch=4, warmup=2, min_runs=3, min_time_s=0.0, clock=clock)
    warmups = ["a", "a", "b", "b", "c", "c"]
    assert order == [*warmups, "a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert list(results) == ["a", "b", "c"]
    assert [results[k].median_ms for k in "abc"] == pytest.approx([1.0, 2.0, 3.0])
    assert all(results[k].n_total == 3 for k in "abc")
    assert results["a"].throughput_per_s == pytest.approx(4000.0)


def test_interleaved_waits_for_the_slowest_to_fill_its_time() -> None:
    clock = FakeClock()
    fast = lambda: clock.advance(0.01)  # noqa: E731
    slow = lambda: clock.advance(0.1)  # noqa: E731
    results = interleaved({"fast": fast, "slow": slow}, warmup=0, min_runs=2, clock=clock)
    # The fast one needs 100 rounds to measure 1 s; the slow one runs along in every round.
    assert results["fast"].n_total == 100
    assert results["slow"].n_total == 100


def test_interleaved_caps_rounds_and_handles_empty() -> None:
    results = interleaved({"x": lambda: None}, min_runs=50, max_runs=6, clock=FakeClock(0.1))
    assert results["x"].n_total == 6
    assert interleaved({}) == {}


def test_bad_arguments_rejected() -> None:
    with pytest.raises(ValueError):
        time_callable(lambda: None, min_runs=0)
    with pytest.raises(ValueError):
        interleaved({"x": lambda: None}, warmup=-1)
    assert math.isinf(summarize([0.0]).throughput_per_s)
