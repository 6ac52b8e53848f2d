"""Visual-token pruning: prefill, decode and KV-cache cost of cls-prune and fastv against the baseline.

    python -m benchmarks.pruning [--repeats 3] [--decode 8] [--families llava qwen2_vl] [--size mid|7b]

LLaVA-1.5 layout (CLIP at 336 px / 14 -> 576 visual tokens) at keep = 576 (none), 192, 128, 64, and
Qwen2-VL with the same number of visual tokens at the matching ratios. Mid-size random-weight configs
by default (real modeling code; latency does not depend on the weights); ``--size 7b`` builds the
LLaVA-1.5-7B / Qwen2-VL-7B language-model shapes (for a GPU). All rows of a table come from one run.

Columns: visual tokens the LLM sees; prefill = one ``generate(max_new_tokens=1)`` (vision + LLM);
LLM prefill = the language-model part of it; decode = ms per further token; KV = cache bytes after
the prompt; peak = CUDA peak memory (n/a on CPU); speed-up / ideal = achieved LLM-prefill speed-up over
the one expected from the sequence lengths alone (baseline tokens / kept tokens).
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


def _run(model, inputs, specs, decode: int, repeats: int, device) -> dict[str, dict]:
    results: dict[str, dict] = {}
    samples: dict[str, dict[str, list[float]]] = {s: {"prefill": [], "llm": [], "decode": []} for s in specs}
    stats: dict[str, dict] = {}
    for r in range(repeats + 1):  # round 0 warms up
        for spec in specs:
            handle = attnkit.wrap(model, *([spec] if spec != "baseline" else []))
            try:
                t1 = _timed(lambda: model.generate(**inputs, max_new_tokens=1, do_sample=False), device)
                llm_ms = handle.stats()["prefill_ms"]
                kv = _kv_bytes(model, inputs)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                tn = _timed(lambda: model.generate(**inputs, max_new_tokens=1 + decode, do_sample=False), device)
                peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
                st = handle.stats()
            finally:
                handle.remove()
            if r:
                samples[spec]["prefill"].append(t1)
                samples[spec]["llm"].append(llm_ms / 1e3)
                samples[spec]["decode"].append((tn - t1) / decode)
                name = spec.split(":")[0]
                stats[spec] = {"visual": (st.get(name, {}).get("visual_tokens_kept") or st["visual_tokens"])[0],
                               "kv": kv, "peak": peak}
    for spec in specs:
        results[spec] = {k: statistics.median(v) for k, v in samples[spec].items()} | stats[spec]
    return results


def _timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad():
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _kv_bytes(model, inputs) -> int:
    with torch.no_grad():
        cache = model(**inputs, use_cache=True).past_key_values
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def table(family: str, size_name: str, decode: int, repeats: int, device, dtype) -> None:
    size = SIZES[size_name]
    model = testing.tiny_model(family, size=size, dtype=dtype).to(device)
    model.generation_config.eos_token_id = None
    inputs = _inputs(family, size, device)
    n_visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
    specs = ["baseline"] + [f"cls-prune:keep={k / n_visual:.4g}" for k in KEEPS[1:]] + \
            [f"fastv:k=2,keep={k / n_visual:.4g}" for k in KEEPS[1:]]
    if family == "llava":
        specs[1:4] = [f"cls-prune:keep={k}" for k in KEEPS[1:]]
    res = _run(model, inputs, specs, decode, repeats, device)
    base = res["baseline"]
    length = inputs["input_ids"].shape[1]
    print(f"\n{family} ({size_name}: hidden {size.hidden}, {size.layers} layers; prompt {length} tokens, "
          f"{n_visual} visual; {dtype}; median of {repeats})")
    print("| intervention | visual | prefill ms | LLM prefill ms | decode ms/tok | KV MiB | peak MiB | "
          "LLM speed-up | ideal | achieved/ideal |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for spec, r in res.items():
        kept_len = length - (n_visual - r["visual"])
        if spec.startswith("fastv"):  # layers < k see all tokens
            k = 2
            kept_len = (k * length + (size.layers - k) * kept_len) / size.layers
        speed = base["llm"] / r["llm"]
        ideal = length / kept_len
        peak = "n/a" if r["peak"] is None else f"{r['peak'] / 2**20:.0f}"
        print(f"| {spec} | {r['visual']} | {r['prefill'] * 1e3:.0f} | {r['llm'] * 1e3:.0f} | "
              f"{r['decode'] * 1e3:.1f} | {r['kv'] / 2**20:.1f} | {peak} | {speed:.2f} | {ideal:.2f} | "
              f"{speed / ideal:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode", type=int, default=8, help="decode steps timed per run")
    parser.add_argument("--families", nargs="+", default=["llava", "qwen2_vl"])
    parser.add_argument("--size", choices=sorted(SIZES), default="mid")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    print(f"device: {machine()}; torch {torch.__version__}")
    for family in args.families:
        table(family, args.size, args.decode, args.repeats, device, dtype)


if __name__ == "__main__":
    main()
