"""Shared helpers for the benchmark scripts: mid-size configs of each family and interleaved timing."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from attnkit import testing

MID = testing.TinySize(hidden=512, layers=8, heads=8, kv_heads=8, intermediate=1376, vision_hidden=256,
                       vision_layers=6, vision_heads=8, image=224, patch=14, vocab=256)


def mid_model(family: str, size: testing.TinySize = MID, dtype=torch.float32, attn: str = "sdpa"):
    model = testing.tiny_model(family, size=size, dtype=dtype, attn_implementation=attn)
    model.generation_config.eos_token_id = None
    return model


def mid_inputs(family: str, size: testing.TinySize = MID, batch: int = 1):
    processor = testing.tiny_processor(family, size)
    if family.startswith("qwen"):
        # 128x128 px in 4-px patches, merged 2x2: 256 visual tokens, as many as LLaVA-1.5 at 224/14
        return testing.tiny_inputs(processor, batch=batch, image_sizes=[(128, 128)])
    return testing.tiny_inputs(processor, batch=batch, image_sizes=[(size.image, size.image)])


def timed(fn: Callable[[], object], clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds for one call."""
    t0 = clock()
    fn()
    return clock() - t0


def paired(plain: Callable[[], object], setup: Callable[[], object], run: Callable[[], object],
           teardown: Callable[[], object], repeats: int = 9, warmup: int = 2,
           clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median seconds of ``plain()`` and of ``run()`` (between an untimed ``setup()``/``teardown()``), in turns,
    plus the median of the per-round ratios (robust to load that drifts during the run)."""
    times: dict[str, list[float]] = {"plain": [], "run": [], "ratio": []}
    for i in range(warmup + repeats):
        a = timed(plain, clock)
        setup()
        try:
            b = timed(run, clock)
        finally:
            teardown()
        if i >= warmup:
            times["plain"].append(a)
            times["run"].append(b)
            times["ratio"].append(b / a)
    return {k: statistics.median(v) for k, v in times.items()}


def interleaved(fns: dict[str, Callable[[], object]], repeats: int = 7, warmup: int = 2) -> dict[str, float]:
    """Median seconds of each function, run in turn in every round so that drift hits all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(timed(fn))
    return {k: statistics.median(v) for k, v in times.items()}


def machine() -> str:
    import platform

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
