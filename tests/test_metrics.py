"""metrics.compare on what user models give: small heads, several outputs, features."""

from __future__ import annotations

import math

import numpy as np

from mobilevit_deploy.exporters.int8_search import SEARCH_TIE_FACTOR
from mobilevit_deploy.judge import Bound, judge
from mobilevit_deploy.metrics import NEAR_TIE_FACTOR, Metrics, compare
from mobilevit_deploy.verify import near_tie_note


def test_top5_of_a_head_with_fewer_than_five_classes_is_all_of_them():
    """A 4-class head scored 0.8 top-5 agreement against itself (overlap divided by 5)."""
    logits = np.random.default_rng(0).normal(size=(6, 4))
    assert compare(logits, logits)["top5"] == 1.0
    assert compare(logits, logits)["top1"] == 1.0


def test_several_outputs_are_each_compared_and_the_worst_one_counts():
    rng = np.random.default_rng(1)
    maps = (rng.normal(size=(2, 8, 4, 4)), 100 * rng.normal(size=(2, 16, 2, 2)))
    noisy = (maps[0] + 1e-3, maps[1] + 1e-3)  # the same absolute error, not relative
    metrics = compare(maps, noisy, "features")
    each = metrics["outputs"]
    assert each[0]["max_rel"] > 50 * each[1]["max_rel"]
    assert metrics["max_rel"] == each[0]["max_rel"]
    assert metrics["psnr_db"] == min(m["psnr_db"] for m in each)
    assert "top1" not in metrics and "decisive_agreement" not in each[0]


def test_features_are_judged_by_psnr_alone():
    rng = np.random.default_rng(2)
    ref = rng.normal(size=(4, 32))
    close = compare(ref, ref + 1e-4 * rng.normal(size=ref.shape), "features")
    far = compare(ref, ref + 0.1 * rng.normal(size=ref.shape), "features")
    verdict = judge(close, Bound("fp16", 40.0, "given"))
    assert (verdict.passed, verdict.words) == (True, ">=40dB")
    assert judge(far, Bound("fp16", 40.0, "given")).passed is False


def test_an_overflowed_candidate_fails_instead_of_raising():
    """A broken fp16 ExecuTorch file returned inf logits (SepViT-Lite, before its
    LayerNorm ran in fp32) and compare raised a math domain error: verify crashed."""
    reference = np.random.default_rng(0).normal(size=(4, 10))
    for bad in (np.inf, np.nan):
        candidate = reference.copy()
        candidate[1, 3] = bad
        metrics = compare(reference, candidate)
        assert metrics["psnr_db"] == -math.inf
        assert (
            not judge(metrics, Bound("fp16", 40.0, "given")).passed
            and not judge(metrics, Bound("fp32", 1e-5, "given")).passed
        )


def test_files_of_a_static_batch_run_in_chunks_padded_at_the_end():
    from mobilevit_deploy.runtimes import run_per_sample

    seen = []

    def runner(x):
        seen.append(len(x))
        assert len(x) == 3  # the file's static batch
        return x * 2, x[:, :1]

    x = np.arange(7 * 2, dtype=np.float32).reshape(7, 2)
    doubled, first = run_per_sample(runner, x, batch=3)
    assert seen == [3, 3, 3] and np.array_equal(doubled, x * 2) and first.shape == (7, 1)


def test_the_near_tie_note_says_when_no_agreement_was_judged():
    """FastViT-SA12's int8 row: every input near-tied, and the note said "agreement
    judged on decisive inputs (1.000)" of none."""
    none = Metrics(0, 0, 1, 60, agreement=1.0, decisive_agreement=1.0, decisive=0, near_ties=1.0)
    assert near_tie_note(none, "classification").startswith(
        "agreement not judged (0 decisive inputs); 100.0% are near-ties"
    )
    some = Metrics(0, 0, 1, 60, agreement=0.9, decisive_agreement=0.9, decisive=10, near_ties=0.5)
    assert near_tie_note(some, "segmentation").startswith(
        "agreement judged on decisive pixels (0.900); 50.0% are near-ties"
    )


def test_a_flip_a_few_rms_errors_from_its_runner_up_is_a_tie_for_verify_not_the_search():
    """Stressed LeViT-192 TFLite int8 at 42.2 dB failed verify on one flipped input of
    seven decisive ones, its margin 3.15x the RMS error: a margin is a difference of two
    outputs, whose error is about sqrt(2)x theirs. The int8 search still counts such a
    flip (SEARCH_TIE_FACTOR), so its files keep a margin over verify's rule."""
    rng = np.random.default_rng(3)
    noise = 0.05
    reference = rng.normal(size=(8, 100))
    reference[:, 0] = reference[:, 1:].max(axis=1) + 1.0  # 20x the noise: decisive
    reference[0, 0] = reference[0, 1:].max() + 3.6 * noise
    candidate = reference + rng.normal(scale=noise, size=reference.shape)
    runner_up = 1 + int(np.argmax(reference[0, 1:]))
    candidate[0, runner_up] = candidate[0, 0] + 0.01  # input 0's decision flips
    noise = math.sqrt(np.mean((reference - candidate)[1:] ** 2))  # of the agreeing inputs
    margin = reference[0, 0] - reference[0, runner_up]
    assert SEARCH_TIE_FACTOR < margin / noise < NEAR_TIE_FACTOR

    verified = compare(reference, candidate)
    assert verified["top1"] == 7 / 8 and verified["psnr_db"] > 30
    assert verified["decisive"] == 7 and verified["decisive_agreement"] == 1.0
    assert judge(verified, Bound("int8", 25.0, "given")).passed
    searched = compare(reference, candidate, tie_factor=SEARCH_TIE_FACTOR)
    assert searched["decisive"] == 8 and searched["decisive_agreement"] == 7 / 8
    assert not judge(searched, Bound("int8", 25.0, "given")).passed
    candidate[1, 1] = candidate[1, 0] + 0.3  # a decisive flip fails verify too
    assert not judge(compare(reference, candidate), Bound("int8", 25.0, "given")).passed


def test_flipped_pixels_do_not_widen_the_noise_that_would_excuse_them():
    """A segmenter's map whose flips carry most of its error: judged against the RMS
    error of every pixel, 20% of the pixels flipped by a 0.3 error on their runner-up
    were near-ties; against the agreeing pixels' error they are decisive and fail."""
    rng = np.random.default_rng(5)
    reference = rng.normal(size=(2, 5, 16, 16))
    reference[:, 0] = reference[:, 1:].max(axis=1) + 0.2  # class 0 wins every pixel by 0.2
    candidate = reference + rng.normal(scale=0.01, size=reference.shape)
    flipped = rng.random((2, 16, 16)) < 0.2
    runner_up = 1 + reference[:, 1:].argmax(axis=1)
    n, h, w = np.nonzero(flipped)
    candidate[n, runner_up[flipped], h, w] += 0.3
    all_rms = math.sqrt(np.mean((reference - candidate) ** 2))
    assert NEAR_TIE_FACTOR * all_rms > 0.2  # every margin inside the band of all pixels
    metrics = compare(reference, candidate, "segmentation")
    assert metrics["pixel_agreement"] == 1 - flipped.mean()
    assert metrics["decisive"] == flipped.size and metrics["decisive_agreement"] < 0.9
    assert not judge(metrics, Bound("fp16", 30.0, "given")).passed


def test_a_file_whose_every_decision_flipped_fails_on_agreement():
    """No decision agrees: there is no agreeing noise to excuse a flip, so every input
    is decisive and the agreement is 0."""
    reference = np.array([[2.0, 1.0, 0.0]] * 4)
    candidate = reference[:, [1, 0, 2]]  # top-1 and runner-up swapped on every input
    metrics = compare(reference, candidate)
    assert metrics["decisive"] == 4 and metrics["decisive_agreement"] == 0.0
    assert not judge(metrics, Bound("fp16", 0.0, "given")).passed
