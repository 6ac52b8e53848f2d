"""The measuring step of the GPU run book (``benchmarks/gpu.sh`` calls it): one markdown file, appended as it goes.

    python -m benchmarks.gpu_run --out FILE [--families llava llava_next qwen2_5_vl] [--deadline EPOCH]
                                 [--attn sdpa flash_attention_2] [--dry-run]

Writes the header (the GPU by name, versions, date; exit 3 at once without a CUDA device unless ``--dry-run``),
then per family builds the published 7B architecture (``benchmarks.gpu_models``; random weights created on the
GPU in the checkpoint's dtype) and measures, each a section written as soon as it is done: the no-op wrapping
overhead; every pruner at equal budgets per attention implementation (LLaVA-1.5 and Qwen: 576 -> 192 / 128 / 64
visual tokens; LLaVA-NeXT: 2880 -> 144, FasterVLM's 95 % point) with prefill, decode, KV cache, CUDA peak memory
and achieved / ideal speed-up; and the decode overhead of var / vhr / pai. A part that raises is reported with
its error and the others go on. The time left before ``--deadline`` is shared between the families, and within
a family between the parts still to run (a part past its share stops after its current measured round). Exit
status 1 if any part failed or was skipped for lack of time.
``--dry-run``: toy dimensions of the same configs on the CPU in float32, fewer rounds, ``eager`` standing in for
the second attention implementation: every code path in seconds.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks import gpu_env, gpu_models, overhead, pruning

# 576 -> 192 / 128 / 64; NeXT 2880 -> 144 (FasterVLM's 95 % reduction)
KEEP_FRACTIONS = {"llava": (1 / 3, 2 / 9, 1 / 9), "llava_next": (0.05,), "qwen2_vl": (1 / 3, 2 / 9, 1 / 9),
                  "qwen2_5_vl": (1 / 3, 2 / 9, 1 / 9)}
DECODE_SPECS = {"var": overhead.INTERVENTION_SPECS["var"], "vhr": "vhr", "pai": "pai"}
# shares of the family step's time: overhead, each pruning table, the decode overhead
WEIGHTS = {"overhead": 1, "pruning": 5, "decode": 2}
NO_GPU = 3   # exit status without a CUDA device (gpu.sh then stops)


class Writer:
    """Appends markdown to the results file as each part finishes (a part cut by a timeout loses only itself)."""

    def __init__(self, path: Path):
        self.path = path

    def __call__(self, *lines: str) -> None:
        with self.path.open("a") as f:
            f.write("\n".join(lines) + "\n")


def _flash_usable(device: torch.device) -> str | None:
    """None if flash-attention-2 can run here, else why not."""
    if device.type != "cuda":
        return "no CUDA device"
    try:
        import flash_attn  # noqa: F401
    except Exception as e:   # noqa: BLE001
        return f"flash_attn not importable ({type(e).__name__}: {e})"
    return None


def family_step(family: str, out: Path, deadline: float, attns: list[str], dry_run: bool) -> int:
    """Measure one architecture; returns the number of parts that failed or were skipped."""
    write = Writer(out)
    device = torch.device("cpu" if dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        write(f"## {family}", "", "**FAILED**: no CUDA device (torch.cuda.is_available() is False); use --dry-run "
              "for a CPU check", "")
        print("no CUDA device", file=sys.stderr)
        return 1
    dtype = torch.float32 if dry_run else gpu_models.DTYPES[family]
    repeats, decode = (1, 2) if dry_run else (3, 8)
    clock = time.perf_counter
    failures = 0
    t0 = time.time()
    write(f"## {family}: {gpu_models.describe(family, dry_run)}", "")
    print(f"[{family}] building {gpu_models.describe(family, dry_run)} on {device.type}", flush=True)
    try:
        model = gpu_models.build(family, device, dtype, attn="sdpa", tiny=dry_run)
        inputs = gpu_models.inputs(family, device, tiny=dry_run)
        with torch.no_grad():
            logits = model(**inputs, logits_to_keep=1).logits
        finite = bool(torch.isfinite(logits).all())
    except Exception as e:   # noqa: BLE001 -- nothing below can run; say why and stop
        traceback.print_exc()
        write(f"**FAILED** to build or run the model: {type(e).__name__}: {e}", "")
        return 1
    ids = inputs["input_ids"]
    n_visual = int((ids == model.config.image_token_id).sum())
    n_content = gpu_models.content_tokens(family, dry_run)
    layers = gpu_models.dims(family, dry_run).layers
    weights = f"{torch.cuda.memory_allocated() / 2**30:.1f} GiB allocated" if device.type == "cuda" else "CPU"
    write(f"Built in {time.time() - t0:.1f} s on {device.type}, {dtype} ({weights}); prompt {ids.shape[1]} tokens, "
          f"{n_visual} visual ({n_content} image tokens{' + newlines' if n_content != n_visual else ''}); "
          f"last-token logits {'finite' if finite else '**NOT finite** (random fp16 weights overflowed)'}.", "")
    print(f"[{family}] built in {time.time() - t0:.1f} s", flush=True)

    parts: list[tuple[str, str, Callable[[float], list[str]]]] = [
        ("overhead", "No-op wrapping overhead (sdpa)", lambda dl: _overhead_part(model, inputs, dry_run))]
    for attn in attns:
        parts.append(("pruning", f"Pruners at equal budgets ({attn})",
                      lambda dl, attn=attn: _pruning_part(model, inputs, family, attn, n_visual, n_content, layers,
                                                          decode, repeats, device, clock, dl, dry_run)))
    parts.append(("decode", "var / vhr / pai decode overhead (sdpa)",
                  lambda dl: _decode_part(model, inputs, family, repeats, decode, clock, dl)))
    for i, (kind, title, run) in enumerate(parts):
        start = time.time()
        left = deadline - start
        share = left * WEIGHTS[kind] / sum(WEIGHTS[k] for k, _, _ in parts[i:])
        write(f"### {title}", "")
        if left <= 0:
            write("**SKIPPED**: the time budget ran out before this part", "")
            print(f"[{family}] {title}: skipped (budget spent)", flush=True)
            failures += 1
            continue
        try:
            write(*run(start + share), "")
            print(f"[{family}] {title}: {time.time() - start:.1f} s", flush=True)
        except Exception as e:   # noqa: BLE001 -- report, go on with the next part
            traceback.print_exc()
            write(f"**FAILED** after {time.time() - start:.1f} s: {type(e).__name__}: {e}", "")
            print(f"[{family}] {title}: FAILED ({type(e).__name__}: {e})", flush=True)
            failures += 1
        finally:   # the next part starts from the plain sdpa model, whatever this one left behind
            leaked = getattr(model, "_attnkit_handle", None)
            if leaked is not None:
                leaked.remove()
            if model.config.text_config._attn_implementation != "sdpa":
                model.set_attn_implementation("sdpa")
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(f"[{family}] done in {time.time() - t0:.1f} s, {failures} part(s) failed or skipped", flush=True)
    return failures


def _overhead_part(model, inputs, dry_run: bool) -> list[str]:
    r = overhead.overhead("", repeats=2 if dry_run else 9, model=model, inputs=inputs)
    return ["| tokens | unwrapped ms | wrapped (no-op) ms | median ratio |", "|---|---|---|---|",
            f"| {r['tokens']} | {r['plain'] * 1e3:.2f} | {r['run'] * 1e3:.2f} | {r['ratio']:.3f} |"]


def _pruning_part(model, inputs, family, attn, n_visual, n_content, layers, decode, repeats, device, clock,
                  deadline, dry_run) -> list[str]:
    if attn == "flash_attention_2" and (why := _flash_usable(device)):
        return [f"skipped: {why}"]
    if attn != "sdpa":
        model.set_attn_implementation(attn)
    keeps = [round(f * n_content) for f in KEEP_FRACTIONS[family]]
    if dry_run and attn != "sdpa":
        keeps = keeps[:1]   # the switch of implementation is what a dry run checks here
    specs = ["baseline"] + [s for k in keeps for s in pruning.equal_budget_specs(k, n_content, layers)]
    res = pruning._run(model, inputs, specs, decode, repeats, device, clock, deadline=deadline)
    rounds = res["baseline"]["rounds"]
    length = inputs["input_ids"].shape[1]
    note = f"{n_content} image tokens -> {' / '.join(map(str, keeps))}; median of {rounds} round(s) after a " \
           f"warm-up{' (cut short by the time budget)' if rounds < repeats else ''}; {decode} decode steps"
    if n_visual > n_content:
        note += (f"; the pruners before the LLM (cls-prune, visionzip) keep the {n_visual - n_content} newline tokens "
                 f"on top of the budget, the in-LLM ones count them in: 'visual' is what each kept")
    return [note, ""] + pruning.table_lines(res, length, n_visual, layers)


def _decode_part(model, inputs, family, repeats, decode, clock, deadline) -> list[str]:
    rows = overhead.intervention_overhead(family, DECODE_SPECS, repeats, decode, clock, model=model, inputs=inputs,
                                          deadline=deadline)
    lines = [f"{decode} new tokens; medians of interleaved rounds after a warm-up (rounds per row in the last column)",
             "", "| intervention | prefill ms base / with | prefill ratio | decode ms/token base / with | decode ratio "
             "| rounds |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{r['spec']}` | {r['pre'] * 1e3:.1f} / {r['pre_w'] * 1e3:.1f} | {r['pre_r']:.2f} | "
                     f"{r['dec'] * 1e3:.2f} / {r['dec_w'] * 1e3:.2f} | {r['dec_r']:.2f} | {r['rounds']} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the markdown file to append to")
    parser.add_argument("--families", nargs="+", default=["llava", "llava_next", "qwen2_5_vl"],
                        choices=gpu_models.FAMILIES)
    parser.add_argument("--attn", nargs="+", default=["sdpa", "flash_attention_2"],
                        choices=("sdpa", "flash_attention_2", "eager"))
    parser.add_argument("--deadline", type=float, default=None, help="time.time() by which to be done")
    parser.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU")
    args = parser.parse_args(argv)
    Writer(args.out)(gpu_env.header(args.dry_run))
    print(f"device: {gpu_env.device_name()}", flush=True)
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device (torch.cuda.is_available() is False): the run book needs a GPU; "
              "`bash benchmarks/gpu.sh --dry-run` checks it on the CPU", file=sys.stderr)
        return NO_GPU
    deadline = args.deadline if args.deadline is not None else time.time() + 3600
    failures = 0
    for i, family in enumerate(args.families):
        share = (deadline - time.time()) / (len(args.families) - i)
        try:
            failures += family_step(family, args.out, time.time() + share, args.attn, args.dry_run)
        except Exception as e:   # noqa: BLE001 -- the next family still runs
            traceback.print_exc()
            Writer(args.out)(f"**FAILED**: {type(e).__name__}: {e}", "")
            failures += 1
        gc.collect()   # the model of this family goes before the next one is built
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
