"""Visual-token pruning: prefill, decode and KV-cache cost of the seven pruners at equal budgets vs the baseline.

    python -m benchmarks.pruning [--repeats 3] [--decode 8] [--families llava qwen2_vl] [--size mid|7b] [--no-vte]

LLaVA-1.5 layout (CLIP at 336 px / 14 -> 576 visual tokens) at keep = 576 (none), 192, 128, 64, and
Qwen2-VL with the same number of visual tokens at the matching ratios. Mid-size random-weight configs
by default (real modeling code; latency does not depend on the weights); ``--size 7b`` builds the published
LLaVA-1.5-7B / LLaVA-NeXT-7B / Qwen2-VL-7B / Qwen2.5-VL-7B configs on the device (``benchmarks.gpu_models``; for a
GPU: ``benchmarks/gpu.sh`` runs them all). All rows of a table come from one run.

Columns: visual tokens the LLM sees; prefill = start of ``generate()`` to the end of its first forward
(vision + LLM); LLM prefill = that first forward alone; decode = median ms of the later forwards; KV = cache bytes after
the prompt; peak = CUDA peak memory (n/a on CPU); speed-up / ideal = achieved LLM-prefill speed-up over
the one expected from the sequence lengths alone (baseline tokens / kept tokens).
A last table runs ``vte`` (visual-token exit) on a 32-layer config: exits after layers 2, 8, 16 and
the calibrated policy (calibrated here on two images, on random weights: it shows the mechanics).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import attnkit
from attnkit import testing
from benchmarks.common import machine

SIZES = {
    "mid": testing.TinySize(hidden=1024, layers=8, heads=16, kv_heads=16, intermediate=2816, vision_hidden=256,
                            vision_layers=4, vision_heads=8, image=336, patch=14, vocab=256),
    "deep": testing.TinySize(hidden=512, layers=32, heads=8, kv_heads=8, intermediate=1376, vision_hidden=256,
                             vision_layers=4, vision_heads=8, image=336, patch=14, vocab=256),
    "7b": testing.TinySize(hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008, vision_hidden=1024,
                           vision_layers=24, vision_heads=16, image=336, patch=14, vocab=32064),
}
KEEPS = [576, 192, 128, 64]


def _inputs(family: str, size: testing.TinySize, device):
    processor = testing.tiny_processor(family, size)
    if family.startswith("qwen"):
        image = (4 * 2 * 24, 4 * 2 * 24)  # 48x48 patches of 4 px, merged 2x2 -> 576 tokens
    else:
        image = (size.image, size.image)
    inputs = testing.tiny_inputs(processor, batch=1, image_sizes=[image])
    return {k: v.to(device) for k, v in inputs.items()}


def _run(model, inputs, specs, decode: int, repeats: int, device, clock=time.perf_counter,
         deadline: float | None = None) -> dict[str, dict]:
    """Per spec: medians over ``repeats`` interleaved rounds (round 0 warms up and is dropped) of the prefill,
    LLM-prefill and decode times, plus the last round's kept counts, KV bytes and CUDA peak memory (total and
    above what was allocated before the call: weights and inputs). With ``deadline`` (``time.time()``), rounds
    stop after the first measured one that ends past it; ``rounds`` says how many were kept."""
    samples: dict[str, dict[str, list[float]]] = {s: {"prefill": [], "llm": [], "decode": []} for s in specs}
    stats: dict[str, dict] = {}
    rounds = 0
    for r in range(repeats + 1):  # round 0 warms up
        for spec in specs:
            handle = attnkit.wrap(model, *([spec] if spec != "baseline" else []))
            try:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    before = torch.cuda.memory_allocated()
                prefill, llm, dec = _timed(model, inputs, 1 + decode, device, clock)
                peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
                st = handle.stats()
                kv = _kv_bytes(model, inputs)
            finally:
                handle.remove()
            if r:
                samples[spec]["prefill"].append(prefill)
                samples[spec]["llm"].append(llm)
                samples[spec]["decode"].append(dec)
                name = spec.split(":")[0]
                own = st.get(name, {})
                stages = own.get("stages") or ([{"from_layer": own["from_layer"],
                                                 "visual_tokens_kept": own["visual_tokens_kept"]}]
                                               if "from_layer" in own else [])
                stats[spec] = {"visual": (own.get("visual_tokens_kept") or st["visual_tokens"])[0],
                               "stages": [(s["from_layer"], s["visual_tokens_kept"][0]) for s in stages],
                               "kv": kv, "peak": peak, "peak_extra": None if peak is None else peak - before}
        rounds = r
        if r and deadline is not None and time.time() > deadline:
            break
    return {spec: {k: statistics.median(v) for k, v in samples[spec].items()} | stats[spec] | {"rounds": rounds}
            for spec in specs}


def _timed(model, inputs, new_tokens: int, device, clock) -> tuple[float, float, float]:
    """One greedy ``generate()``: seconds from its start to the end of the prefill forward (image encoding
    included: generate encodes the image before that forward), of the prefill forward alone (the LLM), and
    the median of the decode forwards."""
    marks: list[float] = []

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def mark(*_):  # returns None: a hook's return value would replace the forward's inputs / output
        sync()
        marks.append(clock())

    pre = model.register_forward_pre_hook(mark, prepend=True)
    post = model.register_forward_hook(mark)
    try:
        sync()
        t0 = clock()
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    finally:
        pre.remove()
        post.remove()
    forwards = [b - a for a, b in zip(marks[::2], marks[1::2])]
    return marks[1] - t0, forwards[0], statistics.median(forwards[1:])


def _kv_bytes(model, inputs) -> int:
    with torch.no_grad():
        cache = model(**inputs, use_cache=True, logits_to_keep=1).past_key_values
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def equal_budget_specs(k: int, n_visual: int, layers: int) -> list[str]:
    """The seven-method comparison at ``k`` of ``n_visual`` tokens: the tokens the LLM keeps after each method's
    last stage (VisionZip 54:10 dominant:contextual; DART's count is pivots + 8·⌊k/8⌋; PyramidDrop's λ with
    ⌊N λ³⌋ = k; SparseVLM's setting whose last budget is k)."""
    r = k / n_visual
    dominant = round(k * 54 / 64)
    lam = (k / n_visual) ** (1 / 3) + 1e-4
    setting = round(k * 192 * 576 / (110 * n_visual))
    return [f"cls-prune:keep={k}", f"fastv:k=2,keep={r:.4g}",
            f"visionzip:dominant={dominant},contextual={k - dominant}",
            f"dart:k=2,keep={k}", f"pyramiddrop:ratio={lam:.4g}", f"sparsevlm:keep={setting}",
            f"cls-prune:keep={k},score=random"]


def mean_length(length: int, n_visual: int, stages: list[tuple[int, int]], layers: int) -> float:
    """The sequence length the LLM's layers see on average: full before the first stage, then each stage's."""
    per_layer = []
    for i in range(layers):
        kept = n_visual
        for start, n in stages:
            if start <= i:
                kept = n
        per_layer.append(length - n_visual + kept)
    return sum(per_layer) / layers


def table_lines(res: dict[str, dict], length: int, n_visual: int, layers: int) -> list[str]:
    """The markdown table of :func:`_run`'s results (baseline first)."""
    base = res["baseline"]
    lines = ["| intervention | visual | prefill ms | LLM prefill ms | decode ms/tok | KV MiB | peak MiB "
             "(over weights) | LLM speed-up | ideal | achieved/ideal |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for spec, r in res.items():
        kept_len = mean_length(length, n_visual, r["stages"], layers)
        speed = base["llm"] / r["llm"]
        ideal = length / kept_len
        peak = "n/a" if r["peak"] is None else f"{r['peak'] / 2**20:.0f} ({r['peak_extra'] / 2**20:.0f})"
        lines.append(f"| {spec} | {r['visual']} | {r['prefill'] * 1e3:.0f} | {r['llm'] * 1e3:.0f} | "
                     f"{r['decode'] * 1e3:.1f} | {r['kv'] / 2**20:.1f} | {peak} | {speed:.2f} | {ideal:.2f} | "
                     f"{speed / ideal:.2f} |")
    return lines


def table(family: str, size_name: str, decode: int, repeats: int, device, dtype, clock) -> None:
    if size_name == "7b":   # the published configs, built on the device (never materialised on the CPU)
        from benchmarks import gpu_models

        model = gpu_models.build(family, device, dtype)
        inputs = gpu_models.inputs(family, device)
        layers = gpu_models.dims(family).layers
        label = gpu_models.describe(family)
    else:
        size = SIZES[size_name]
        with torch.device(device):
            model = testing.tiny_model(family, size=size, dtype=dtype)
        model.generation_config.eos_token_id = None
        inputs = _inputs(family, size, device)
        layers = size.layers
        label = f"{size_name}: hidden {size.hidden}, {size.layers} layers"
    n_visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
    specs = ["baseline"] + [spec for k in KEEPS[1:] for spec in equal_budget_specs(k, n_visual, layers)]
    res = _run(model, inputs, specs, decode, repeats, device, clock)
    length = inputs["input_ids"].shape[1]
    print(f"\n{family} ({label}; prompt {length} tokens, {n_visual} visual; {dtype}; median of {repeats})")
    print("\n".join(table_lines(res, length, n_visual, layers)), flush=True)


def vte_table(size_name: str, decode: int, repeats: int, device, dtype, clock) -> None:
    """vte on a 32-layer LLaVA-1.5 layout: fixed exits after layers 2, 8, 16 and the calibrated policy."""
    import tempfile
    from pathlib import Path

    from attnkit.interventions.vte_calibration import calibrate_exit_layer

    size = SIZES["deep" if size_name == "mid" else size_name]
    with torch.device(device):   # a 7B-size model is never materialised on the CPU
        model = testing.tiny_model("llava", size=size, dtype=dtype)
    model.generation_config.eos_token_id = None
    inputs = _inputs("llava", size, device)
    processor = testing.tiny_processor("llava", size)

    class Sample:
        def __init__(self, i):
            self.image, self.question = testing.tiny_image(i, size.image, size.image), "describe this image"

    calibration = Path(tempfile.mkdtemp()) / "exit.json"
    chosen = calibrate_exit_layer(model, processor, [Sample(i) for i in range(2)], calibration)["exit_layer"]
    specs = ["baseline"] + [f"vte:policy=layer,exit_layer={k}" for k in (2, 8, 16)] + [f"vte:calibration={calibration}"]
    res = _run(model, inputs, specs, decode, repeats, device, clock)
    base = res["baseline"]
    print(f"\nvte on llava ({size.layers} layers, hidden {size.hidden}; prompt {inputs['input_ids'].shape[1]} "
          f"tokens; calibrated exit on 2 random images of this random model: layer {chosen}; median of {repeats})")
    print("| intervention | prefill ms | LLM prefill ms | decode ms/tok | KV MiB | KV vs baseline | LLM speed-up |")
    print("|---|---|---|---|---|---|---|")
    for spec, r in res.items():
        name = spec if "calibration" not in spec else f"vte:calibrated (exit {chosen})"
        print(f"| {name} | {r['prefill'] * 1e3:.0f} | {r['llm'] * 1e3:.0f} | {r['decode'] * 1e3:.1f} | "
              f"{r['kv'] / 2**20:.1f} | {r['kv'] / base['kv']:.2f} | {base['llm'] / r['llm']:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode", type=int, default=8, help="decode steps timed per run")
    parser.add_argument("--families", nargs="+", default=["llava", "qwen2_vl"], choices=testing.ALL_FAMILIES)
    parser.add_argument("--size", choices=sorted(SIZES), default="mid")
    parser.add_argument("--no-vte", action="store_true", help="skip the vte table (32-layer config)")
    parser.add_argument("--clock", choices=("wall", "process"), default="wall",
                        help="process: CPU time of one torch thread (robust on a shared CPU; not for GPUs)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    clock = time.perf_counter
    if args.clock == "process":
        torch.set_num_threads(1)
        clock = time.process_time
    print(f"device: {machine()}; torch {torch.__version__}; {args.clock} clock")
    for family in args.families:
        bf16 = args.size == "7b" and device.type == "cuda" and family.startswith("qwen")   # the checkpoints' dtype
        table(family, args.size, args.decode, args.repeats, device, torch.bfloat16 if bf16 else dtype, clock)
    if not args.no_vte:
        vte_table(args.size, args.decode, args.repeats, device, dtype, clock)


if __name__ == "__main__":
    main()
