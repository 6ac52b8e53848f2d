"""Bootstrap intervals for a run: every config's metrics and its paired difference vs the baseline, one set of draws.

One :func:`attnkit.eval.bootstrap.bootstrap_ci` call scores every config on each draw, so a difference taken
inside a draw is exactly :func:`~attnkit.eval.bootstrap.paired_ci` (same seed, same draws) and the draws are made
once for all configs. For POPE and CHAIR the metrics are functions of per-sample counts (POPE's confusion cells,
CHAIR's mentions / hallucinations / covered objects), so each answer is parsed and each caption's objects are
extracted once, and a draw is a weighted sum of those counts; the result equals scoring each draw with the
benchmark's own ``score`` (the tests check it value for value). Other benchmarks score each draw with
``bench.score`` (slower: :data:`FALLBACK_RESAMPLES` draws).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from attnkit.eval.bootstrap import bootstrap_ci, significant
from attnkit.eval.metrics import (
    CHAIR_COUNTS,
    Confusion,
    chair_counts,
    chair_from_counts,
    parse_yes_no,
    pope_from_counts,
)

RESAMPLES = 1000
FALLBACK_RESAMPLES = 200
LEVEL = 0.95
_SEP = "\x1f"          # config index | metric, inside the joint score's keys


class _Drawn(NamedTuple):
    """A sample as the draws see it: its position in the table and its split (the bootstrap's stratum)."""

    index: int
    split: str


class CountTable(NamedTuple):
    """Per-sample additive counts: ``counts[i, k]`` is sample i's count vector under config k (zeros when it has no
    prediction); ``metrics(vector)`` turns summed counts into the benchmark's metrics."""

    counts: np.ndarray
    metrics: Callable[[Sequence[int]], dict[str, float]]


def config_intervals(bench, samples: Sequence, predictions: Sequence[Mapping[str, str]], *,
                     metrics: Collection[str] | None = None, resamples: int | None = None, seed: int = 0,
                     level: float = LEVEL, score: Callable | None = None) -> list[dict[str, Any]]:
    """Per config (``predictions[0]`` is the baseline's), ``{"ci": {metric: [low, high]}, "paired": {metric:
    [low, high]}, "significant": [metric, ...]}``: the percentile interval of each metric, and of ``metric(config)
    − metric(baseline)`` over the same draws (absent for the baseline); a difference is significant when its
    interval excludes 0. ``metrics``: only these (matched on the part after the last ``/``, so ``"f1"`` keeps
    ``f1`` and ``random/f1``); default all. Draws are stratified by split (:mod:`attnkit.eval.bootstrap`);
    ``resamples`` defaults to :data:`RESAMPLES` (:data:`FALLBACK_RESAMPLES` without a count table). ``score``
    (``score(samples, predictions) -> metrics``, e.g. ``bench.score`` plus a metric of one's own): score each draw
    with it instead of the benchmark's count table."""
    def wanted(metric: str) -> bool:
        return not _is_count(metric) and (metrics is None or metric.rsplit("/", 1)[-1] in metrics)

    table = count_table(bench, samples, predictions) if score is None else None
    score = score or bench.score
    if table is not None:
        weights_of = _weights(len(samples))

        def per_config(draw: Sequence[_Drawn]) -> list[dict[str, float]]:
            summed = np.tensordot(weights_of(draw), table.counts, axes=1).astype(np.int64).tolist()
            return [table.metrics(vector) for vector in summed]

        drawn: Sequence = [_Drawn(i, s.split) for i, s in enumerate(samples)]
    else:
        def per_config(draw: Sequence) -> list[dict[str, float]]:
            return [dict(score(draw, p)) for p in predictions]

        drawn = samples
    resamples = resamples or (RESAMPLES if table is not None else FALLBACK_RESAMPLES)

    def joint(draw: Sequence, _unused: Mapping) -> dict[str, float]:
        scored = [{m: v for m, v in got.items() if wanted(m)} for got in per_config(draw)]
        out = {f"{k}{_SEP}{m}": v for k, metrics in enumerate(scored) for m, v in metrics.items()}
        for k, metrics in enumerate(scored[1:], start=1):
            out.update({f"{k}{_SEP}Δ{_SEP}{m}": metrics[m] - scored[0][m] for m in metrics
                        if m in scored[0] and _number(metrics[m]) and _number(scored[0][m])})
        return {k: v for k, v in out.items() if _number(v)}

    found = bootstrap_ci(joint, drawn, {}, resamples=resamples, seed=seed, level=level)
    out: list[dict[str, Any]] = [{"ci": {}, "paired": {}} for _ in predictions]
    for key, (low, high) in found.items():
        k, *rest = key.split(_SEP)
        slot = out[int(k)]["paired" if len(rest) == 2 else "ci"]
        slot[rest[-1]] = [low, high]
    for k, entry in enumerate(out):
        if k == 0:
            del entry["paired"]
        else:
            entry["significant"] = sorted(m for m, ci in entry["paired"].items() if significant(tuple(ci)))
    return out


def default_resamples(bench) -> int:
    """:data:`RESAMPLES` where the benchmark has a count table (POPE, CHAIR), else :data:`FALLBACK_RESAMPLES`."""
    return RESAMPLES if getattr(bench, "name", None) in _TABLES else FALLBACK_RESAMPLES


def count_table(bench, samples: Sequence, predictions: Sequence[Mapping[str, str]]) -> CountTable | None:
    """The per-sample count table of POPE or CHAIR (None for other benchmarks)."""
    make = _TABLES.get(getattr(bench, "name", None))
    return make(bench, samples, predictions) if make is not None else None


def _pope_table(bench, samples: Sequence, predictions: Sequence[Mapping[str, str]]) -> CountTable:
    """POPE: per split (in first-seen order) the cells tp, fp, tn, fn of one question ("yes" positive;
    unparsed answers count as the benchmark's ``unparsed_as``, as ``PopeBenchmark.score``)."""
    splits = list(dict.fromkeys(s.split for s in samples))
    unparsed_as = bench.options.get("unparsed_as", "yes")
    counts = np.zeros((len(samples), len(predictions), 4 * len(splits)), dtype=np.float64)
    for k, preds in enumerate(predictions):
        for i, s in enumerate(samples):
            if preds.get(s.id) is None:
                continue
            said = parse_yes_no(preds[s.id]) or unparsed_as
            cell = (0 if s.answer == "yes" else 1) if said == "yes" else (3 if s.answer == "yes" else 2)
            counts[i, k, 4 * splits.index(s.split) + cell] = 1

    def metrics(vector: Sequence[int]) -> dict[str, float]:
        out: dict[str, float] = {}
        total = [0, 0, 0, 0]
        for j, split in enumerate(splits):
            cells = vector[4 * j: 4 * j + 4]
            if sum(cells):
                out.update({f"{split}/{m}": v for m, v in pope_from_counts(Confusion(*cells)).items()})
                total = [a + b for a, b in zip(total, cells, strict=True)]
        return {**out, **pope_from_counts(Confusion(*total))}

    return CountTable(counts, metrics)


def _chair_table(bench, samples: Sequence, predictions: Sequence[Mapping[str, str]]) -> CountTable:
    """CHAIR: per caption :data:`~attnkit.eval.metrics.CHAIR_COUNTS`, its length in words and 1 (the caption),
    with each caption's objects extracted once (``ChairBenchmark.score``'s extractor and ground truth)."""
    width = len(CHAIR_COUNTS) + 2
    counts = np.zeros((len(samples), len(predictions), width), dtype=np.float64)
    for k, preds in enumerate(predictions):
        for i, s in enumerate(samples):
            caption = preds.get(s.id)
            if caption is None:
                continue
            said = [m.category for m in bench.extractor(caption).mentions]
            counts[i, k] = (*chair_counts(said, s.meta["gt_objects"]), len(caption.split()), 1)

    def metrics(vector: Sequence[int]) -> dict[str, float]:
        *summed, words, n = vector
        out = chair_from_counts(n, *summed, n_words=words)
        return {m: v for m, v in out.items() if m in ("chair_s", "chair_i", "recall", "avg_len")}

    return CountTable(counts, metrics)


_TABLES = {"pope": _pope_table, "chair": _chair_table}


def _weights(n: int) -> Callable[[Sequence[_Drawn]], np.ndarray]:
    def weights(draw: Sequence[_Drawn]) -> np.ndarray:
        return np.bincount(np.fromiter((d.index for d in draw), dtype=np.int64, count=len(draw)), minlength=n
                           ).astype(np.float64)
    return weights


def _is_count(metric: str) -> bool:
    """``n``, ``n_unparsed``, ``random/n`` ...: counts, not metrics (as :mod:`attnkit.eval.bootstrap` skips them)."""
    leaf = metric.rsplit("/", 1)[-1]
    return leaf == "n" or leaf.startswith("n_")


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
