"""Costs with spread, FLOPs and KV bytes in the summary; intervals and significance marks in the report; plot
labels that do not overlap; heatmaps on one colour scale with a colour bar."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from attnkit.eval import costs, report, runner
from attnkit.eval.benchmarks import get_benchmark

DIMS = {"hidden_size": 8, "intermediate_size": 16, "num_attention_heads": 2, "num_key_value_heads": 1,
        "head_dim": 4, "num_hidden_layers": 2, "dtype_bytes": 2, "mlp_matrices": 3}


def _row(i: int, prefill: float, layers=(5, 3)) -> dict:
    return {"id": f"s{i}", "prediction": "yes", "new_tokens": 4, "visual_tokens": 2, "prompt_tokens": layers[0],
            "layer_tokens": list(layers), "prefill_ms": prefill, "decode_ms_per_token": 2 * prefill,
            "peak_mem_mb": None, "batch_size": 1}


def test_summarize_costs_medians_spreads_flops_and_kv():
    rows = [_row(i, float(i)) for i in range(11)]                       # prefill 0..10 ms
    rows[0]["layer_tokens"] = [7, 7]
    out = runner.summarize_costs(rows, DIMS)
    assert (out["prefill_ms"], out["prefill_ms_p10"], out["prefill_ms_p90"]) == (5.0, 1.0, 9.0)
    assert (out["decode_ms_per_token"], out["decode_ms_per_token_p90"]) == (10.0, 18.0)
    flops = (costs.prefill_flops([7, 7], DIMS) + 10 * costs.prefill_flops([5, 3], DIMS)) / 11
    assert out["prefill_tflops"] == pytest.approx(flops / 1e12)
    kv = (costs.kv_cache_bytes([7, 7], 4, DIMS) + 10 * costs.kv_cache_bytes([5, 3], 4, DIMS)) / 11
    assert out["kv_cache_mb"] == pytest.approx(kv / 2 ** 20)
    assert out["peak_mem_mb"] is None and out["prompt_tokens"] == 5
    assert runner.summarize_costs(rows)["prefill_tflops"] is None               # no dims: no FLOPs
    old = [{"prefill_ms": 1.0, "decode_ms_per_token": 1.0, "visual_tokens": 3, "peak_mem_mb": 4.0}]
    assert runner.summarize_costs(old, DIMS)["kv_cache_mb"] is None             # rows without layer_tokens


def _summary(tmp_path: Path):
    from attnkit.synth.demo import demo_data_path

    bench = get_benchmark("pope", demo_data_path(), limit=30, prompt_suffix="")
    samples = bench.samples()
    answers = {"baseline": {s.id: s.answer for s in samples},
               "same:x=1": {s.id: s.answer for s in samples},
               "half-wrong:x=1": {s.id: (s.answer if i % 2 else ("no" if s.answer == "yes" else "yes"))
                                  for i, s in enumerate(samples)}}
    results = []
    for config, preds in answers.items():
        path = tmp_path / f"pope__{config}.jsonl"
        rows = [{**_row(i, 10.0 + i % 3), "id": s.id, "prediction": preds[s.id]} for i, s in enumerate(samples)]
        runner.write_rows(path, rows)
        results.append(runner.score(bench, samples, rows, config, path, DIMS))
    runner.write_summary(tmp_path, bench, results, "CPU: n/a", samples=samples, dims=DIMS, resamples=300)
    return json.loads((tmp_path / "summary.json").read_text())


def test_summary_has_intervals_and_the_report_marks_only_significant_differences(tmp_path):
    summary = _summary(tmp_path)
    base, same, wrong = summary["results"]
    assert base["ci"]["f1"] == [1.0, 1.0] and "paired" not in base
    assert same["paired"]["f1"] == [0.0, 0.0] and same["significant"] == []
    assert wrong["paired"]["f1"][1] < 0 and "f1" in wrong["significant"]
    assert summary["intervals"]["resamples"] == 300 and summary["llm_dims"] == DIMS
    text = report.markdown(summary)
    rows = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| ")}
    assert "| Δ f1 vs baseline |" in rows["| config"]
    assert "| –" in rows["| **baseline**"]
    assert "±0 [0.000, 0.000] |" in rows["| same:x=1"] and "*" not in rows["| same:x=1"]
    low, high = wrong["paired"]["f1"]
    assert high < 0 and f"[−{report._num(-low)}, −{report._num(-high)}] ▼*" in rows["| half-wrong:x=1"]
    assert "| 11 [10–12] | 22 [20–24] |" in rows["| same:x=1"]                 # median [p10–p90]
    assert "| prefill kFLOPs ↓ | KV cache MB ↓ | peak mem MB ↓ |" in rows["| config"]
    kflops = report._num(costs.prefill_flops([5, 3], DIMS) / 1e3)
    assert f"| {kflops} (±0 %) |" in rows["| same:x=1"] and rows["| same:x=1"].endswith("| n/a |")
    assert "* marks a difference whose interval excludes 0" in text and "300 resamples" in text


def _captured(monkeypatch) -> list:
    figures = []

    def keep(fig, path):
        fig.canvas.draw()
        figures.append(fig)
        return path

    monkeypatch.setattr(report, "_save", keep)
    return figures


def test_plot_labels_do_not_overlap(tmp_path, monkeypatch):
    from matplotlib.text import Text

    figures = _captured(monkeypatch)
    results = [{"config": name, "n": 9, "n_errors": 0, "metrics": {"f1": f1}, "costs": {"visual_tokens": tokens}}
               for name, tokens, f1 in [("baseline", 144, 0.98), ("cls-prune:keep=36", 36, 0.95),
                                        ("fastv:k=2,keep=36", 36, 0.95), ("dart:keep=36", 36, 0.95),
                                        ("visionzip:dominant=30,contextual=6", 36, 0.951),
                                        ("cls-prune:keep=12", 12, 0.75), ("visionzip:dominant=10,contextual=2", 12,
                                                                          0.76)]]
    report.plot({"bench": "pope", "primary_metric": "f1", "results": results}, tmp_path)
    (fig,) = figures
    renderer = fig.canvas.get_renderer()
    texts = [t for t in fig.axes[0].texts]
    assert sorted(t.get_text() for t in texts) == sorted(r["config"] for r in results)
    boxes = [Text.get_window_extent(t, renderer) for t in texts]          # the text alone, not an arrow
    overlapping = [(texts[i].get_text(), texts[j].get_text()) for i in range(len(boxes))
                   for j in range(i + 1, len(boxes)) if boxes[i].overlaps(boxes[j])]
    assert overlapping == []


def test_heatmaps_share_one_scale_and_have_a_colour_bar(tmp_path, monkeypatch):
    import torch

    from attnkit import testing

    figures = _captured(monkeypatch)
    model, processor = testing.tiny_model_and_processor("llava")
    prompt = "Is there a cat?"
    with torch.inference_mode():
        grids, _ = report.attention_maps(model, processor, testing.tiny_image(), prompt)
    report.save_attention_maps(model, processor, testing.tiny_image(), prompt, tmp_path)
    assert len(figures) == len(grids) + 1                                   # every layer and the mean
    low, high = min(float(g.min()) for g in grids.values()), max(float(g.max()) for g in grids.values())
    assert low < high
    for fig in figures:
        heat, bar = fig.axes                                            # the map and its colour bar
        assert heat.images[-1].get_clim() == (low, high)
        assert bar.get_ylabel().startswith("attention weight")
    assert json.loads((tmp_path / "attention.json").read_text())["layers"].keys() == {str(k) for k in grids}


def test_shared_scale_ignores_dropped_tokens():
    import numpy as np

    grids = {0: np.array([[0.1, np.nan], [0.3, 0.2]]), 1: np.array([[np.nan, 0.5], [0.05, np.nan]])}
    assert report.shared_scale(grids) == (0.05, 0.5)
    assert report.shared_scale({0: np.full((2, 2), np.nan)}) == (0.0, 1.0)
