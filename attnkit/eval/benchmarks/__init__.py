"""Benchmarks read local files in their published formats (nothing is fetched) and score with their own metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from attnkit.eval.benchmarks.amber import AmberBenchmark
from attnkit.eval.benchmarks.base import Benchmark, BenchmarkFormatError, Sample
from attnkit.eval.benchmarks.chair import ChairBenchmark
from attnkit.eval.benchmarks.mme import MMEBenchmark
from attnkit.eval.benchmarks.pope import PopeBenchmark

BENCHMARKS: dict[str, type[Benchmark]] = {b.name: b for b in (PopeBenchmark, ChairBenchmark, MMEBenchmark,
                                                               AmberBenchmark)}


def get_benchmark(name: str, data_dir: str | Path, **kw: Any) -> Benchmark:
    """Build a registered benchmark: ``get_benchmark("pope", "data/pope", splits=["random"], limit=100)``."""
    try:
        cls = BENCHMARKS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown benchmark '{name}'; available: {', '.join(sorted(BENCHMARKS))}") from None
    return cls(data_dir, **kw)


__all__ = ["BENCHMARKS", "AmberBenchmark", "Benchmark", "BenchmarkFormatError", "ChairBenchmark", "MMEBenchmark",
           "PopeBenchmark", "Sample", "get_benchmark"]
