"""The one judge: every command's bound comes from bound_for, every verdict from judge."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from mobilevit_deploy.judge import (
    DEFAULT_INT8_TARGET_DB,
    DEFAULT_TOLERANCES,
    NOISE_FLOOR_FACTOR,
    REDUCED_PRECISION,
    bound_for,
    judge,
)
from mobilevit_deploy.metrics import compare


def _pair(psnr_db: float, n: int = 40, classes: int = 10):
    """A reference with clear decisions and a candidate at about `psnr_db`."""
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(n, classes))
    reference[np.arange(n), rng.integers(0, classes, n)] += 10.0  # decisive top-1s
    noise = rng.normal(size=reference.shape)
    scale = np.abs(reference).max() / 10 ** (psnr_db / 20) / np.sqrt(np.mean(noise**2))
    return reference, reference + noise * scale


def test_an_int8_file_is_held_to_its_own_target_even_zero():
    """A file searched for 0 dB is judged at 0 dB, not at the default 25 (verify read
    `target or floor`, so 0 fell through to 25 and a file bench passed, verify failed)."""
    reference, candidate = _pair(20.0)
    metrics = compare(reference, candidate)
    at_zero = bound_for("int8", record={"int8_target_db": 0.0})
    assert at_zero.limit == 0.0
    assert judge(metrics, at_zero).passed
    unrecorded = bound_for("int8", record={})
    assert unrecorded.limit == DEFAULT_INT8_TARGET_DB
    assert not judge(metrics, unrecorded).passed


def test_fp32_bound_widens_to_the_noise_floor_only_when_larger():
    base = DEFAULT_TOLERANCES["fp32"]
    assert bound_for("fp32", noise_floor=base / 10).limit == base
    wide = bound_for("fp32", noise_floor=base)
    assert wide.limit == pytest.approx(NOISE_FLOOR_FACTOR * base)
    assert "noise floor" in wide.source
    assert bound_for("fp32", tolerances={"fp32": 1e-3}).limit == 1e-3


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_reduced_precisions_need_psnr_and_decisive_agreement(precision):
    floor = REDUCED_PRECISION[precision]["min_psnr_db"]
    bound = bound_for(precision)
    good, bad = (compare(*_pair(floor + d)) for d in (10, -10))
    assert judge(good, bound).passed and not judge(bad, bound).passed
    flipped = dataclasses.replace(good, decisive_agreement=0.5)
    verdict = judge(flipped, bound)
    assert not verdict.passed and "agree>=" in verdict.words


def test_features_are_judged_by_psnr_alone():
    reference, candidate = _pair(50.0)
    metrics = compare(reference, candidate, "features")
    assert metrics.decisive_agreement is None and "decisive_agreement" not in metrics
    assert judge(metrics, bound_for("fp16")).words == ">=40dB"
    assert judge(metrics, bound_for("fp16")).passed


def test_metrics_are_one_type_that_reads_as_its_report():
    """Classifier, segmenter and features: one Metrics; the report keys name the task's."""
    reference, candidate = _pair(50.0)
    classifier = compare(reference, candidate)
    maps = compare(reference[:, :, None, None], candidate[:, :, None, None], "segmentation")
    features = compare((reference, reference), (candidate, candidate), "features")
    assert {type(classifier), type(maps), type(features)} == {type(classifier)}
    assert classifier["top1"] == classifier.agreement and "pixel_agreement" not in classifier
    assert maps["pixel_agreement"] == maps.agreement and maps.top5 is None
    assert len(features.outputs) == 2 and features.to_dict()["outputs"][0]["psnr_db"] > 40
