"""Eval throughput: samples/s of the runner (``attnkit eval``) at several batch sizes, answers compared with batch 1.

    python -m benchmarks.eval_throughput [--model demo|mid|PATH] [--family llava|llava_next|qwen2_5_vl]
        [--size tiny|mid|7b] [--batches 1 4 8 16] [--samples N] [--device cpu|cuda]
        [--dtype float32|float16|bfloat16] [--max-new-tokens N] [--clock wall|process] [--no-lmms] [--dry-run]

Models: ``demo`` (the embedded demo model on its synthetic POPE), ``mid`` (a random-weight model of ``--family`` at
``--size``: ``mid`` = benchmarks.common.MID, ``7b`` = the family's 7B architecture, GPU only; EOS disabled so every
sample decodes ``--max-new-tokens`` tokens), or a model folder. Without ``--model``: demo, then mid. The samples are
the first ``--samples`` questions of the demo's POPE (split in turn), images resized to the model's input side
(Qwen: 192 px = 576 visual tokens at its 4-px tiny patches, as benchmarks/pruning.py).

Columns: samples/s = steady state, the samples after the first batch / the time from the first batch's rows to the
last row (so model load, warm-up and fingerprinting are left out; the first batch is the warm-up's shape);
speed-up over batch 1 of the same table; median per-sample prefill ms and decode ms/token as the rows record them
(the batch's time / batch size); "== batch 1": yes, or how many answers differ. The lmms-eval rows run the same
samples through lmms-eval's ``simple_evaluate`` with ``--model attnkit`` on a local task (``attnkit lmms-task``),
when lmms-eval is installed: samples/s = requests / ``generate_until`` wall time after a one-prompt warm-up.
``--clock process`` (the default on CPU) times with this process's CPU time: on a shared machine other processes'
load then does not land on whichever batch size runs while it peaks (with OMP_NUM_THREADS=1 it is the work done);
``wall`` (the default on CUDA, where the work is on the GPU) times with the wall clock. The per-sample prefill and
decode columns are the rows' own wall-clock figures.
``--dry-run``: tiny sizes, 8 samples, batches 1 2 4 (a CPU check of the script itself).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from attnkit import testing
from attnkit.eval import runner
from attnkit.eval.benchmarks import get_benchmark
from benchmarks.common import MID, machine

FAMILIES = ("llava", "llava_next", "qwen2_5_vl")
SIZES = {
    "tiny": {f: testing.TinySize() for f in FAMILIES},
    "mid": {f: MID for f in FAMILIES},
    "7b": {  # LLaVA-1.5-7B / LLaVA-NeXT-7B (Vicuna-7B + CLIP-L/336) and Qwen2.5-VL-7B language models
        "llava": testing.TinySize(hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008,
                                  vision_hidden=1024, vision_layers=24, vision_heads=16, image=336, patch=14,
                                  vocab=32064),
        "llava_next": testing.TinySize(hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008,
                                       vision_hidden=1024, vision_layers=24, vision_heads=16, image=336, patch=14,
                                       vocab=32064),
        "qwen2_5_vl": testing.TinySize(hidden=3584, layers=28, heads=28, kv_heads=4, intermediate=18944,
                                       vision_hidden=1280, vision_layers=32, vision_heads=16, image=336, patch=14,
                                       vocab=152064),
    },
}
DEMO_DATA = Path(__file__).resolve().parents[1] / "attnkit" / "assets" / "demo" / "data"


# --- data ----------------------------------------------------------------------------------------
def write_pope(out: Path, n: int, side: int | None) -> Path:
    """The first ``n`` demo POPE questions (taken from the splits in turn) as a POPE folder; images resized to
    ``side`` px (None: as shipped)."""
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    (out / "images").mkdir(exist_ok=True)
    splits = ("random", "popular", "adversarial")
    rows = {s: [json.loads(x) for x in (DEMO_DATA / f"synth_pope_{s}.json").read_text().splitlines()] for s in splits}
    taken: dict[str, list[dict]] = {s: [] for s in splits}
    for i in range(n):
        split = splits[i % 3]
        taken[split].append(rows[split][i // 3])
    for split, items in taken.items():
        (out / f"synth_pope_{split}.json").write_text("".join(json.dumps(r) + "\n" for r in items))
        for r in items:
            target = out / "images" / r["image"]
            if not target.exists():
                with Image.open(DEMO_DATA / "images" / r["image"]) as im:
                    im = im.convert("RGB")
                    (im.resize((side, side), Image.BICUBIC) if side else im).save(target)
    return out


# --- models --------------------------------------------------------------------------------------
def random_model(family: str, size_name: str, device: str, dtype: torch.dtype):
    size = SIZES[size_name][family]
    model = testing.tiny_model(family, size=size, dtype=dtype).to(device)
    model.generation_config.eos_token_id = None          # random weights: every sample decodes the full budget
    return model, testing.tiny_processor(family, size), size


def image_side(family: str, size: testing.TinySize) -> int:
    return 4 * 2 * 24 if family.startswith("qwen") else size.image


# --- the runner ----------------------------------------------------------------------------------
CLOCKS = {"wall": time.perf_counter, "process": time.process_time}


def runner_rows(model, processor, model_dir: Path, data: Path, out: Path, batch: int, max_new: int | None,
                clock=time.perf_counter):
    """(rows by id, steady-state samples/s) of one baseline run at ``batch``."""
    bench = get_benchmark("pope", data)
    stamps: list[float] = []
    (res,) = runner.evaluate(bench, ["baseline"], out, runner.RunSettings(str(model_dir), max_new_tokens=max_new),
                             model=model, processor=processor, progress=False, batch_size=batch,
                             after_sample=lambda row: stamps.append(clock()), log=lambda _: None)
    rows = {r["id"]: r for r in runner.read_rows(Path(res.path))}
    first = min(batch, len(stamps))
    rate = (len(stamps) - first) / (stamps[-1] - stamps[first - 1]) if len(stamps) > first else float("nan")
    return rows, rate


# --- lmms-eval -----------------------------------------------------------------------------------
def lmms_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("lmms_eval", "datasets"))


def lmms_answers(model_dir: Path, task_dir: Path, out: Path, batch: int, max_new: int, device: str, dtype: str,
                 no_eos: bool, clock=time.perf_counter):
    """(answers by question id, samples/s of generate_until) through lmms-eval's simple_evaluate."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from attnkit.integrations.lmms_eval_model import AttnkitLMMS

    model = AttnkitLMMS(pretrained=str(model_dir), output_dir=str(out), batch_size=str(batch), dtype=dtype,
                        device_map=None if device == "cpu" else "cuda:0")
    gen = model.generator
    if no_eos:
        gen.model.generation_config.eos_token_id = None
    spent: list[float] = []
    real = gen.generate_until

    def timed(args_list, task_dict):
        t0 = clock()
        try:
            return real(args_list, task_dict)
        finally:
            spent.append(clock() - t0)

    gen.generate_until = timed
    try:
        with _quiet():
            prompt = gen.processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                                                       add_generation_prompt=True)
            gen.generate_prompts([prompt], [[]], {"max_new_tokens": 2})              # warm-up
            result = simple_evaluate(model=model, tasks=["attnkit_pope"], log_samples=True,
                                     gen_kwargs=f"max_new_tokens={max_new}", verbosity="ERROR",
                                     task_manager=TaskManager("ERROR", include_path=str(task_dir),
                                                              include_defaults=False))
    finally:
        gen.close()
    samples = result["samples"]["attnkit_pope"]
    return {s["doc"]["question_id"]: s["resps"][0][0] for s in samples}, len(samples) / sum(spent)


@contextlib.contextmanager
def _quiet():
    """lmms-eval logs every task step at INFO to stderr; keep the table readable."""
    import logging

    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="ERROR")
    level = logging.root.level
    logging.root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logging.root.setLevel(level)


# --- tables --------------------------------------------------------------------------------------
def _differ(answers: dict, reference: dict) -> str:
    n = sum(answers.get(k) != v for k, v in reference.items())
    return "yes" if n == 0 and set(answers) == set(reference) else f"{n} differ"


def _median(rows: dict, key: str) -> str:
    vals = [r[key] for r in rows.values() if r.get(key) is not None]
    return f"{statistics.median(vals):.1f}" if vals else "n/a"


def table(name: str, model, processor, model_dir: Path, data: Path, work: Path, batches: list[int],
          max_new: int | None, lmms: tuple[str, str, bool] | None, clock=time.perf_counter) -> None:
    n = len(get_benchmark("pope", data).samples())
    print(f"\n{name}: {n} POPE questions, max new tokens {max_new or 'POPE budget (16; EOS ends early)'}")
    print("| path | batch | samples/s | speed-up | prefill ms/sample | decode ms/token/sample | == batch 1 |")
    print("|---|---|---|---|---|---|---|")
    reference, base = None, None
    for b in batches:
        rows, rate = runner_rows(model, processor, model_dir, data, work / f"runner_b{b}", b, max_new, clock)
        answers = {k: r.get("prediction") for k, r in rows.items()}
        reference = reference or answers
        base = base or rate
        print(f"| runner | {b} | {rate:.2f} | {rate / base:.2f}x | {_median(rows, 'prefill_ms')} | "
              f"{_median(rows, 'decode_ms_per_token')} | {_differ(answers, reference)} |", flush=True)
    if lmms is None:
        return
    if not lmms_available():
        print("| lmms-eval | - | not installed (pip install --no-deps lmms-eval==0.7.3) | | | | |")
        return
    from attnkit.integrations.lmms_eval_tasks import write_pope_task

    os.environ.setdefault("HF_DATASETS_CACHE", str(work / "hf_datasets"))
    os.environ.setdefault("TQDM_DISABLE", "1")         # lmms-eval's progress bars; the table is on stdout
    task_dir = work / "lmms_task"
    write_pope_task(data, task_dir)
    reference, base = None, None
    for b in batches:
        answers, rate = lmms_answers(model_dir, task_dir, work / f"lmms_b{b}", b, max_new or 16, *lmms, clock=clock)
        reference = reference or answers
        base = base or rate
        print(f"| lmms-eval | {b} | {rate:.2f} | {rate / base:.2f}x | | | {_differ(answers, reference)} |", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="demo, mid (random weights of --family at --size) or a model folder "
                                        "(default: demo, then mid)")
    parser.add_argument("--family", choices=FAMILIES, default="llava", help="random-weight model family")
    parser.add_argument("--size", choices=sorted(SIZES), default=None, help="random-weight model size (default mid)")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="batch sizes (default 1 4 8 16)")
    parser.add_argument("--samples", type=int, default=None, help="POPE questions per run (default 64)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                        help="default: float32 on CPU, float16 on CUDA (bfloat16 for Qwen)")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="random-weight models' decode budget")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default=None,
                        help="what samples/s is timed with (default: process CPU time on CPU, wall clock on CUDA)")
    parser.add_argument("--no-lmms", action="store_true", help="skip the lmms-eval rows")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes, 8 samples, batches 1 2 4")
    args = parser.parse_args(argv)
    size = args.size or ("tiny" if args.dry_run else "mid")
    batches = args.batches or ([1, 2, 4] if args.dry_run else [1, 4, 8, 16])
    n = args.samples or (8 if args.dry_run else 64)
    if any(b < 1 for b in batches) or n < 1:
        parser.error(f"--batches {batches} and --samples {n} must be positive")
    if size == "7b" and args.device == "cpu":
        parser.error("--size 7b builds a 7B model: run it with --device cuda (on a GPU), not on the CPU")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this torch sees no CUDA device")
    dtype_name = args.dtype or ("float32" if args.device == "cpu" else
                                "bfloat16" if args.family.startswith("qwen") else "float16")
    dtype = getattr(torch, dtype_name)
    clock_name = args.clock or ("process" if args.device == "cpu" else "wall")
    clock = CLOCKS[clock_name]
    models = [args.model] if args.model else ["demo", "mid"]
    print(f"device: {machine()}; torch {torch.__version__}; {dtype_name}; {clock_name} clock; OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}")
    with tempfile.TemporaryDirectory(prefix="attnkit_throughput_") as tmp:
        work = Path(tmp)
        for which in models:
            here = work / which.replace("/", "_")
            if which == "demo":
                from attnkit.synth.demo import demo_model_path, load_demo

                model, processor = load_demo(dtype)
                model = model.to(args.device)
                data = write_pope(here / "data", n, None)
                lmms = None if args.no_lmms else (args.device, dtype_name, False)
                table("demo model (LLaVA, 144 visual tokens)", model, processor, demo_model_path(), data, here,
                      batches, None, lmms, clock)
            elif which == "mid":
                model, processor, s = random_model(args.family, size, args.device, dtype)
                folder = here / f"{args.family}_random"
                small = size != "7b"
                if small:                                  # lmms-eval loads from a folder; the runner hashes it
                    model.save_pretrained(folder)
                else:
                    model.config.save_pretrained(folder)
                processor.save_pretrained(folder)
                data = write_pope(here / "data", n, image_side(args.family, s))
                lmms = (args.device, dtype_name, True) if small and not args.no_lmms else None
                table(f"random-weight {args.family} ({size}: hidden {s.hidden}, {s.layers} layers)", model,
                      processor, folder, data, here, batches, args.max_new_tokens, lmms, clock)
                if not small and not args.no_lmms:
                    print("(lmms-eval rows skipped at --size 7b: it loads the model from a folder, 14 GB to write)")
            else:
                from attnkit.eval.loading import load_model_and_processor

                path = Path(which)
                model, processor = load_model_and_processor(path, dtype=dtype_name,
                                                            device_map=None if args.device == "cpu" else "cuda:0")
                data = write_pope(here / "data", n, None)
                lmms = None if args.no_lmms else (args.device, dtype_name, False)
                table(f"{path.name}", model, processor, path, data, here, batches, None, lmms, clock)
            del model
    return 0


if __name__ == "__main__":
    sys.exit(main())
