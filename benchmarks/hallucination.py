"""Hallucination methods on the demo's prone split: one markdown table with 95 % bootstrap intervals.

    python -m benchmarks.hallucination [--runs attnkit_runs/hallu] [--data attnkit/assets/demo/data_prone]
                                       [--resamples 1000] [--sinks 30] [--effect 60 [--effect-specs SPEC ...]]

Reads the row files that ``attnkit eval --out <runs>/pope`` and ``--out <runs>/chair`` wrote (one JSONL and
``.meta.json`` per config; only files whose data and benchmark-option fingerprints match ``--data``), scores them
with the benchmark's own ``score`` and prints, per config: POPE accuracy per split, F1 (all splits), the false
"yes" rate on absent objects (random / adversarial), CHAIR_i / CHAIR_s / recall, each with its percentile
bootstrap interval (:func:`attnkit.eval.bootstrap.bootstrap_ci`, stratified by split) and its difference from
the baseline, marked ▲ (better) / ▼ (worse) only where the paired interval
(:func:`attnkit.eval.bootstrap.paired_ci`) excludes 0. Then the ``attnkit eval`` commands that produce the rows.
``--sinks N`` also prints, per decoder layer of the demo model, the largest ``|x[d]| / RMS(x)`` over N prone
POPE prompts and how many tokens reach VAR's threshold (the paper's tau = 20, and tau = 3); ``--effect N`` how far
some methods move P(yes) at the first answer token (does the method act on this model at all?).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from attnkit.eval.benchmarks import get_benchmark
from attnkit.eval.bootstrap import significant
from attnkit.eval.fingerprint import HashCache, options_fingerprint, samples_fingerprint
from attnkit.eval.intervals import config_intervals
from attnkit.eval.metrics import parse_yes_no
from attnkit.eval.runner import BASELINE, read_rows, split_specs

DATA = "attnkit/assets/demo/data_prone"
# benchmark options of the measured runs (the demo model was trained on the bare POPE questions)
OPTIONS: dict[str, dict[str, str]] = {"pope": {"prompt_suffix": ""}, "chair": {}}
# --effect: PAI's attention step from its default layer (2 of the demo's 4) and earlier, VAR with the demo's dims
EFFECT_SPECS = ("pai:cfg=false", "pai:cfg=false,alpha=1.0", "pai:cfg=false,start_layer=1",
                "pai:cfg=false,start_layer=0", "var:sink_dims=81+250,tau=3",
                "var:sink_dims=81+250,tau=3,last_layer=true", "pai", "vhr", "mma")
# (header, benchmark, metric key, higher is better)
COLUMNS: list[tuple[str, str, str, bool]] = [
    ("POPE random acc", "pope", "random/accuracy", True),
    ("popular acc", "pope", "popular/accuracy", True),
    ("adversarial acc", "pope", "adversarial/accuracy", True),
    ("F1 (all)", "pope", "f1", True),
    ("yes on absent, random", "pope", "random/yes_absent", False),
    ("yes on absent, adversarial", "pope", "adversarial/yes_absent", False),
    ("CHAIR_i", "chair", "chair_i", False),
    ("CHAIR_s", "chair", "chair_s", False),
    ("CHAIR recall", "chair", "recall", True),
]


def pope_score(bench) -> Callable[[Sequence, Mapping[str, str]], dict[str, float]]:
    """``bench.score`` plus ``<split>/yes_absent``: the share of absent-object questions answered "yes" (an
    unparsed answer counts as the benchmark's ``unparsed_as``, as in its F1)."""
    unparsed = bench.options["unparsed_as"]

    def score(samples: Sequence, predictions: Mapping[str, str]) -> dict[str, float]:
        out = dict(bench.score(samples, predictions))
        absent: dict[str, list[bool]] = {}
        for s in samples:
            if s.answer == "no" and predictions.get(s.id) is not None:
                absent.setdefault(s.split, []).append((parse_yes_no(predictions[s.id]) or unparsed) == "yes")
        out.update({f"{split}/yes_absent": sum(v) / len(v) for split, v in absent.items()})
        return out

    return score


def load_runs(folder: Path, bench, samples: Sequence, log: Callable[[str], None] = print
              ) -> dict[str, tuple[dict, list[dict]]]:
    """``{config: (meta, rows)}`` of ``folder``'s row files for ``bench`` whose data and options fingerprints
    match ``samples`` and ``bench.options``, in :func:`_order`."""
    data = samples_fingerprint(samples, HashCache())
    options = options_fingerprint(bench.options)
    runs: dict[str, tuple[dict, list[dict]]] = {}
    for meta_path in sorted(folder.glob(f"{bench.name}__*.meta.json")):
        meta = json.loads(meta_path.read_text())
        key = meta.get("key", {})
        if key.get("data") != data or key.get("options") != options:
            log(f"skipping {meta_path.name}: rows of other data or benchmark options than {bench.data_dir}")
            continue
        if meta["config"] in runs:
            raise ValueError(f"{folder}: two row files for config {meta['config']!r} (other models or decoding); "
                             "keep one run per folder")
        rows = [r for r in read_rows(meta_path.with_name(meta_path.name[:-len(".meta.json")] + ".jsonl"))
                if "error" not in r]
        runs[meta["config"]] = (meta, rows)
    return dict(sorted(runs.items(), key=lambda kv: _order(kv[0])))


def _order(config: str) -> tuple:
    """Baseline, then single methods by name (a method's settings by spec), then combinations."""
    specs = split_specs(config)
    return (len(specs) > 1 if specs else -1, specs[0].split(":")[0] if specs else "", config)


def _interval(ci: tuple[float, float]) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def cell(value: float, ci: tuple[float, float], diff: float | None = None, diff_ci: tuple[float, float] | None = None,
         higher_better: bool = True) -> str:
    """``0.913 [0.880, 0.943] +0.007``; ▲/▼ (better/worse) only where the paired interval excludes 0."""
    text = f"{value:.3f} {_interval(ci)}"
    if diff is None:
        return text
    mark = ""
    if significant(diff_ci):
        mark = " ▲" if (diff > 0) == higher_better else " ▼"
    return f"{text} {diff:+.3f}{mark}"


def bench_stats(score, samples: Sequence, runs: Mapping[str, tuple[dict, list[dict]]], metrics: Sequence[str],
                resamples: int, seed: int) -> dict[str, dict[str, tuple]]:
    """Per config and metric: (value, interval, difference from the baseline, paired interval of it)."""
    if BASELINE not in runs:
        raise ValueError(f"no baseline rows among {sorted(runs)}; run `attnkit eval` with the baseline")
    preds = {c: {r["id"]: r["prediction"] for r in rows} for c, (_, rows) in runs.items()}
    for c, p in preds.items():
        missing = [s.id for s in samples if s.id not in p]
        if missing:
            raise ValueError(f"config {c!r} has no prediction for {len(missing)} sample(s) (e.g. {missing[0]}); "
                             "finish its run first (rerunning `attnkit eval` resumes)")
    configs = [BASELINE, *(c for c in preds if c != BASELINE)]
    found = config_intervals(None, samples, [preds[c] for c in configs], resamples=resamples, seed=seed, score=score)
    values = [score(samples, preds[c]) for c in configs]
    out: dict[str, dict[str, tuple]] = {}
    for c, value, got in zip(configs, values, found):
        paired = got.get("paired")
        out[c] = {m: (value[m], tuple(got["ci"][m]), None if paired is None else value[m] - values[0][m],
                      None if paired is None else tuple(paired[m])) for m in metrics if m in value}
    return {c: out[c] for c in preds}


def changed_answers(runs: Mapping[str, tuple[dict, list[dict]]]) -> dict[str, int]:
    """Per config: POPE answers (parsed) that differ from the baseline's."""
    base = {r["id"]: parse_yes_no(r["prediction"]) for r in runs[BASELINE][1]}
    return {c: sum(parse_yes_no(r["prediction"]) != base.get(r["id"]) for r in rows) for c, (_, rows) in runs.items()}


def table(stats: Mapping[str, Mapping[str, Mapping[str, tuple]]], extra: Mapping[str, Mapping[str, str]] | None = None
          ) -> str:
    """One markdown table: a row per config (every config of any benchmark), a column per :data:`COLUMNS` entry
    present in ``stats`` (``{bench: {config: {metric: (value, ci, diff, diff_ci)}}}``), plus ``extra`` columns
    (``{header: {config: text}}``)."""
    extra = extra or {}
    columns = [c for c in COLUMNS if c[1] in stats]
    configs = list(dict.fromkeys(c for bench in stats.values() for c in bench))
    header = ["config", *(c[0] for c in columns), *extra]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for config in configs:
        cells = [f"`{config}`"]
        for _, bench, metric, higher in columns:
            entry = stats[bench].get(config, {}).get(metric)
            cells.append("–" if entry is None else cell(*entry, higher_better=higher))
        cells += [extra[h].get(config, "–") for h in extra]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def command(folder: Path, bench, runs: Mapping[str, tuple[dict, list[dict]]]) -> str:
    """The ``attnkit eval`` line that writes ``runs`` (settings from the first meta file)."""
    settings = next(iter(runs.values()))[0]["settings"]
    args = ["attnkit", "eval", "--model", settings["model_path"], "--bench", bench.name, "--data", str(bench.data_dir)]
    for k, v in bench.options.items():
        if v != bench.default_options[k]:
            args += ["--bench-option", f"{k}={v}"]
    if settings.get("max_new_tokens") is not None:
        args += ["--max-new-tokens", str(settings["max_new_tokens"])]
    for flag in ("seed", "dtype", "quantization"):
        if settings.get(flag) not in (None, 0, "auto"):
            args += [f"--{'quant' if flag == 'quantization' else flag}", str(settings[flag])]
    args += ["--out", str(folder), "--compare", *[c for c in runs if c != BASELINE]]
    return shlex.join(args)


def sink_report(model_path: str, data: str, n: int, tau: float = 3.0) -> str:
    """VAR's sink criterion on the model: per decoder layer, over ``n`` prone POPE prompts, the largest
    ``|x[d]|/RMS(x)`` entering it (visual / text tokens), the visual tokens reaching the paper's tau = 20 on any
    dimension, and the tokens that ``var:sink_dims=auto,tau=<tau>`` counts as sinks (the two dimensions found by
    :func:`attnkit.interventions.sinks.rank_sink_dims` at VAR's first edited layer, 2)."""
    import torch

    from attnkit.eval.loading import load_model_and_processor
    from attnkit.interventions.sinks import rank_sink_dims, sink_ratio
    from attnkit.models.base import get_adapter
    from attnkit.models.prompts import build_inputs

    model, processor = load_model_and_processor(model_path)
    adapter = get_adapter(model)
    layers = range(adapter.num_layers)
    samples = get_benchmark("pope", data, limit=n, splits=["random"], **OPTIONS["pope"]).samples()
    ratios: dict[int, list[torch.Tensor]] = {i: [] for i in layers}   # [tokens, hidden] per prompt
    visual: list[torch.Tensor] = []

    def hook(i):
        def capture(module, args, kwargs):
            ratios[i].append(sink_ratio(args[0] if args else kwargs["hidden_states"])[0])
        return capture

    handles = [adapter.decoder_layers[i].register_forward_pre_hook(hook(i), with_kwargs=True) for i in layers]
    try:
        with torch.no_grad():
            for s in samples:
                inputs = build_inputs(processor, s.question, s.image)
                visual.append(inputs["input_ids"][0] == model.config.image_token_index)
                model(**inputs)
    finally:
        for h in handles:
            h.remove()
    r = {i: torch.cat(v) for i, v in ratios.items()}
    vis = torch.cat(visual)
    first = min(2, adapter.num_layers - 1)
    dims = rank_sink_dims((r[first] >= tau).sum(0), r[first].amax(0))
    hidden = adapter.text_config.hidden_size
    lines = [f"sinks: {len(samples)} prompts ({int(vis.sum())} visual tokens, {int((~vis).sum())} text); "
             f"|x[d]|/RMS(x) <= sqrt({hidden}) = {hidden ** 0.5:.1f}; sink_dims=auto,tau={tau:g} finds {dims} at "
             f"layer {first}",
             f"| layer | max ratio, visual | max ratio, text | visual >= 20 (any dim) | visual sinks at tau {tau:g} "
             f"| text sinks at tau {tau:g} |", "|---|---|---|---|---|---|"]
    for i in layers:
        phi = r[i][:, list(dims)].amax(-1) if dims else torch.zeros(len(vis))
        lines.append(f"| {i} | {float(r[i][vis].max()):.2f} | {float(r[i][~vis].max()):.2f} | "
                     f"{int((r[i][vis] >= 20).any(-1).sum())} | {int((phi[vis] >= tau).sum())} | "
                     f"{int((phi[~vis] >= tau).sum())} |")
    return "\n".join(lines)


def effect_report(model_path: str, data: str, n: int, specs: Sequence[str]) -> str:
    """Does a method move the answer at all? Per spec, over ``n`` prone POPE questions (a third from each split):
    the change of the yes-minus-no logit margin at the first answer token vs the unwrapped model (mean and
    largest absolute change, next to the baseline's mean absolute margin for scale) and the answers it flips."""
    import torch

    import attnkit
    from attnkit.eval.loading import load_model_and_processor
    from attnkit.models.prompts import build_inputs

    model, processor = load_model_and_processor(model_path)
    yes, no = (processor.tokenizer.encode(w, add_special_tokens=False)[0] for w in ("yes", "no"))
    samples = get_benchmark("pope", data, limit=max(1, n // 3), **OPTIONS["pope"]).samples()
    inputs = [build_inputs(processor, s.question, s.image) for s in samples]

    def margins() -> torch.Tensor:
        out = []
        with torch.no_grad():
            for x in inputs:
                logits = model.generate(**x, max_new_tokens=1, do_sample=False, output_logits=True,
                                        return_dict_in_generate=True).logits[0][0].float()
                out.append(logits[yes] - logits[no])
        return torch.stack(out)

    base = margins()
    lines = [f"effect: {len(samples)} POPE questions; yes-minus-no logit margin at the first answer token (baseline: "
             f"mean abs margin {float(base.abs().mean()):.2f})",
             "| config | mean abs change | max abs change | answers flipped |", "|---|---|---|---|"]
    for spec in specs:
        handle = attnkit.wrap(model, *spec.split(";"))
        try:
            other = margins()
        finally:
            handle.remove()
        d, flips = (other - base).abs(), int(((other > 0) != (base > 0)).sum())
        lines.append(f"| `{spec}` | {float(d.mean()):.2e} | {float(d.max()):.2e} | {flips} |")
    return "\n".join(lines)


def complete(runs: Mapping[str, tuple[dict, list[dict]]], samples: Sequence, log: Callable[[str], None] = print
             ) -> dict[str, tuple[dict, list[dict]]]:
    """The configs with a prediction for every sample; the others are left out, and said so."""
    ids = {s.id for s in samples}
    out = {}
    for config, (meta, rows) in runs.items():
        done = ids & {r["id"] for r in rows}
        if len(done) < len(ids):
            log(f"left out {config!r}: {len(done)} of {len(ids)} samples run (rerun its `attnkit eval` to finish it)")
        else:
            out[config] = (meta, rows)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default="attnkit_runs/hallu", help="folder holding pope/ and chair/ run folders")
    p.add_argument("--data", default=DATA, help="the data folder the rows were run on")
    p.add_argument("--resamples", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sinks", type=int, default=0, metavar="N", help="also count sinks over N prompts of --model")
    p.add_argument("--effect", type=int, default=0, metavar="N", help="also measure how far --effect-specs move "
                   "P(yes) on N questions of --model")
    p.add_argument("--effect-specs", nargs="+", default=list(EFFECT_SPECS))
    p.add_argument("--model", default="attnkit/assets/demo/model", help="model of --sinks / --effect")
    args = p.parse_args(argv)
    stats, commands, extra = {}, [], {}
    for name in ("pope", "chair"):
        folder = Path(args.runs) / name
        if not folder.is_dir():
            print(f"no {folder}: {name} left out", file=sys.stderr)
            continue
        bench = get_benchmark(name, args.data, **OPTIONS[name])
        samples = bench.samples()
        log = lambda m: print(m, file=sys.stderr)  # noqa: E731
        runs = complete(load_runs(folder, bench, samples, log=log), samples, log=log)
        if BASELINE not in runs:
            log(f"{folder}: no finished baseline rows: {name} left out")
            continue
        score = pope_score(bench) if name == "pope" else bench.score
        metrics = [c[2] for c in COLUMNS if c[1] == name]
        stats[name] = bench_stats(score, samples, runs, metrics, args.resamples, args.seed)
        commands.append(command(folder, bench, runs))
        if name == "pope":
            extra["POPE answers changed"] = {c: str(n) for c, n in changed_answers(runs).items()}
    if not stats:
        print(f"attnkit: error: no row files under {args.runs}/pope or {args.runs}/chair for {args.data}",
              file=sys.stderr)
        return 1
    print(table(stats, extra))
    print(f"\n95 % percentile bootstrap intervals ({args.resamples} resamples, stratified by split, seed {args.seed}); "
          "the signed number is the difference from the baseline, ▲ better / ▼ worse only where its paired "
          "interval excludes 0.\n")
    print("\n".join(commands))
    if args.sinks:
        print("\n" + sink_report(args.model, args.data, args.sinks))
    if args.effect:
        print("\n" + effect_report(args.model, args.data, args.effect, args.effect_specs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
