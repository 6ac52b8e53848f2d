"""Run-level bootstrap intervals: the count-table fast path equals bootstrap_ci / paired_ci over the benchmark's own
score, value for value; significance marks; error rows; the generic fallback."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from attnkit.eval import intervals
from attnkit.eval.benchmarks import get_benchmark
from attnkit.eval.bootstrap import bootstrap_ci, paired_ci

DATA = Path(__file__).parent / "data"


def _pope():
    from attnkit.synth.demo import demo_data_path

    bench = get_benchmark("pope", demo_data_path(), limit=40, prompt_suffix="")
    return bench, bench.samples()


def _noisy(samples, rate: float, seed: int) -> dict[str, str]:
    rng = random.Random(seed)
    return {s.id: (rng.choice(["yes", "no", "Yes, there is.", "I cannot tell"]) if rng.random() < rate
                   else s.answer.capitalize() + ".") for s in samples}


def test_pope_intervals_equal_the_benchmarks_own_bootstrap():
    bench, samples = _pope()
    base, other = _noisy(samples, 0.1, 1), _noisy(samples, 0.4, 2)
    del other[samples[3].id]                                  # an error row: no prediction
    got = intervals.config_intervals(bench, samples, [base, other], resamples=60, seed=3)
    for k, preds in enumerate((base, other)):
        ref = bootstrap_ci(bench.score, samples, preds, resamples=60, seed=3)
        shared = set(ref) & set(got[k]["ci"])
        assert {"f1", "accuracy", "random/f1", "adversarial/precision", "yes_ratio"} <= shared
        assert all(tuple(got[k]["ci"][m]) == ref[m] for m in shared)
    ref = paired_ci(bench.score, samples, base, other, resamples=60, seed=3)
    assert "paired" not in got[0] and "f1" in got[1]["paired"]
    assert all(tuple(got[1]["paired"][m]) == ref[m] for m in set(ref) & set(got[1]["paired"]))


def test_chair_intervals_equal_the_benchmarks_own_bootstrap():
    bench = get_benchmark("chair", DATA / "chair")
    samples = bench.samples()
    words = ["a dog on a couch", "a cat and a person", "two people near a car", "a dog and a dog", "nothing here"]
    rng = random.Random(0)
    preds = [{s.id: rng.choice(words) for s in samples} for _ in range(3)]
    got = intervals.config_intervals(bench, samples, preds, resamples=40, seed=1)
    for k in range(3):
        ref = bootstrap_ci(bench.score, samples, preds[k], resamples=40, seed=1)
        for m in ("chair_i", "chair_s", "recall", "avg_len"):
            assert tuple(got[k]["ci"][m]) == ref[m]
    ref = paired_ci(bench.score, samples, preds[0], preds[2], resamples=40, seed=1)
    assert tuple(got[2]["paired"]["chair_i"]) == ref["chair_i"]


def test_significance_needs_an_interval_that_excludes_zero():
    bench, samples = _pope()
    right = {s.id: s.answer for s in samples}
    flipped = {s.id: ("no" if s.answer == "yes" else "yes") if i % 2 else s.answer for i, s in enumerate(samples)}
    got = intervals.config_intervals(bench, samples, [right, dict(right), flipped], metrics={"f1"}, resamples=200)
    assert got[1]["paired"]["f1"] == [0.0, 0.0] and got[1]["significant"] == []
    assert got[2]["paired"]["f1"][1] < 0 and got[2]["significant"] == ["adversarial/f1", "f1", "popular/f1",
                                                                         "random/f1"]
    assert set(got[0]["ci"]) == {"f1", "random/f1", "popular/f1", "adversarial/f1"}     # only the asked metric


def test_other_benchmarks_use_their_own_score_per_draw():
    bench = get_benchmark("mme", DATA / "mme")
    samples = bench.samples()
    preds = [{s.id: "Yes" for s in samples}, {s.id: "No" for s in samples}]
    assert intervals.count_table(bench, samples, preds) is None
    assert intervals.default_resamples(bench) == intervals.FALLBACK_RESAMPLES
    got = intervals.config_intervals(bench, samples, preds, metrics={"perception"}, resamples=30, seed=2)
    ref = paired_ci(bench.score, samples, preds[0], preds[1], resamples=30, seed=2)
    assert tuple(got[1]["paired"]["perception"]) == ref["perception"]
    with pytest.raises(ValueError, match="resamples=1"):
        intervals.config_intervals(bench, samples, preds, resamples=1)
