"""The eval runner: resume after a kill, error rows, same samples for every config, sharding + merge, report."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from attnkit import testing
from attnkit.eval import report, runner
from attnkit.eval.runner import RunSettings, Shard

CONFIGS = ["baseline", "record:layers=0"]


@dataclass(frozen=True)
class FakeSample:
    id: str
    image: Path | None
    question: str
    answer: Any
    split: str
    meta: dict = field(default_factory=dict)


class FakeBench:
    """Six yes/no samples (one with a corrupt image); metrics depend on every prediction."""

    name = "fake"
    max_new_tokens = 3
    primary_metric = "match"
    higher_is_better = {"match": True, "length": False}

    def __init__(self, root: Path, corrupt: bool = True):
        self.root, self.corrupt = root, corrupt

    def samples(self) -> list[FakeSample]:
        out = []
        for i in range(6):
            path = self.root / f"img{i}.png"
            if i == 4 and self.corrupt:
                path = self.root / "corrupt.png"
            out.append(FakeSample(f"s{i}", path, "is there a cat in the image ?", "yes" if i % 2 else "no", "split"))
        return out

    def score(self, samples, predictions) -> dict[str, float]:
        scored = [s for s in samples if s.id in predictions]
        match = sum(predictions[s.id].split()[:1] == [s.answer] for s in scored) / max(len(scored), 1)
        length = sum(len(predictions[s.id]) for s in scored) / max(len(scored), 1)
        return {"match": match, "length": length, "n": float(len(scored))}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runner")
    testing.save_tiny("llava", root / "model")
    for i in range(6):
        testing.tiny_image(i).save(root / f"img{i}.png")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return root


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    from attnkit.eval.loading import load_model_and_processor

    return load_model_and_processor(tiny_dir / "model")


@pytest.fixture(scope="module")
def uninterrupted(tiny_dir, loaded, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    results = _evaluate(tiny_dir, loaded, out)
    return out, results


def _evaluate(tiny_dir, loaded, out, **kw):
    model, processor = loaded
    return runner.evaluate(FakeBench(tiny_dir), kw.pop("configs", CONFIGS), out,
                           RunSettings(str(tiny_dir / "model")), model=model, processor=processor,
                           progress=False, **kw)


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _stopper(after: int):
    seen = []

    def cb(row):
        seen.append(row["id"])
        if len(seen) == after:
            raise KeyboardInterrupt

    return cb, seen


def test_resume_after_kill_gives_each_sample_once_and_the_same_metrics(tiny_dir, loaded, uninterrupted, tmp_path):
    full_out, full = uninterrupted
    stop, seen = _stopper(8)            # all 6 baseline rows, then 2 of the intervention's
    with pytest.raises(KeyboardInterrupt):
        _evaluate(tiny_dir, loaded, tmp_path, after_sample=stop)
    assert not (tmp_path / "summary.json").exists()

    counter, resumed_ids = _stopper(-1)
    resumed = _evaluate(tiny_dir, loaded, tmp_path, after_sample=counter)
    assert resumed_ids == ["s2", "s3", "s4", "s5"]          # nothing redone
    for a, b in zip(full, resumed, strict=True):
        assert a.config == b.config
        assert a.metrics == b.metrics
        assert Path(a.path).name == Path(b.path).name     # same config hash
        rows = _rows(b.path)
        assert [r["id"] for r in rows] == [f"s{i}" for i in range(6)]
        assert [r.get("prediction") for r in rows] == [r.get("prediction") for r in _rows(a.path)]


def test_torn_last_line_is_dropped_and_redone(tiny_dir, loaded, uninterrupted, tmp_path):
    _, full = uninterrupted
    stop, _ = _stopper(3)
    with pytest.raises(KeyboardInterrupt):
        _evaluate(tiny_dir, loaded, tmp_path, configs=["baseline"], after_sample=stop)
    path = next(tmp_path.glob("fake__baseline__*.jsonl"))
    with open(path, "a") as f:
        f.write('{"id": "s3", "split": "split", "predi')           # killed mid-write
    (res,) = _evaluate(tiny_dir, loaded, tmp_path, configs=["baseline"])
    assert [r["id"] for r in _rows(path)] == [f"s{i}" for i in range(6)]
    assert res.metrics == full[0].metrics


def test_corrupt_image_is_an_error_row_not_retried_unless_asked(tiny_dir, loaded, uninterrupted, tmp_path):
    _, full = uninterrupted
    base = full[0]
    assert (base.n, base.n_errors) == (5, 1)
    (err,) = [r for r in _rows(base.path) if "error" in r]
    assert err["id"] == "s4" and "corrupt.png" in err["error"]
    assert base.metrics["n"] == 5.0

    _evaluate(tiny_dir, loaded, tmp_path, configs=["baseline"])
    counter, redone = _stopper(-1)
    _evaluate(tiny_dir, loaded, tmp_path, configs=["baseline"], after_sample=counter)
    assert redone == []
    _evaluate(tiny_dir, loaded, tmp_path, configs=["baseline"], after_sample=counter, retry_errors=True)
    assert redone == ["s4"]
    rows = _rows(next(tmp_path.glob("fake__baseline__*.jsonl")))
    assert [r["id"] for r in rows].count("s4") == 1


def test_baseline_and_intervention_see_the_same_samples_and_report_costs(uninterrupted):
    _, (base, rec) = uninterrupted
    assert [r["id"] for r in _rows(base.path)] == [r["id"] for r in _rows(rec.path)] == [f"s{i}" for i in range(6)]
    assert base.path != rec.path
    # record changes no logit: the same greedy text
    assert [r.get("prediction") for r in _rows(base.path)] == [r.get("prediction") for r in _rows(rec.path)]
    for row in _rows(base.path):
        if "error" in row:
            continue
        assert row["visual_tokens"] == 16                     # (32 / 8)^2 patches of the tiny CLIP tower
        assert row["prefill_ms"] > 0 and row["new_tokens"] == 3
        assert row["decode_ms_per_token"] > 0
        assert row["peak_mem_mb"] is None                     # CPU: n/a (torch keeps no CPU allocator statistics)
        assert row["batch_size"] == 1 and row["prompt_tokens"] > 16
        assert row["layer_tokens"] == [row["prompt_tokens"]] * 4   # nothing dropped: each of the 4 layers sees all
    assert base.costs["visual_tokens"] == 16


def test_sharded_runs_merge_into_the_uninterrupted_rows(tiny_dir, loaded, uninterrupted, tmp_path):
    _, full = uninterrupted
    assert _evaluate(tiny_dir, loaded, tmp_path, shard=Shard(1, 2)) == []      # rank 1: rows only
    ranks = sorted(p.name.split(".")[-2] for p in tmp_path.glob("*.rank*.jsonl"))
    assert ranks == ["rank1", "rank1"]
    merged = _evaluate(tiny_dir, loaded, tmp_path, shard=Shard(0, 2))          # rank 0 merges at the end
    assert not list(tmp_path.glob("*.rank*.jsonl"))
    for a, b in zip(full, merged, strict=True):
        assert a.metrics == b.metrics and (a.n, a.n_errors) == (b.n, b.n_errors)
        key = {r["id"]: r.get("prediction") for r in _rows(a.path)}
        got = _rows(b.path)
        assert sorted(r["id"] for r in got) == sorted(key)
        assert {r["id"]: r.get("prediction") for r in got} == key


def test_shard_take_partitions_and_merge_prefers_success():
    items = list(range(7))
    parts = [Shard(r, 3).take(items) for r in range(3)]
    assert sorted(sum(parts, [])) == items and parts[1] == [1, 4]
    rows = runner.merge_rows([[{"id": "a", "error": "x"}, {"id": "b", "prediction": "1"}],
                              [{"id": "a", "prediction": "2"}, {"id": "b", "error": "y"}]])
    assert rows == [{"id": "a", "prediction": "2"}, {"id": "b", "prediction": "1"}]


def test_bad_spec_fails_before_the_model_loads(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown intervention 'nope'"):
        runner.evaluate(FakeBench(tiny_dir), ["baseline", "nope:keep=3"], tmp_path,
                        RunSettings(str(tmp_path / "no-such-model")), progress=False)


def test_config_hash_depends_on_spec_and_decoding(tiny_dir):
    s = RunSettings(str(tiny_dir / "model"))
    key = runner.RunKey("fake", "record:layers=0", s, 3)
    assert key.digest() == runner.RunKey("fake", "record:layers=0", s, 3).digest()
    assert key.digest() != runner.RunKey("fake", "baseline", s, 3).digest()
    assert key.digest() != runner.RunKey("fake", "record:layers=0", s, 4).digest()
    assert key.digest() != runner.RunKey("fake", "record:layers=0", RunSettings(s.model_path, seed=1), 3).digest()
    assert runner.canonical("record: layers=0 ") == runner.canonical("record:layers=0") == "record:layers=0"
    assert runner.split_specs("baseline") == [] and runner.split_specs("a;b:x=1") == ["a", "b:x=1"]


def test_visual_tokens_prefers_an_interventions_kept_count():
    assert runner.visual_tokens({"visual_tokens": [576], "cls-prune": {"visual_tokens_kept": [64]}}) == 64
    assert runner.visual_tokens({"visual_tokens": [576], "record": {"layers": []}}) == 576


def test_report_deltas_arrows_and_plots(tmp_path):
    def res(config, match, tokens, ms):
        return {"config": config, "n": 5, "n_errors": 0, "metrics": {"match": match, "length": 4.0},
                "costs": {"visual_tokens": tokens, "prefill_ms": ms, "decode_ms_per_token": 1.0, "peak_mem_mb": 2.0}}

    summary = {"bench": "fake", "primary_metric": "match", "higher_is_better": FakeBench.higher_is_better,
               "memory": "cpu", "results": [res("baseline", 0.5, 576, 100.0), res("cls-prune:keep=64", 0.6, 64, 20.0),
                                            res("cls-prune:keep=128", 0.4, 128, 30.0)]}
    text = report.write_report(tmp_path, summary)
    lines = text.splitlines()
    row64 = next(line for line in lines if line.startswith("| cls-prune:keep=64 |"))
    assert row64.startswith("| cls-prune:keep=64 | 5 | 0 | 0.600 | +0.100 ▲ | 64 (−89 %) | 20 | 1.000 |")
    row128 = next(line for line in lines if line.startswith("| cls-prune:keep=128 |"))
    assert "| 0.400 | −0.100 ▼ |" in row128
    assert "| length ↓ | 4.000 | 4.000 (±0) | 4.000 (±0) |" in text
    assert (tmp_path / "report.md").read_text() == text
    assert (tmp_path / "fake_metric_vs_tokens.png").stat().st_size > 1000
    assert (tmp_path / "fake_latency_vs_keep.png").stat().st_size > 1000
    assert report.keep_of("var;cls-prune:keep=0.5") == 0.5 and report.keep_of("baseline") is None


def test_loading_dtype_quantization_and_bad_values(tiny_dir, tmp_path):
    import torch

    from attnkit.eval import loading

    model = loading.load_model(tiny_dir / "model", dtype="bf16")
    assert type(model).__name__ == "LlavaForConditionalGeneration" and model.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        loading.load_model(tiny_dir / "model", dtype="float8")
    with pytest.raises(ValueError, match="unknown quantization '3bit'"):
        loading.load_model(tiny_dir / "model", quantization="3bit")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        loading.load_model(tmp_path)
    pytest.importorskip("bitsandbytes")
    q = loading.load_model(tiny_dir / "model", quantization="4bit")
    assert type(q.model.language_model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"


def test_a_config_that_cannot_wrap_fails_before_any_generation(tiny_dir, loaded, tmp_path):
    calls = []
    with pytest.raises(ValueError, match="config 'record:layers=99' cannot run on this model: record: layer 99"):
        _evaluate(tiny_dir, loaded, tmp_path, configs=["baseline", "record:layers=99"], after_sample=calls.append)
    assert calls == [] and not list(tmp_path.glob("*.jsonl"))


# --- what keys a row file (issue #13, item 1) ---------------------------------------------------------
class OptionBench(FakeBench):
    """FakeBench with benchmark options (as the real benchmarks have) and a `limit`."""

    def __init__(self, root: Path, limit: int | None = None, **options):
        super().__init__(root, corrupt=False)
        self.options = {"prompt_suffix": "", **options}
        self.limit, self.splits = limit, None

    def samples(self) -> list[FakeSample]:
        out = [FakeSample(s.id, s.image, s.question + self.options["prompt_suffix"], s.answer, s.split)
               for s in super().samples()]
        return out[: self.limit] if self.limit else out


def _data_dir(root: Path, seed: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(6):
        testing.tiny_image(seed + i).save(root / f"img{i}.png")
    return root


def _run_counted(bench, loaded, out, model_dir, configs=("baseline",)):
    model, processor = loaded
    generated, lines = [], []
    results = runner.evaluate(bench, list(configs), out, RunSettings(str(model_dir)), model=model, processor=processor,
                              progress=False, after_sample=lambda r: generated.append(r["id"]), log=lines.append)
    return results, generated, lines


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNKIT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_other_data_with_the_same_ids_is_not_served_from_the_folder(tiny_dir, loaded, tmp_path, cache_dir):
    a, b = _data_dir(tmp_path / "a", 100), _data_dir(tmp_path / "b", 200)
    out = tmp_path / "out"
    _, first, _ = _run_counted(OptionBench(a), loaded, out, tiny_dir / "model")
    assert first == [f"s{i}" for i in range(6)]
    (res,), second, lines = _run_counted(OptionBench(b), loaded, out, tiny_dir / "model")
    assert second == first                                 # every sample generated again, on b's images
    (fresh,), _, _ = _run_counted(OptionBench(b), loaded, tmp_path / "fresh", tiny_dir / "model")
    assert [r["prediction"] for r in _rows(res.path)] == [r["prediction"] for r in _rows(fresh.path)]
    assert res.metrics == fresh.metrics
    (line,) = lines
    assert "starting fresh" in line and "another key" in line and "data" in line
    # a copy of b (new path and inode, same content) is the same data: resumed, nothing generated
    import shutil

    shutil.copytree(b, tmp_path / "b_copy")
    _, third, lines = _run_counted(OptionBench(tmp_path / "b_copy"), loaded, out, tiny_dir / "model")
    assert third == [] and lines and lines[0].startswith("attnkit: fake baseline: resuming 6 row(s)")


def test_weights_changed_in_place_are_not_served_from_the_folder(tiny_dir, loaded, tmp_path, cache_dir):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_dir / "model", model_dir)
    out = tmp_path / "out"
    _run_counted(OptionBench(tiny_dir), loaded, out, model_dir)
    _, again, _ = _run_counted(OptionBench(tiny_dir), loaded, out, model_dir)
    assert again == []                                     # unchanged weights: resumed
    weights = model_dir / "model.safetensors"
    state, size = load_file(weights), weights.stat().st_size
    save_file({k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}, weights,
              metadata={"format": "pt"})                   # same names, shapes and size: "retrained in place"
    new = load_file(weights)
    assert weights.stat().st_size == size and not all(torch.equal(new[k], state[k]) for k in state)
    _, redone, lines = _run_counted(OptionBench(tiny_dir), loaded, out, model_dir)
    assert redone == [f"s{i}" for i in range(6)]
    assert "weights" in lines[0] and "data" not in lines[0].split("differs in", 1)[1]


def test_a_changed_benchmark_option_is_a_new_key_and_limit_is_not(tiny_dir, loaded, tmp_path, cache_dir):
    out = tmp_path / "out"
    _, first, _ = _run_counted(OptionBench(tiny_dir, limit=3), loaded, out, tiny_dir / "model")
    assert first == ["s0", "s1", "s2"]
    _, more, lines = _run_counted(OptionBench(tiny_dir), loaded, out, tiny_dir / "model")
    assert more == ["s3", "s4", "s5"] and lines == ["attnkit: fake baseline: resuming 3 row(s) of "
                                                    + lines[0].rsplit(" ", 1)[1]]
    _, suffixed, lines = _run_counted(OptionBench(tiny_dir, prompt_suffix=" answer yes or no"), loaded, out,
                                      tiny_dir / "model")
    assert suffixed == [f"s{i}" for i in range(6)]
    assert "starting fresh" in lines[0] and "options" in lines[0]


def test_content_hash_cache_rehashes_copies_and_edits_not_unchanged_files(tmp_path, monkeypatch):
    import os
    import shutil

    from attnkit.eval import fingerprint

    f = tmp_path / "a.bin"
    f.write_bytes(b"x" * 1000)
    cache = fingerprint.HashCache(tmp_path / "cache.json")
    h = cache.file_hash(f)
    cache.save()
    reads = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: (reads.append(str(p)), real_open(p, *a, **k))[1])
    again = fingerprint.HashCache(tmp_path / "cache.json")
    assert again.file_hash(f) == h and str(f) not in reads          # unchanged: from the cache, not re-read
    monkeypatch.undo()
    st = f.stat()
    g = tmp_path / "copy.bin"
    g.write_bytes(b"y" * 1000)                                        # other content, same size and mtime
    os.utime(g, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert again.file_hash(g) != h
    shutil.copy2(f, tmp_path / "same.bin")
    assert again.file_hash(tmp_path / "same.bin") == h
    f.write_bytes(b"z" * 1000)                                        # edited in place: new mtime
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert again.file_hash(f) != h
    assert again.file_hash(tmp_path / "missing") is None


def test_a_calibration_file_edited_in_place_is_not_served_from_the_folder(tiny_dir, loaded, tmp_path, cache_dir):
    """``vhr:scores=FILE``: the rows are keyed by the file's content, not its path."""
    import torch

    model, _ = loaded
    text = model.config.get_text_config()
    heads = tmp_path / "heads.json"

    def write(seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        layers = {str(i): torch.rand(text.num_attention_heads, generator=g).tolist()
                  for i in range(text.num_hidden_layers)}
        heads.write_text(json.dumps({"method": "vhr", "num_heads": text.num_attention_heads, "layers": layers}))

    write(0)
    out, configs = tmp_path / "out", ("baseline", f"vhr:scores={heads}")
    _, first, _ = _run_counted(OptionBench(tiny_dir), loaded, out, tiny_dir / "model", configs)
    assert len(first) == 12
    _, again, _ = _run_counted(OptionBench(tiny_dir), loaded, out, tiny_dir / "model", configs)
    assert again == []                                       # same content: resumed
    write(1)                                                 # same path, other heads
    _, redone, lines = _run_counted(OptionBench(tiny_dir), loaded, out, tiny_dir / "model", configs)
    assert redone == [f"s{i}" for i in range(6)]             # the vhr config only; the baseline is resumed
    assert any("files" in line for line in lines)
