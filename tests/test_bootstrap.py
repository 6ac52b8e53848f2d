"""Bootstrap intervals: exact cases, stratification, and the normal approximation on a large sample."""

from __future__ import annotations

import math

import pytest

from attnkit.eval.benchmarks.base import Sample
from attnkit.eval.bootstrap import bootstrap_ci, paired_ci, significant


def _samples(n: int, split: str = "s") -> list[Sample]:
    return [Sample(f"{split}/{i}", None, "q", "yes", split) for i in range(n)]


def accuracy(samples, preds):
    return {"accuracy": sum(preds[s.id] == s.answer for s in samples) / len(samples), "n": len(samples)}


def test_identical_configs_have_a_zero_interval():
    samples = _samples(50)
    preds = {s.id: ("yes" if i % 3 else "no") for i, s in enumerate(samples)}
    ci = paired_ci(accuracy, samples, preds, dict(preds), resamples=200)
    assert ci == {"accuracy": (0.0, 0.0)} and not significant(ci["accuracy"])


def test_all_right_vs_all_wrong_is_significant():
    samples = _samples(30)
    wrong, right = {s.id: "no" for s in samples}, {s.id: "yes" for s in samples}
    ci = paired_ci(accuracy, samples, wrong, right, resamples=100)
    assert ci["accuracy"] == (1.0, 1.0) and significant(ci["accuracy"])
    assert bootstrap_ci(accuracy, samples, right, resamples=100) == {"accuracy": (1.0, 1.0)}


def test_counts_are_not_metrics_and_draws_keep_each_split_size():
    samples = _samples(7, "a") + _samples(3, "b")
    sizes = set()

    def per_split(draw, preds):
        sizes.add((sum(s.split == "a" for s in draw), sum(s.split == "b" for s in draw)))
        return {"accuracy": 1.0, "n": len(draw), "a/n_unparsed": 0}

    assert set(bootstrap_ci(per_split, samples, {}, resamples=50)) == {"accuracy"}
    assert sizes == {(7, 3)}


def test_large_sample_matches_the_normal_approximation():
    samples = _samples(400)
    preds = {s.id: ("yes" if i % 2 else "no") for i, s in enumerate(samples)}   # accuracy 0.5
    lo, hi = bootstrap_ci(accuracy, samples, preds, resamples=2000, seed=1)["accuracy"]
    half = 1.96 * math.sqrt(0.25 / 400)
    assert lo == pytest.approx(0.5 - half, abs=0.01) and hi == pytest.approx(0.5 + half, abs=0.01)


def test_bad_settings_name_the_value():
    with pytest.raises(ValueError, match="resamples=1"):
        bootstrap_ci(accuracy, _samples(3), {}, resamples=1)
    with pytest.raises(ValueError, match="level=95"):
        paired_ci(accuracy, _samples(3), {}, {}, level=95)
