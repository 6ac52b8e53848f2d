"""Bootstrap confidence intervals over samples, for a benchmark's metrics and for paired differences.

Percentile bootstrap (Efron & Tibshirani, ch. 13): draw the samples with replacement ``resamples`` times,
score each draw with the benchmark's own ``score``, and take the ``(1 - level) / 2`` and ``(1 + level) / 2``
quantiles. Draws are stratified by ``Sample.split`` (each split keeps its size, so a POPE split's metric is
resampled over that split's questions only). A *paired* interval draws the same samples for two configs and
takes the quantiles of ``metric(b) - metric(a)``: configs run on the same questions, so their errors are
correlated and the paired interval is the one that says whether a difference is real. A difference counts
as significant only when its interval excludes 0.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence

Score = Callable[[Sequence, Mapping[str, str]], Mapping[str, float]]


def _draws(samples: Sequence, resamples: int, seed: int) -> list[list]:
    """``resamples`` stratified draws (lists of samples, with repeats) of ``samples``."""
    by_split: dict[str, list] = {}
    for s in samples:
        by_split.setdefault(s.split, []).append(s)
    rng = random.Random(seed)
    return [[rng.choice(items) for items in by_split.values() for _ in items] for _ in range(resamples)]


def _quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of sorted ``values`` (numpy's default rule)."""
    pos = q * (len(values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def _interval(values: list[float], level: float) -> tuple[float, float]:
    values = sorted(values)
    return _quantile(values, (1 - level) / 2), _quantile(values, (1 + level) / 2)


def _metric_keys(m: Mapping[str, float]) -> list[str]:
    """The metrics of a score dict: numbers, not counts (``n``, ``n_unparsed``, ``n_missing`` ...)."""
    return [k for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            and k.split("/")[-1] != "n" and not k.split("/")[-1].startswith("n_")]


def bootstrap_ci(score: Score, samples: Sequence, predictions: Mapping[str, str], *, resamples: int = 1000,
                 seed: int = 0, level: float = 0.95) -> dict[str, tuple[float, float]]:
    """``{metric: (low, high)}``: the percentile interval of each metric ``score`` reports (counts excluded)."""
    _check(resamples, level)
    values: dict[str, list[float]] = {}
    for draw in _draws(samples, resamples, seed):
        for k in _metric_keys(m := score(draw, predictions)):
            values.setdefault(k, []).append(float(m[k]))
    return {k: _interval(v, level) for k, v in values.items()}


def paired_ci(score: Score, samples: Sequence, base: Mapping[str, str], other: Mapping[str, str], *,
              resamples: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, tuple[float, float]]:
    """``{metric: (low, high)}``: the interval of ``metric(other) - metric(base)`` over the same draws."""
    _check(resamples, level)
    values: dict[str, list[float]] = {}
    for draw in _draws(samples, resamples, seed):
        a, b = score(draw, base), score(draw, other)
        for k in _metric_keys(a):
            if k in b:
                values.setdefault(k, []).append(float(b[k]) - float(a[k]))
    return {k: _interval(v, level) for k, v in values.items()}


def significant(interval: tuple[float, float] | None) -> bool:
    """True when a paired difference's interval excludes 0."""
    return interval is not None and (interval[0] > 0 or interval[1] < 0)


def _check(resamples: int, level: float) -> None:
    if resamples < 2:
        raise ValueError(f"resamples={resamples}: the bootstrap needs at least 2 draws")
    if not 0 < level < 1:
        raise ValueError(f"level={level}: a confidence level is in (0, 1), e.g. 0.95")
