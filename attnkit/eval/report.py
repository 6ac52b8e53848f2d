"""The comparison report: metric and cost deltas vs the baseline as markdown, plus PNG plots.

Reads the ``summary.json`` the runner writes (``{"bench", "primary_metric", "higher_is_better",
"memory", "results": [ConfigResult...]}``), so a report can be rebuilt from a finished output folder.
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

BETTER, WORSE = "▲", "▼"
SIGNIFICANT = "*"
COSTS = (("visual_tokens", "visual tokens"), ("prefill_ms", "prefill ms"), ("decode_ms_per_token", "decode ms/tok"),
         ("prefill_tflops", "prefill FLOPs"), ("kv_cache_mb", "KV cache MB"), ("peak_mem_mb", "peak mem MB"))
SPREAD = ("prefill_ms", "decode_ms_per_token")       # shown as median [p10–p90]
RELATIVE = ("visual_tokens", "prefill_tflops", "kv_cache_mb")   # shown with the % change vs the baseline


def direction(metric: str, higher_is_better: Mapping[str, bool]) -> bool | None:
    """True if higher is better for ``metric`` (patterns match its last ``/`` part), False if lower, else None."""
    leaf = metric.rsplit("/", 1)[-1]
    for pattern, better in higher_is_better.items():
        if fnmatch.fnmatchcase(leaf, pattern) or fnmatch.fnmatchcase(metric, pattern):
            return better
    return None


def _num(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, int) or float(v).is_integer() and abs(v) >= 10:
        return f"{v:.0f}"
    return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"


def delta(value: float | None, base: float | None, higher_better: bool | None) -> str:
    """``"+0.012 ▲"``: the signed change, with ▲ / ▼ when it is better / worse (nothing when neither applies)."""
    if value is None or base is None or any(isinstance(x, float) and math.isnan(x) for x in (value, base)):
        return ""
    d = value - base
    if d == 0:
        return "±0"
    arrow = "" if higher_better is None else (BETTER if (d > 0) == higher_better else WORSE)
    return f"{_signed(d)} {arrow}".rstrip()


def _signed(d: float) -> str:
    return "±0" if d == 0 else f"{'+' if d > 0 else '−'}{_num(abs(d))}"


def _cell(value, base, higher_better, is_base: bool) -> str:
    if is_base:
        return _num(value)
    d = delta(value, base, higher_better)
    return f"{_num(value)} ({d})" if d else _num(value)


def _interval(ci: Sequence[float] | None) -> str:
    return "" if not ci else f" [{_minus(ci[0])}, {_minus(ci[1])}]"


def _minus(v: float) -> str:
    """A number with a typographic minus, as the changes are written."""
    return ("−" + _num(-v)) if v < 0 else _num(v)


def metric_cell(result: Mapping[str, Any], metric: str) -> str:
    """``"0.950 [0.921, 0.975]"``: the metric and its bootstrap interval (when the summary has one)."""
    return _num(result["metrics"].get(metric)) + _interval(result.get("ci", {}).get(metric))


def paired_cell(result: Mapping[str, Any], base: Mapping[str, Any], metric: str,
                higher_better: bool | None) -> str:
    """``"−0.033 [−0.061, −0.008] ▼*"``: the change vs the baseline, its paired interval, ▲/▼ and ``*`` when the
    interval excludes 0; without intervals, the plain change."""
    value, ref = result["metrics"].get(metric), base["metrics"].get(metric)
    if result is base or value is None or ref is None:
        return "–"
    d = value - ref
    arrow = "" if higher_better is None or d == 0 else (BETTER if (d > 0) == higher_better else WORSE)
    ci = result.get("paired", {}).get(metric)
    mark = SIGNIFICANT if ci is not None and metric in result.get("significant", ()) else ""
    return f"{_signed(d)}{_interval(ci)} {arrow}{mark}".rstrip()


def flops_unit(results: Sequence[Mapping[str, Any]]) -> tuple[str, float]:
    """The FLOPs unit (and the factor from TFLOPs) at which the largest prefill reads at least 0.1."""
    top = max((r["costs"].get("prefill_tflops") or 0 for r in results), default=0)
    for unit, scale in (("TFLOPs", 1.0), ("GFLOPs", 1e3), ("MFLOPs", 1e6), ("kFLOPs", 1e9)):
        if top * scale >= 0.1:
            return unit, scale
    return ("TFLOPs", 1.0) if not top else ("FLOPs", 1e12)


def cost_cell(result: Mapping[str, Any], base: Mapping[str, Any], key: str, scale: float = 1.0) -> str:
    """A cost: ``median [p10–p90]`` for timings, the value with its % change vs the baseline for token counts,
    FLOPs and KV bytes, ``n/a`` for a peak memory nobody measured (CPU)."""
    costs = result["costs"]
    value = costs.get(key)
    if value is None:
        return "n/a" if key == "peak_mem_mb" else "–"
    text = _num(value * scale)
    if key in SPREAD and costs.get(f"{key}_p10") is not None:
        text += f" [{_num(costs[f'{key}_p10'])}–{_num(costs[f'{key}_p90'])}]"
    ref = base["costs"].get(key)
    if key in RELATIVE and result is not base and ref:
        change = 100 * (value - ref) / ref
        text += f" ({'+' if change > 0 else '−' if change < 0 else '±'}{abs(change):.0f} %)"
    return text


def baseline_of(results: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    return next((r for r in results if r["config"] == "baseline"), results[0])


def _primary(summary: Mapping[str, Any]) -> str | None:
    metrics = list(dict.fromkeys(k for r in summary["results"] for k in r["metrics"]))
    primary = summary.get("primary_metric")
    return primary if primary in metrics else (metrics[0] if metrics else None)


def trade_off_table(summary: Mapping[str, Any]) -> list[str]:
    """Per config: n, errors, the primary metric with its interval, its paired change vs the baseline, the costs."""
    results = summary["results"]
    hib = summary.get("higher_is_better", {})
    base, primary = baseline_of(results), _primary(summary)
    unit, scale = flops_unit(results)
    head = ["config", "n", "errors"]
    if primary:
        hint = _hint(direction(primary, hib))
        head += [f"{primary} {hint}".rstrip(), f"Δ {primary} vs {base['config']}"]
    head += [(f"prefill {unit}" if k == "prefill_tflops" else label) + " ↓" for k, label in COSTS]
    lines = [_row(head), _row(["---"] * len(head))]
    for r in results:
        cells = [f"**{r['config']}**" if r is base else r["config"], str(r["n"]), str(r["n_errors"])]
        if primary:
            cells += [metric_cell(r, primary), paired_cell(r, base, primary, direction(primary, hib))]
        cells += [cost_cell(r, base, k, scale if k == "prefill_tflops" else 1.0) for k, _ in COSTS]
        lines.append(_row(cells))
    return lines


def legend(summary: Mapping[str, Any]) -> str:
    """What the trade-off table's brackets, marks and cost columns mean."""
    base = baseline_of(summary["results"])["config"] if summary["results"] else "baseline"
    iv = summary.get("intervals")
    text = ""
    if iv:
        text += (f"[a, b] after a metric: {100 * iv['level']:.0f} % percentile bootstrap interval over samples "
                 f"({iv['resamples']} resamples, stratified by split). Δ: the paired difference vs {base} on the "
                 f"same draws; {SIGNIFICANT} marks a difference whose interval excludes 0 (significant); without "
                 f"{SIGNIFICANT} it is within sampling noise. ")
    text += (f"{BETTER} better / {WORSE} worse than {base}; ↑/↓ in a header: higher/lower is better. "
             "prefill ms and decode ms/tok: median over samples [p10–p90]; prefill FLOPs (LLM, 2 per multiply-add, "
             "full-square attention, gated MLP; attnkit/eval/costs.py) and KV cache after generation: means per "
             "sample from the tokens each decoder layer processed, with the change vs the baseline; peak memory: "
             f"{summary.get('memory') or 'not measured'}.")
    return text


def markdown(summary: Mapping[str, Any]) -> str:
    """Two tables: per config the primary metric (interval, paired change) and the costs; per metric every
    config, with deltas."""
    results = summary["results"]
    if not results:
        return f"# {summary['bench']}: no results\n"
    hib = summary.get("higher_is_better", {})
    base = baseline_of(results)
    primary = _primary(summary)
    metrics = list(dict.fromkeys(k for r in results for k in r["metrics"]))
    lines = [f"# {summary['bench']}: interventions vs {base['config']}", "", *trade_off_table(summary)]
    shown = detail_metrics(metrics, primary)
    if len(shown) > 1:
        lines += ["", "| metric | " + " | ".join(r["config"] for r in results) + " |",
                  _row(["---"] * (len(results) + 1))]
        for m in shown:
            hb = direction(m, hib)
            cells = [f"{m} {_hint(hb)}".rstrip()]
            cells += [_cell(r["metrics"].get(m), base["metrics"].get(m), hb, r is base) for r in results]
            lines.append(_row(cells))
    lines += ["", legend(summary) + " All metrics per split are in summary.json."]
    return "\n".join(lines) + "\n"


def detail_metrics(metrics: Sequence[str], primary: str | None) -> list[str]:
    """The overall metrics (no ``/``) and the primary metric per split; all of them if none is overall.
    Every metric is in ``summary.json``."""
    overall = [m for m in metrics if "/" not in m]
    if not overall:
        return list(metrics)
    leaf = (primary or "").rsplit("/", 1)[-1]
    return overall + [m for m in metrics if "/" in m and m.rsplit("/", 1)[-1] == leaf]


def _hint(higher_better: bool | None) -> str:
    return "" if higher_better is None else ("↑" if higher_better else "↓")


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


# --- plots ---------------------------------------------------------------------------------------
_KEEP = re.compile(r"(?:^|[:,;])keep=([0-9.]+)")


def keep_of(config: str) -> float | None:
    """The ``keep=`` value of a config (count or ratio), None if it has none."""
    m = _KEEP.search(config)
    return float(m.group(1)) if m else None


def plot(summary: Mapping[str, Any], out_dir: str | Path) -> list[Path]:
    """``{bench}_metric_vs_tokens.png`` and, for sweeps over ``keep``, ``{bench}_latency_vs_keep.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir, results, bench = Path(out_dir), summary["results"], summary["bench"]
    primary = summary.get("primary_metric")
    paths = []
    pts = [(r["costs"].get("visual_tokens"), r["metrics"].get(primary), r["config"]) for r in results]
    pts = [p for p in pts if p[0] is not None and p[1] is not None]
    if pts:
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        ax.scatter([p[0] for p in pts], [p[1] for p in pts])
        ax.set(xlabel="visual tokens (mean per sample)", ylabel=primary, title=f"{bench}: {primary} vs visual tokens")
        ax.grid(alpha=0.3)
        place_labels(ax, [(x, y) for x, y, _ in pts], [label for _, _, label in pts])
        paths.append(_save(fig, out_dir / f"{bench}_metric_vs_tokens.png"))
    sweeps: dict[str, list[tuple]] = {}
    for r in results:
        keep, ms = keep_of(r["config"]), r["costs"].get("prefill_ms")
        if keep is not None and ms is not None:
            name = re.sub(r"keep=[0-9.]+", "keep=*", r["config"])
            sweeps.setdefault(name, []).append((keep, ms, r["costs"].get("decode_ms_per_token")))
    sweeps = {k: sorted(v) for k, v in sweeps.items() if len({x[0] for x in v}) >= 2}
    if sweeps:
        base = baseline_of(results)
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, pts in sweeps.items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"{name} prefill ms")
            if all(p[2] is not None for p in pts):
                ax.plot([p[0] for p in pts], [p[2] for p in pts], "s--", label=f"{name} decode ms/token")
        if base["config"] == "baseline" and base["costs"].get("prefill_ms") is not None:
            ax.axhline(base["costs"]["prefill_ms"], color="gray", ls=":", label="baseline prefill ms")
        ax.set(xlabel="keep", ylabel="ms", title=f"{bench}: latency vs keep")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        paths.append(_save(fig, out_dir / f"{bench}_latency_vs_keep.png"))
    return paths


def place_labels(ax, points: Sequence[tuple[float, float]], labels: Sequence[str], fontsize: float = 7) -> list:
    """Annotate each point with its label so that no two labels' boxes overlap: a label that would overlap one
    already placed moves down (then up) by its own height until it is free. Returns the annotations."""
    fig = ax.figure
    fig.canvas.draw()                      # a renderer (and the final axis limits) for the text extents
    renderer = fig.canvas.get_renderer()
    placed, boxes = [], []
    for (x, y), label in sorted(zip(points, labels, strict=True), key=lambda p: (-p[0][1], p[0][0])):
        ann = ax.annotate(label, (x, y), fontsize=fontsize, xytext=(4, 2), textcoords="offset points",
                          arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "0.5"})
        box = text_box(ann, renderer)
        step = box.height * 72 / fig.dpi + 1          # one line, in points
        for k in range(1, 4 * len(points) + 2):
            if not any(box.overlaps(b) for b in boxes):
                break
            shift = step * ((k + 1) // 2) * (-1 if k % 2 else 1)     # down 1, up 1, down 2, up 2, ...
            ann.set_position((4, 2 + shift))
            box = text_box(ann, renderer)
        boxes.append(box)
        placed.append(ann)
    return placed


def text_box(annotation, renderer):
    """The display-space box of an annotation's text alone (``get_window_extent`` adds its arrow)."""
    from matplotlib.text import Text

    annotation.update_positions(renderer)           # its text's place after a set_position()
    return Text.get_window_extent(annotation, renderer)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


PLOTS_NOTE = "plots skipped: matplotlib is not installed (pip install 'attnkit[eval]' adds it)"


def plots_available() -> bool:
    """Whether matplotlib can be imported (it is the ``eval`` extra, not a core dependency)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def write_report(out_dir: str | Path, summary: Mapping[str, Any] | None = None, plots: bool = True) -> str:
    """Write ``report.md`` (and the plots, if matplotlib is installed) in ``out_dir`` from ``summary`` or its
    ``summary.json``; returns the text."""
    out_dir = Path(out_dir)
    if summary is None:
        summary = json.loads((out_dir / "summary.json").read_text())
    text = markdown(summary)
    pngs = plot(summary, out_dir) if plots and plots_available() else []
    if pngs:
        text += "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in pngs) + "\n"
    (out_dir / "report.md").write_text(text)
    return text


# --- attention maps (``attnkit inspect``) --------------------------------------------------------
def visual_grid(family: str, config, inputs: Mapping[str, Any], n_visual: int) -> tuple[int, int] | None:
    """(rows, cols) of the first ``rows * cols`` visual tokens on the image, or None if unknown.

    LLaVA-1.5: a square grid of patches; LLaVA-NeXT: the base-crop block of (image/patch)² tokens, which
    comes first; Qwen-VL: (h/m, w/m) from ``image_grid_thw`` and the merge size m.
    """
    if family in ("qwen2_vl", "qwen2_5_vl") and inputs.get("image_grid_thw") is not None:
        _, h, w = (int(x) for x in inputs["image_grid_thw"][0])
        m = config.vision_config.spatial_merge_size
        return (h // m, w // m) if (h // m) * (w // m) <= n_visual else None
    if family == "llava_next":
        side = config.vision_config.image_size // config.vision_config.patch_size
        return (side, side) if side * side <= n_visual else None
    side = math.isqrt(n_visual)
    return (side, side) if side * side == n_visual and side > 0 else None


def attention_maps(model, processor, image, prompt: str, layers: Sequence[int] | None = None,
                   extra: Sequence[str] = ()) -> tuple[dict[int, Any], str]:
    """Per decoder layer, the last prompt token's attention over the visual tokens, mean over heads, as a
    [rows, cols] numpy grid (1 × V when the layout is unknown); and the model family. With a token dropper
    the kept tokens are drawn where they sit in the image; dropped ones are blank (NaN).

    From the ``record`` intervention's ``last_query`` maps ([H, V] per layer), recorded in one forward pass.
    """
    import torch

    from attnkit.api import intervene
    from attnkit.interventions import Record
    from attnkit.models.prompts import build_inputs

    inputs = build_inputs(processor, prompt, image).to(model.device)
    rec = Record(layers=tuple(layers) if layers is not None else None)
    with intervene(model, rec, *extra) as handle, torch.inference_mode():
        model(**inputs)
        family = handle.adapter.family
    grids = {}
    visual = (inputs["input_ids"][0] == handle.adapter.image_token_id).nonzero().squeeze(1).cpu()
    for layer, per_sample in sorted(rec.last_query.items()):
        weights = per_sample[0].float().mean(0)                      # [V kept]
        if weights.numel() != len(visual):                           # pruned: back to the image's token order
            full = torch.full((len(visual),), float("nan"))
            full[torch.searchsorted(visual, rec.last_query_positions[layer][0])] = weights
            weights = full
        shape = visual_grid(family, model.config, inputs, weights.numel())
        if shape is None:
            grids[layer] = weights[None].numpy()
        else:
            grids[layer] = weights[: shape[0] * shape[1]].reshape(shape).numpy()
    return grids, family


def save_attention_maps(model, processor, image, prompt: str, out_dir: str | Path,
                        layers: Sequence[int] | None = None, extra: Sequence[str] = ()) -> list[Path]:
    """``layerNN.png`` (heatmap over the image, with a colour bar on one scale shared by all layers) per layer,
    ``mean.png`` over layers, ``attention.json`` (raw)."""
    grids, family = attention_maps(model, processor, image, prompt, layers, extra)
    if not grids:
        raise ValueError("nothing recorded: the prompt has no visual tokens (is the image token in the template?)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shown = _center_square(image) if family == "llava" else image
    paths = [_save(fig, out_dir / name) for name, fig in attention_figures(grids, shown)]

    def plain(values):   # valid JSON: dropped tokens (NaN) as null
        return [plain(v) if isinstance(v, list) else (None if v != v else v) for v in values]

    raw = {"family": family, "prompt": prompt, "layers": {str(k): plain(v.tolist()) for k, v in grids.items()}}
    (out_dir / "attention.json").write_text(json.dumps(raw))
    return paths


def shared_scale(grids: Mapping[Any, Any]) -> tuple[float, float]:
    """(vmin, vmax) over every layer's grid, ignoring dropped tokens (NaN): one colour scale for all maps."""
    import numpy as np

    values = np.concatenate([np.asarray(g, dtype=float).ravel() for g in grids.values()])
    values = values[~np.isnan(values)]
    if not values.size:
        return 0.0, 1.0
    low, high = float(values.min()), float(values.max())
    return (low, high) if high > low else (low, low + 1e-12)


def attention_figures(grids: Mapping[int, Any], image) -> list[tuple[str, Any]]:
    """``(file name, figure)`` per layer and for the mean over layers (when every grid has one shape): the map over
    ``image`` (a 1 × V strip when the layout is unknown) on one colour scale shared by all of them
    (:func:`shared_scale`), with a colour bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    items: list[tuple[Any, Any]] = list(grids.items())
    if len({np.shape(g) for g in grids.values()}) == 1:
        items.append(("mean", np.mean(np.stack(list(grids.values())), axis=0)))
    vmin, vmax = shared_scale(grids)
    out = []
    for layer, grid in items:
        fig, ax = plt.subplots(figsize=(5.2, 4.5))
        if grid.shape[0] > 1:
            ax.imshow(image)
            heat = ax.imshow(grid, cmap="jet", alpha=0.5, extent=(0, image.width, image.height, 0),
                             interpolation="bilinear", vmin=vmin, vmax=vmax)
        else:
            heat = ax.imshow(grid, cmap="jet", aspect="auto", vmin=vmin, vmax=vmax)
        ax.set_axis_off()
        bar = fig.colorbar(heat, ax=ax, fraction=0.046, pad=0.04)
        bar.set_label("attention weight (scale shared by all layers)", fontsize=7)
        bar.ax.tick_params(labelsize=7)
        where = "mean over layers" if layer == "mean" else f"layer {layer}"
        ax.set_title(f"{where}: last prompt token → image (head mean)", fontsize=8)
        out.append(("mean.png" if layer == "mean" else f"layer{layer:02d}.png", fig))
    return out


def _center_square(image):
    """The center crop LLaVA-1.5's CLIP processor shows the vision tower."""
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side))
