"""The ``attnkit`` command line: argument parsing only; the work is in ``attnkit.api`` and ``attnkit.eval``.

    attnkit eval                                   # the embedded demo: pruning trade-off + a hallucination method
    attnkit eval --model PATH --bench pope --data DIR --compare baseline "cls-prune:keep=64" "var"
    attnkit ablate --model PATH --bench pope --data DIR --sweep "cls-prune:keep=32,64,128"
    attnkit inspect --model PATH --image cat.png --prompt "Is there a cat?" --out maps/
    attnkit calibrate vhr --model PATH --data DIR --out heads.json [--set alpha=1.5]
    attnkit lmms-task --data DIR --out tasks/ [--limit N]   # a local lmms-eval POPE task (--include_path tasks/)
    attnkit list
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path

# What `attnkit eval` with no --model/--data runs (edit freely; the demo model has 144 visual tokens): the pruning
# trade-off on the clean demo POPE (a budget sweep where accuracy falls: benchmarks/RESULTS.md, "Pruning accuracy on
# the shipped demo"), and one hallucination comparison on the prone split. Configs that do not build from the
# registry are skipped with a note.
DEMO_COMPARE = ("baseline", "cls-prune:keep=36", "cls-prune:keep=24", "cls-prune:keep=12",
                "visionzip:dominant=10,contextual=2", "fastv:k=2,keep=12")
DEMO_HALLUCINATION = "pai"     # the best hallucination method on the prone split so far (with its CFG step)
DEMO_PRONE_COMPARE = ("baseline", DEMO_HALLUCINATION)
DEMO_BENCH = "pope"
DEMO_LIMIT = 20          # per POPE split: 60 questions per config and data set
DEMO_BENCH_OPTIONS = {"prompt_suffix": ""}      # the demo model was trained on the bare questions
DEMO_MAX_NEW_TOKENS = 4                         # yes/no answers
DEMO_TITLES = {"clean": "Pruning: accuracy vs visual tokens (clean demo POPE)",
               "prone": "Hallucination: baseline vs {method} (prone demo POPE: weak evidence, co-occurrence priors)"}
DEFAULT_OUT = "attnkit_runs"


class UsageError(ValueError):
    """A bad command line value; printed as ``attnkit: error: ...`` with exit status 2."""


# --- sweeps --------------------------------------------------------------------------------------
def expand_sweep(sweep: str) -> tuple[str, list[tuple[str, list[str]]]]:
    """``"cls-prune:keep=32,64,layer=2"`` -> ``("cls-prune", [("keep", ["32", "64"]), ("layer", ["2"])])``."""
    name, _, rest = sweep.strip().partition(":")
    keys: list[tuple[str, list[str]]] = []
    for token in (t.strip() for t in rest.split(",")):
        if not token:
            continue
        key, eq, value = token.partition("=")
        if eq:
            if not key.strip() or not value.strip():
                raise UsageError(f"bad sweep {sweep!r}: {token!r} needs a key and a value (key=v1,v2,...)")
            keys.append((key.strip(), [value.strip()]))
        elif keys:
            keys[-1][1].append(token)
        else:
            raise UsageError(f"bad sweep {sweep!r}: value {token!r} comes before any key=; "
                             "write name:key=v1,v2,other=v3,v4")
    if not name.strip():
        raise UsageError(f"bad sweep {sweep!r}: no intervention name; write name:key=v1,v2")
    return name.strip(), keys


def sweep_grid(sweeps: list[str]) -> list[str]:
    """The configs of one or more ``--sweep``: comma-separated values after ``key=`` are alternatives; several
    keys or several sweeps form the cartesian product (sweeps of different interventions combine with ``;``).
    The baseline comes first."""
    merged: dict[str, list[tuple[str, list[str]]]] = {}
    for sweep in sweeps:
        name, keys = expand_sweep(sweep)
        have = {k for k, _ in merged.get(name, [])}
        for k, _ in keys:
            if k in have:
                raise UsageError(f"parameter {k!r} of {name!r} is swept twice; give its values in one --sweep")
        merged.setdefault(name, []).extend(keys)
    per_name = []
    for name, keys in merged.items():
        combos = itertools.product(*[values for _, values in keys])
        per_name.append([name + (":" + ",".join(f"{k}={v}" for (k, _), v in zip(keys, c, strict=True))
                                 if keys else "") for c in combos])
    grid = [";".join(parts) for parts in itertools.product(*per_name)]
    return ["baseline"] + list(dict.fromkeys(g for g in grid if g != "baseline"))


# --- helpers -------------------------------------------------------------------------------------
def _device_map(device: str) -> str | None:
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return None
    if device.startswith("cuda") or device == "map":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: this torch ({torch.__version__}) sees no CUDA device; "
                             "use --device cpu or auto (or install a CUDA build of torch)")
        index = device.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise UsageError(f"--device {device}: no such GPU; allowed: cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if device == "cuda":
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    if device == "map":
        return "auto"                   # accelerate spreads one model over the visible GPUs
    if not device.startswith("cuda:"):
        raise UsageError(f"--device {device!r}: use auto, cpu, cuda, cuda:N or map")
    return device


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer; give a positive number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be a positive number (1 or more)")
    return value


def _demo(kind: str = "clean"):
    """The embedded default: ``(model path, POPE data dir)`` of ``attnkit.synth.demo`` (``kind``: its data set)."""
    try:
        from attnkit.synth.demo import demo_data_path, demo_model_path
    except ImportError as e:
        raise UsageError(f"the embedded demo (attnkit.synth.demo) is not available in this install ({e}); "
                         "pass --model PATH --data DIR") from None
    model, data = Path(demo_model_path()), Path(demo_data_path(kind))
    if not (model / "config.json").is_file():
        raise UsageError(f"the embedded demo model is missing from this install ({model}); build it with "
                         "`python scripts/train_demo.py` or pass --model PATH --data DIR")
    return model, data


def demo_configs(compare: tuple[str, ...] | None = None) -> list[str]:
    """``compare`` (default :data:`DEMO_COMPARE`) restricted to configs that build (their interventions are
    registered)."""
    from attnkit.eval.runner import canonical

    out = []
    for config in DEMO_COMPARE if compare is None else compare:
        try:
            canonical(config)
        except (ValueError, TypeError) as e:
            print(f"attnkit: demo: skipping {config!r} ({e})", file=sys.stderr)
            continue
        out.append(config)
    return out


def _bench_options(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise UsageError(f"bad --bench-option {item!r}; write key=value")
        out[key.strip()] = value
    return out


def _calibrate_options(fn, items: list[str]) -> dict[str, object]:
    """``--set key=value`` items as keyword arguments of ``fn``, each converted to its default's type."""
    import inspect

    params = {n: p for n, p in list(inspect.signature(fn).parameters.items())[4:]
              if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    allowed = ", ".join(f"{n} (default {p.default!r})" for n, p in params.items()) or "none"
    out: dict[str, object] = {}
    for item in items:
        key, eq, value = (t.strip() for t in item.partition("="))
        if not eq or key not in params:
            raise UsageError(f"bad --set {item!r}; write key=value with a key among: {allowed}")
        default = params[key].default
        try:
            if isinstance(default, bool):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(value)
                out[key] = value.lower() in ("true", "1")
            elif isinstance(default, (int, float)):
                out[key] = type(default)(value)
            elif value.lower() == "none":
                out[key] = None
            elif default is None or isinstance(default, tuple):   # e.g. layers=1+17+18
                out[key] = tuple(int(v) for v in value.split("+"))
            else:
                out[key] = value
        except ValueError:
            raise UsageError(f"bad --set {item!r}: {value!r} is not a {type(default).__name__} "
                             f"(default {default!r})") from None
    return out


def _benchmark(args: argparse.Namespace, data: Path, defaults: dict | None = None):
    from attnkit.eval.benchmarks import get_benchmark

    splits = [s.strip() for s in args.splits.split(",") if s.strip()] if args.splits else None
    options = {**(defaults or {}), **_bench_options(args.bench_option)}
    return get_benchmark(args.bench, data, splits=splits, limit=args.limit, **options)


def _run(args: argparse.Namespace, configs: list[str] | None) -> int:
    from attnkit.eval import report, runner

    if (args.model is None) != (args.data is None):
        raise UsageError("give both --model PATH and --data DIR, or neither for the embedded demo")
    if args.model is not None and getattr(args, "demo", None):
        raise UsageError(f"--demo {args.demo} selects the embedded demo's data; it cannot be combined with "
                         "--model/--data")
    started = time.perf_counter()
    if args.model is None:
        model, parts = _demo_parts(args, configs)
    else:
        model, data = Path(args.model), Path(args.data)
        if not data.is_dir():
            raise UsageError(f"--data {str(data)!r} is not a directory")
        bench = _benchmark(args, data)
        parts = [(None, bench, configs or ["baseline"], Path(args.out) if args.out else Path(DEFAULT_OUT) / bench.name)]
    settings = runner.RunSettings(str(model), max_new_tokens=args.max_new_tokens, seed=args.seed, dtype=args.dtype,
                                  quantization=args.quant)
    device_map = _device_map(args.device)
    loaded: dict = {}
    if len(parts) > 1:                    # one model load for every part of the default run
        from attnkit.eval.loading import load_model_and_processor

        loaded["model"], loaded["processor"] = load_model_and_processor(model, dtype=args.dtype, device_map=device_map,
                                                                        quantization=args.quant)
    done = []
    for title, bench, part_configs, out in parts:
        if "baseline" not in part_configs:
            part_configs = ["baseline", *part_configs]
        results = runner.evaluate(bench, part_configs, out, settings, device_map=device_map,
                                  retry_errors=args.retry_errors, progress=not args.no_progress,
                                  batch_size=args.batch_size, **loaded)
        if not results:                   # a non-zero rank of a data-parallel run
            return 0
        done.append((title, out, results))
    plots = not args.no_plots
    if plots and not report.plots_available():
        print(f"attnkit: {report.PLOTS_NOTE}", file=sys.stderr)
        plots = False
    texts = [(title, out, report.write_report(out, plots=plots)) for title, out, _ in done]
    if len(texts) == 1:
        print(texts[0][2].split("\n![", 1)[0].rstrip())
        print(f"\nrows, summary.json and report.md in {texts[0][1]}/")
    else:
        _print_demo(texts, plots, time.perf_counter() - started)
    all_results = [r for _, _, results in done for r in results]
    for r in all_results:
        if r.n_errors:
            print(f"attnkit: warning: {r.config}: {r.n_errors} of {r.n + r.n_errors} sample(s) failed (error rows in "
                  f"{Path(r.path).name}), e.g. {r.errors[0]['error']}; fix the cause and rerun with --retry-errors "
                  "to redo them", file=sys.stderr)
    dead = [r.config for r in all_results if r.n == 0]
    if dead:
        print(f"attnkit: error: every sample failed for {', '.join(dead)}; no metric for "
              f"{'it' if len(dead) == 1 else 'them'} (see the warnings above)", file=sys.stderr)
        return 1
    return 0


def _demo_parts(args: argparse.Namespace, configs: list[str] | None) -> tuple[Path, list[tuple]]:
    """The embedded demo's runs: ``(model path, [(title, bench, configs, out folder), ...])``. Without ``--demo``
    and ``--compare``/``--sweep``: the pruning trade-off on the clean split and the hallucination comparison on the
    prone one, in ``<out>/pope`` and ``<out>/pope_prone``; with ``--demo KIND`` (or configs) one data set."""
    kind = getattr(args, "demo", None)
    kinds = ["clean", "prone"] if kind is None and configs is None else [kind or "clean"]
    args.bench = DEMO_BENCH
    if args.limit is None:
        args.limit = DEMO_LIMIT
    if args.max_new_tokens is None:
        args.max_new_tokens = DEMO_MAX_NEW_TOKENS
    parts = []
    for k in kinds:
        model, data = _demo(k)
        bench = _benchmark(args, data, DEMO_BENCH_OPTIONS)
        folder = bench.name + ("_prone" if k == "prone" else "")
        if len(kinds) > 1:
            out = Path(args.out or DEFAULT_OUT) / folder
        else:
            out = Path(args.out) if args.out else Path(DEFAULT_OUT) / folder
        chosen = configs if configs is not None else demo_configs(DEMO_PRONE_COMPARE if k == "prone" else None)
        parts.append((DEMO_TITLES[k].format(method=DEMO_HALLUCINATION), bench, chosen, out))
    print(f"attnkit: no --model/--data: running the embedded demo ({model.name} on synthetic POPE: "
          f"{' and '.join(kinds)} split{'s' if len(kinds) > 1 else ''}, {args.limit} questions per POPE split)",
          file=sys.stderr)
    return model, parts


def _print_demo(texts: list[tuple[str, Path, str]], plots: bool, seconds: float) -> None:
    """The default run's output: one short table per part (the full reports are on disk), one legend, the files."""
    import json

    from attnkit.eval import report

    legend = ""
    for title, out, _ in texts:
        summary = json.loads((out / "summary.json").read_text())
        n = max((r["n"] + r["n_errors"] for r in summary["results"]), default=0)
        print(f"## {title}, {n} questions\n")
        print("\n".join(report.trade_off_table(summary)) + "\n")
        legend = report.legend(summary)
    print(legend + "\n")
    for _, out, _ in texts:
        pngs = sorted(p.name for p in out.glob("*.png")) if plots else []
        print(f"report: {out / 'report.md'}" + (f" (plots: {', '.join(pngs)})" if pngs else "")
              + "; rows and summary.json beside it")
    print(f"took {seconds:.0f} s; rerunning resumes (nothing to redo). Your own model: attnkit eval --model PATH "
          "--bench pope --data DIR --compare baseline \"cls-prune:keep=64\"")


# --- commands ------------------------------------------------------------------------------------
def _cmd_eval(args: argparse.Namespace) -> int:
    return _run(args, args.compare)


def _cmd_ablate(args: argparse.Namespace) -> int:
    grid = sweep_grid(args.sweep)
    print(f"attnkit: ablation grid ({len(grid)} configs): {', '.join(grid)}", file=sys.stderr)
    return _run(args, grid)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from attnkit.eval import report
    from attnkit.eval.loading import load_model_and_processor
    from attnkit.eval.runner import split_specs
    from attnkit.models.prompts import open_image

    if not report.plots_available():
        raise UsageError("attnkit inspect draws PNGs with matplotlib, which is not installed; "
                         "pip install 'attnkit[eval]' adds it")
    model_path = Path(args.model) if args.model else _demo()[0]
    image = open_image(args.image)
    layers = None
    if args.layers:
        try:
            layers = tuple(int(x) for x in args.layers.replace(",", "+").split("+"))
        except ValueError:
            raise UsageError(f"bad --layers {args.layers!r}; write e.g. 0+5+10") from None
    model, processor = load_model_and_processor(model_path, dtype=args.dtype, device_map=_device_map(args.device))
    paths = report.save_attention_maps(model, processor, image, args.prompt, args.out, layers=layers,
                                       extra=split_specs(args.with_ or ""))
    print(f"wrote {len(paths)} PNG(s) and attention.json to {args.out}/")
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from attnkit.eval.loading import load_model_and_processor
    from attnkit.eval.runner import load_samples
    from attnkit.interventions import REGISTRY

    if args.name not in REGISTRY:
        raise UsageError(f"unknown intervention {args.name!r}; available: {', '.join(sorted(REGISTRY))}")
    cls = REGISTRY[args.name]
    if not callable(getattr(cls, "calibrate", None)):
        can = sorted(n for n, c in REGISTRY.items() if callable(getattr(c, "calibrate", None)))
        raise UsageError(f"intervention {args.name!r} needs no calibration (it has no calibrate()); interventions "
                         f"that can be calibrated: {', '.join(can) or 'none registered yet'}")
    options = _calibrate_options(cls.calibrate, args.set)
    if args.data is None or not Path(args.data).is_dir():
        raise UsageError(f"--data {args.data!r} is not a directory")
    samples = load_samples(_benchmark(args, Path(args.data)))
    model, processor = load_model_and_processor(args.model, dtype=args.dtype, device_map=_device_map(args.device))
    result = cls.calibrate(model, processor, samples, Path(args.out), **options)
    print(f"calibrated {args.name} on {len(samples)} samples -> {args.out}")
    return 0 if result is None or result is not False else 1


def _cmd_lmms_task(args: argparse.Namespace) -> int:
    from attnkit.integrations.lmms_eval_tasks import write_pope_task

    data = Path(args.data) if args.data else _demo()[1]
    if not data.is_dir():
        raise UsageError(f"--data {str(data)!r} is not a directory")
    splits = [s.strip() for s in args.splits.split(",") if s.strip()] if args.splits else None
    post = None if args.post_prompt is None else args.post_prompt.replace("\\n", "\n")
    path = write_pope_task(data, args.out, task=args.task, limit=args.limit, splits=splits, post_prompt=post)
    print(f"wrote {path} and {path.with_suffix('.parquet').name}; run it with: lmms-eval --model attnkit "
          f"--include_path {Path(args.out)} --tasks {args.task} --model_args pretrained=MODEL")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from attnkit.interventions import available
    from attnkit.models import supported_classes

    print("interventions:")
    for name, info in available().items():
        print(f"  {name:<12} {info['doc']}")
        for p, meta in info["params"].items():
            print(f"      {p} = {meta['default']!r}  ({meta['type']}; {meta['allowed']}) {meta['doc']}")
    print("models:")
    for cls in supported_classes():
        print(f"  {cls}")
    print("benchmarks:")
    try:
        from attnkit.eval.benchmarks import BENCHMARKS
    except ImportError as e:
        print(f"  (unavailable: {e})")
        return 0
    for name, cls in sorted(BENCHMARKS.items()):
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        print(f"  {name:<12} primary metric {cls.primary_metric}; {doc}")
    return 0


# --- parser --------------------------------------------------------------------------------------
def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N, or map "
                                                    "(device_map='auto': one model over several GPUs)")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16 (default: auto)")


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="local model folder (default with --data unset: the embedded demo model)")
    p.add_argument("--bench", default="pope", help="benchmark name (see `attnkit list`; default pope)")
    p.add_argument("--data", help="benchmark data folder (published format)")
    p.add_argument("--demo", choices=["clean", "prone"], help="without --model/--data: only this data set of the "
                   "embedded demo (clean; prone: weak, ambiguous evidence where the model's co-occurrence prior "
                   "decides). Default: both, the pruning trade-off on clean and the hallucination comparison on prone")
    p.add_argument("--out", help=f"output folder (default {DEFAULT_OUT}/<bench>, <bench>_prone for --demo prone; the "
                   "default demo run writes <out>/pope and <out>/pope_prone, <out> defaulting to "
                   f"{DEFAULT_OUT}); rerunning resumes")
    p.add_argument("--limit", type=_positive_int, help="first N samples of each split")
    p.add_argument("--splits", help="comma-separated splits (default: all found)")
    p.add_argument("--bench-option", action="append", default=[], metavar="KEY=VALUE",
                   help="benchmark option, e.g. image_dir=/data/coco/val2014 (repeatable)")
    p.add_argument("--max-new-tokens", type=_positive_int, help="override the benchmark's generation budget")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=_positive_int, metavar="N",
                   help="samples per generate(), grouped by prompt length, left-padded (default: 1 on CPU, 8 on CUDA); "
                        "answers are those of batch 1, costs are per sample at this batch size")
    p.add_argument("--quant", choices=["4bit", "8bit"], help="bitsandbytes quantization")
    p.add_argument("--retry-errors", action="store_true", help="redo samples recorded as errors")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-plots", action="store_true", help="no PNG plots in the report")
    _add_model_args(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnkit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("eval", help="compare the baseline with interventions on a benchmark")
    _add_run_args(p)
    p.add_argument("--compare", nargs="+", metavar="CONFIG",
                   help='"baseline", specs like "cls-prune:keep=64", or several joined by ";" (baseline is '
                        "always included)")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("ablate", help="sweep intervention parameters (a grid, plus the baseline)")
    _add_run_args(p)
    p.add_argument("--sweep", action="append", required=True, metavar="SPEC",
                   help='"cls-prune:keep=32,64,128"; several keys or several --sweep: cartesian product')
    p.set_defaults(func=_cmd_ablate)

    p = sub.add_parser("inspect", help="attention heatmaps of a prompt over an image (PNG)")
    p.add_argument("--model", help="local model folder (default: the embedded demo model)")
    p.add_argument("--image", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--out", required=True, help="folder for the PNGs")
    p.add_argument("--layers", help="decoder layers, e.g. 0+5+10 (default: all)")
    p.add_argument("--with", dest="with_", metavar="CONFIG", help="interventions active while recording")
    _add_model_args(p)
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("calibrate", help="precompute what an intervention needs (e.g. head scores)")
    p.add_argument("name", help="intervention name")
    p.add_argument("--model", required=True)
    p.add_argument("--bench", default="pope")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True, help="output file")
    p.add_argument("--limit", type=int)
    p.add_argument("--splits")
    p.add_argument("--bench-option", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the method's calibrate(), e.g. max_kl=0.02 (vte) or alpha=1.5 (vhr)")
    _add_model_args(p)
    p.set_defaults(func=_cmd_calibrate)

    p = sub.add_parser("lmms-task", help="write a local lmms-eval POPE task (parquet + YAML) from POPE files")
    p.add_argument("--data", help="POPE folder in the published format (default: the embedded demo's)")
    p.add_argument("--out", required=True, help="folder for the task; pass it to lmms-eval as --include_path")
    p.add_argument("--task", default="attnkit_pope", help="task name (default attnkit_pope)")
    p.add_argument("--limit", type=_positive_int, help="first N questions of each split")
    p.add_argument("--splits", help="comma-separated splits (default: all found)")
    p.add_argument("--post-prompt", help="replaces lmms-eval's \"\\nAnswer the question using a single word or "
                                         "phrase.\" (\"\" for none)")
    p.set_defaults(func=_cmd_lmms_task)

    p = sub.add_parser("list", help="registered interventions, supported models, benchmarks")
    p.set_defaults(func=_cmd_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("\nattnkit: interrupted; finished samples are saved, rerun the same command to resume",
              file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, LookupError, ImportError) as e:
        if os.environ.get("ATTNKIT_DEBUG"):
            raise
        print(f"attnkit: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
