"""Overhead of wrapping: forward time of the wrapped model with no intervention over the unwrapped one.

    python benchmarks/overhead.py [--repeats 9] [--families llava qwen2_vl gemma3]   (default: every family)
    python benchmarks/overhead.py --interventions [var vhr pai mma] [--new-tokens 8]

Mid-size configs of each family (random weights, real modeling code) on whatever device is present;
both variants are timed in the same run, interleaved. Target: ratio <= 1.02.
With ``--interventions``: prefill ms and decode ms/token of ``generate()`` with each intervention over the
unwrapped model (per-forward timestamps inside the same ``generate()``; rounds interleaved). Target: decode
ratio <= 1.15.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import attnkit
from attnkit import testing
from benchmarks.common import machine, mid_inputs, mid_model, paired


def _sync_for(model):
    """``torch.cuda.synchronize`` if the model is on a GPU (kernels run asynchronously: a clock read without it
    times the launch, not the work), else a no-op."""
    if next(model.parameters()).device.type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def overhead(family: str, repeats: int, clock=time.perf_counter, model=None, inputs=None) -> dict[str, float]:
    """Median forward seconds unwrapped (``plain``) and wrapped with no intervention (``run``), in turns, and the
    median per-round ratio; on the mid-size ``family`` model unless ``model``/``inputs`` are given."""
    model = mid_model(family) if model is None else model
    inputs = mid_inputs(family) if inputs is None else inputs
    sync = _sync_for(model)
    handles = []

    def forward():
        with torch.no_grad():
            model(**inputs)
        sync()

    r = paired(forward, lambda: handles.append(attnkit.wrap(model)), forward, lambda: handles.pop().remove(),
               repeats=repeats, clock=clock)
    return {"tokens": inputs["input_ids"].shape[1], **r}


# settings that make each method act on random mid-size weights (no massive activations there: low tau)
INTERVENTION_SPECS = {"var": "var:sink_dims=0+1,tau=2", "vhr": "vhr", "pai": "pai", "mma": "mma"}


def _generate_timings(model, inputs, new_tokens: int, clock=time.perf_counter) -> tuple[float, float]:
    """(prefill s, median decode s/token) of one greedy ``generate()``, from per-forward timestamps (after a CUDA
    synchronisation on a GPU)."""
    sync = _sync_for(model)
    times: list[float] = []
    start: list[float] = []

    def begin(*_):   # returns None: a hook's return value would replace the forward's inputs
        sync()
        start.append(clock())

    def end(*_):
        sync()
        times.append(clock() - start[-1])

    pre = model.register_forward_pre_hook(begin, prepend=True)  # before vhr's pass
    post = model.register_forward_hook(end)
    try:
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    finally:
        pre.remove()
        post.remove()
    return times[0], statistics.median(times[1:])


def intervention_overhead(family: str, specs: dict[str, str], repeats: int, new_tokens: int,
                          clock=time.perf_counter, model=None, inputs=None,
                          deadline: float | None = None) -> list[dict]:
    """Per intervention: prefill and decode-step medians, unwrapped vs wrapped, and the median per-round ratios
    (on the mid-size ``family`` model unless ``model``/``inputs`` are given). With ``deadline`` (``time.time()``),
    an intervention's rounds stop after the first measured one that ends past it (``rounds`` says how many)."""
    model = mid_model(family) if model is None else model
    inputs = mid_inputs(family) if inputs is None else inputs
    rows = []
    for spec in specs.values():
        res: dict[str, list[float]] = {k: [] for k in ("pre", "pre_w", "dec", "dec_w", "pre_r", "dec_r")}
        for i in range(repeats + 1):            # round 0 warms up
            pre, dec = _generate_timings(model, inputs, new_tokens, clock)
            with attnkit.intervene(model, spec):
                pre_w, dec_w = _generate_timings(model, inputs, new_tokens, clock)
            if i:
                for k, v in (("pre", pre), ("pre_w", pre_w), ("dec", dec), ("dec_w", dec_w),
                             ("pre_r", pre_w / pre), ("dec_r", dec_w / dec)):
                    res[k].append(v)
                if deadline is not None and time.time() > deadline:
                    break
        rows.append({"family": family, "spec": spec, "tokens": inputs["input_ids"].shape[1],
                     "rounds": len(res["pre"]), **{k: statistics.median(v) for k, v in res.items()}})
    return rows


def main_interventions(args) -> None:
    names = args.interventions or list(INTERVENTION_SPECS)
    specs = {n: INTERVENTION_SPECS.get(n, n) for n in names}
    clock = time.process_time if args.clock == "process" else time.perf_counter
    if args.clock == "process":
        torch.set_num_threads(1)  # CPU time of one thread: robust to other processes on a shared machine
    print(f"device: {machine()}; torch {torch.__version__}; {args.new_tokens} new tokens, {args.repeats} rounds, "
          f"{args.clock} clock")
    print("| family | intervention | prompt tokens | prefill ms base / with | prefill ratio "
          "| decode ms/token base / with | decode ratio |")
    print("|---|---|---|---|---|---|---|")
    for family in args.families:
        for r in intervention_overhead(family, specs, args.repeats, args.new_tokens, clock):
            print(f"| {family} | `{r['spec']}` | {r['tokens']} | {r['pre'] * 1e3:.1f} / {r['pre_w'] * 1e3:.1f} "
                  f"| {r['pre_r']:.2f} | {r['dec'] * 1e3:.2f} / {r['dec_w'] * 1e3:.2f} | {r['dec_r']:.2f} |",
                  flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--families", nargs="+", default=list(testing.ALL_FAMILIES))
    parser.add_argument("--interventions", nargs="*", default=None,
                        help=f"time generate() with these (names: {', '.join(INTERVENTION_SPECS)}, or spec strings)")
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--clock", choices=("wall", "process"), default="wall",
                        help="process: single-thread CPU time (for loaded, shared CPUs; no GPU)")
    args = parser.parse_args()
    if args.interventions is not None:
        main_interventions(args)
        return
    clock = time.perf_counter
    if args.clock == "process":
        torch.set_num_threads(1)
        clock = time.process_time
    print(f"device: {machine()}; torch {torch.__version__}; {args.clock} clock")
    print("| family | tokens | unwrapped ms | wrapped (no-op) ms | median ratio |")
    print("|---|---|---|---|---|")
    for family in args.families:
        r = overhead(family, args.repeats, clock)
        print(f"| {family} | {r['tokens']} | {r['plain'] * 1e3:.1f} | {r['run'] * 1e3:.1f} | {r['ratio']:.3f} |",
              flush=True)


if __name__ == "__main__":
    main()
