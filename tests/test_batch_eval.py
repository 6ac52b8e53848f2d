"""Batched evaluation: batch-N rows equal batch-1 rows on the demo model for the baseline and every registered
intervention; a run cut mid-batch resumes without loss or duplicates; failures stay per sample; the handle's
per-layer token counts that the cost columns use."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from test_registry import EXAMPLES

import attnkit
from attnkit.eval import runner
from attnkit.eval.benchmarks import get_benchmark
from attnkit.interventions import REGISTRY
from attnkit.models.prompts import build_inputs, open_image
from attnkit.synth.demo import demo_data_path, demo_model_path

pytestmark = pytest.mark.usefixtures("one_thread")

# one representative spec per registered method: the registry test's examples (sparsevlm's keep=192 would keep
# all of the demo's 144 visual tokens, so it gets a budget that drops some)
SPECS = {name: spec for name, (spec, _) in EXAMPLES.items()} | {"sparsevlm": "sparsevlm:keep=36"}
CONFIGS = ["baseline", *sorted(SPECS.values())]
LIMIT = 2                 # questions per POPE split: 6 samples, batches of 4 + 2 at batch 4
MAX_NEW = 4
FIELDS = ("prediction", "new_tokens", "prompt_tokens", "layer_tokens", "visual_tokens")


@pytest.fixture(scope="module")
def demo():
    from attnkit.synth.demo import load_demo

    return load_demo()


class Varied:
    """The demo's POPE (first ``limit`` questions per split), sample i's question after ``i % 4`` times "please":
    the demo's questions all tokenize to one length, and a batch must be padded to test batching. ``corrupt``:
    ``(id, path)`` of a sample whose image is replaced by a file that is not an image."""

    def __init__(self, limit: int = LIMIT, corrupt: tuple[str, Path] | None = None):
        self.inner, self.corrupt = get_benchmark("pope", demo_data_path(), limit=limit), corrupt
        self.name, self.max_new_tokens, self.options = self.inner.name, self.inner.max_new_tokens, {"varied": limit}
        self.primary_metric, self.higher_is_better = self.inner.primary_metric, self.inner.higher_is_better

    def samples(self):
        out = [dataclasses.replace(s, question="please " * (i % 4) + s.question)
               for i, s in enumerate(self.inner.samples())]
        if self.corrupt:
            out = [dataclasses.replace(s, image=self.corrupt[1]) if s.id == self.corrupt[0] else s for s in out]
        return out

    def score(self, samples, predictions):
        return self.inner.score(samples, predictions)


def _bench(limit: int = LIMIT, **kw):
    return Varied(limit, **kw)


def _evaluate(demo, out, configs, batch_size, bench=None, **kw):
    model, processor = demo
    return runner.evaluate(bench or _bench(), configs, out,
                           runner.RunSettings(str(demo_model_path()), max_new_tokens=MAX_NEW), model=model,
                           processor=processor, progress=False, batch_size=batch_size, **kw)


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def batch1(demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("batch1")
    return {r.config: _rows(r.path) for r in _evaluate(demo, out, CONFIGS, 1)}


def test_every_registered_method_has_a_spec_here():
    assert set(SPECS) == set(REGISTRY)


def test_batch_n_rows_equal_batch_1_rows_for_baseline_and_every_intervention(demo, batch1, tmp_path):
    batched = {r.config: _rows(r.path) for r in _evaluate(demo, tmp_path, CONFIGS, 4)}
    assert set(batched) == set(batch1) and len(batched) == len(REGISTRY) + 1
    for config, rows in batched.items():
        alone = batch1[config]
        assert [r["id"] for r in rows] == [r["id"] for r in alone] and len(rows) == 3 * LIMIT, config
        assert not any("error" in r for r in rows), config
        for a, b in zip(alone, rows, strict=True):
            assert {k: a[k] for k in FIELDS} == {k: b[k] for k in FIELDS}, (config, a["id"])
        assert sorted(r["batch_size"] for r in rows) == [2, 2, 4, 4, 4, 4], config
        assert {r["batch_size"] for r in alone} == {1}
    # the batches really were padded: the questions' prompts differ in length
    assert len({r["prompt_tokens"] for r in batch1["baseline"]}) > 1


def _stopper(after: int):
    seen: list[str] = []

    def cb(row):
        seen.append(row["id"])
        if len(seen) == after:
            raise KeyboardInterrupt

    return cb, seen


def test_a_run_cut_mid_batch_resumes_without_loss_or_duplicates(demo, batch1, tmp_path):
    configs = ["baseline", "fastv:k=2,keep=6"]
    stop, _ = _stopper(8)                 # baseline's 6 rows, then 2 of fastv's first batch of 4
    with pytest.raises(KeyboardInterrupt):
        _evaluate(demo, tmp_path, configs, 4, after_sample=stop)
    (fastv,) = tmp_path.glob("pope__fastv*.jsonl")
    written = [r["id"] for r in _rows(fastv)]
    assert len(written) == 2
    counter, redone = _stopper(-1)
    results = _evaluate(demo, tmp_path, configs, 4, after_sample=counter)
    assert len(redone) == 4 and not set(redone) & set(written)
    for res in results:
        rows = _rows(res.path)
        assert [r["id"] for r in rows] == [r["id"] for r in batch1[res.config]]      # each id once, in order
        assert [r["prediction"] for r in rows] == [r["prediction"] for r in batch1[res.config]]


def test_an_unreadable_image_fails_only_its_own_sample_in_a_batch(demo, batch1, tmp_path):
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    bad_id = batch1["baseline"][1]["id"]
    (res,) = _evaluate(demo, tmp_path / "out", ["baseline"], 4, bench=_bench(corrupt=(bad_id, bad)))
    rows = _rows(res.path)
    assert [r["id"] for r in rows if "error" in r] == [bad_id] and "corrupt.png" in rows[1]["error"]
    assert (res.n, res.n_errors) == (5, 1)
    for a, b in zip(batch1["baseline"], rows, strict=True):
        if "error" not in b:
            assert a["prediction"] == b["prediction"] and b["batch_size"] in (2, 3, 4)


def test_a_batch_whose_generate_fails_is_redone_one_sample_at_a_time(demo, batch1, tmp_path, monkeypatch):
    real, bad_id = runner.generate_batch, batch1["baseline"][2]["id"]

    def fails_with(model, processor, handle, samples, *a, **k):
        if any(s.id == bad_id for s in samples):
            raise RuntimeError("boom")
        return real(model, processor, handle, samples, *a, **k)

    monkeypatch.setattr(runner, "generate_batch", fails_with)
    (res,) = _evaluate(demo, tmp_path, ["baseline"], 4)
    rows = _rows(res.path)
    assert [(r["id"], r["error"]) for r in rows if "error" in r] == [(bad_id, "RuntimeError: boom")]
    assert [r.get("prediction") for r in rows if "error" not in r] == [
        r["prediction"] for r in batch1["baseline"] if r["id"] != bad_id]


def test_a_method_that_cannot_batch_runs_at_batch_1_and_says_so_once(demo, batch1, tmp_path, monkeypatch):
    monkeypatch.setattr(REGISTRY["var"], "batchable", False)
    said: list[str] = []
    config = runner.canonical(SPECS["var"])
    base, var = _evaluate(demo, tmp_path, ["baseline", config], 4, log=said.append)
    assert [line for line in said if "cannot batch" in line] == [
        f"attnkit: pope {config}: var cannot batch exactly (a padded batch would change answers); running it at "
        "batch size 1 instead of 4"]
    assert {r["batch_size"] for r in _rows(var.path)} == {1}
    assert {r["batch_size"] for r in _rows(base.path)} == {2, 4}


def test_rows_record_batch_costs_and_cpu_memory_is_none(batch1):
    for rows in batch1.values():
        for r in rows:
            assert r["prefill_ms"] > 0 and r["total_ms"] > r["prefill_ms"] and r["peak_mem_mb"] is None


# --- the handle's per-layer token counts --------------------------------------------------------------
def _batch(processor, n: int = 3):
    samples = _bench(1).samples()[:n]
    return build_inputs(processor, [s.question for s in samples], [open_image(s.image) for s in samples])


@pytest.mark.parametrize("spec,dropped", [
    ("", [0, 0, 0, 0]),
    ("record", [0, 0, 0, 0]),
    ("var", [0, 0, 0, 0]),
    ("fastv:k=2,keep=4", [0, 0, 140, 140]),                       # layers 0..1 full, then 144 - 4 fewer
    ("pyramiddrop:layers=1+3,ratio=0.5", [0, 72, 72, 108]),       # keep 144·0.5 from layer 1, 144·0.25 from 3
    ("pyramiddrop:ratio=0.5", [0, 72, 108, 126]),                 # default stages 1, 2, 3 of 4 layers
    ("cls-prune:keep=36", [108] * 4),                             # before the LLM: every layer
    ("vte:policy=layer,exit_layer=1", [0, 0, 144, 144]),          # exit after layer 1: the text alone from 2
])
def test_layer_tokens_are_the_prompt_minus_the_visual_tokens_dropped_before_each_layer(demo, spec, dropped):
    model, processor = demo
    inputs = _batch(processor)
    prompt = inputs["attention_mask"].sum(1).tolist()
    assert len(set(prompt)) > 1 and (inputs["attention_mask"] == 0).any()       # left-padded, unequal lengths
    with attnkit.intervene(model, *([spec] if spec else [])) as handle:
        assert handle.stats()["layer_tokens"] is None
        with torch.no_grad():
            model(**inputs)
        got = handle.stats()["layer_tokens"]
    assert got == [[p - d for d in dropped] for p in prompt]


def test_configs_take_turns_over_chunks_of_batches(demo, batch1, tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "INTERLEAVE_BATCHES", 1)
    order: list[str] = []
    base, rec = _evaluate(demo, tmp_path, ["baseline", "record"], 2, after_sample=lambda r: order.append(r["config"]))
    b, r = Path(base.path).stem.rsplit("__", 1)[1], Path(rec.path).stem.rsplit("__", 1)[1]
    assert order == [b, b, r, r] * 3
    assert [x["prediction"] for x in _rows(rec.path)] == [x["prediction"] for x in batch1["record"]]


def test_the_throughput_benchmark_table_compares_with_batch_1(capsys):
    from benchmarks import eval_throughput

    assert eval_throughput.main(["--model", "mid", "--dry-run", "--no-lmms", "--samples", "6", "--batches", "1",
                                 "3"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| runner |")]
    assert [line.split("|")[2].strip() for line in rows] == ["1", "3"]
    assert all(line.rstrip(" |").endswith("yes") for line in rows), rows


def test_the_cli_passes_batch_size_down_and_documents_the_default(batch1, tmp_path, capsys):
    from attnkit import cli

    args = ["eval", "--model", str(demo_model_path()), "--data", str(demo_data_path()), "--limit", "1",
            "--max-new-tokens", str(MAX_NEW), "--out", str(tmp_path), "--no-plots", "--no-progress"]
    assert cli.main([*args, "--batch-size", "3"]) == 0
    (path,) = tmp_path.glob("pope__baseline__*.jsonl")
    assert [r["batch_size"] for r in _rows(path)] == [3, 3, 3]
    with pytest.raises(SystemExit) as bad:
        cli.main([*args, "--batch-size", "0"])
    assert bad.value.code == 2 and "--batch-size: 0 must be a positive number" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["eval", "--help"])
    assert "default: 1 on CPU, 8 on CUDA" in " ".join(capsys.readouterr().out.split())
