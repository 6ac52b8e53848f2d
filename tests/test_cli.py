"""The CLI end to end, offline: tiny saved models, the fixture data of every format, malformed files, sweeps."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from attnkit import cli, testing
from attnkit.eval.loading import load_processor

DATA = Path(__file__).parent / "data"
FAST = ["--no-progress", "--no-plots", "--device", "cpu", "--max-new-tokens", "3"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads; on a shared 2-core box they only contend."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli_models")
    out = {}
    for family in ("llava", "qwen2_vl"):
        testing.save_tiny(family, root / family)
        out[family] = root / family
    return out


def _rows(out: Path, config: str) -> list[dict]:
    (path,) = [p for p in out.glob("*.jsonl") if f"__{config}__" in p.name]
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("bench,limit", [("pope", None), ("chair", 2), ("mme", 1), ("amber", 2)])
def test_eval_each_format(bench, limit, models, tmp_path, capsys):
    args = ["eval", "--model", str(models["llava"]), "--bench", bench, "--data", str(DATA / bench),
            "--compare", "baseline", "record:layers=0", "--out", str(tmp_path), *FAST]
    args += ["--limit", str(limit)] if limit else []
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [r["config"] for r in summary["results"]] == ["baseline", "record:layers=0"]
    primary = summary["primary_metric"]
    assert f"| config | n | errors | {primary}" in printed
    assert "| **baseline** |" in printed and "| record:layers=0 |" in printed
    assert (tmp_path / "report.md").read_text().startswith(f"# {bench}: interventions vs baseline")
    base, rec = summary["results"]
    assert primary in base["metrics"] and base["metrics"] == rec["metrics"]       # record changes nothing
    ids = [r["id"] for r in _rows(tmp_path, "baseline")]
    assert ids == [r["id"] for r in _rows(tmp_path, "record_layers=0")]
    assert len(ids) == len(set(ids)) == base["n"] + base["n_errors"]


def test_pope_corrupt_and_missing_images_are_error_rows(models, tmp_path, capsys):
    args = ["eval", "--model", str(models["llava"]), "--data", str(DATA / "pope"), "--out", str(tmp_path), *FAST]
    assert cli.main(args) == 0
    rows = {r["id"]: r for r in _rows(tmp_path, "baseline")}
    assert len(rows) == 10
    assert "cannot identify image file" in rows["random/4"]["error"]
    assert "missing.png" in rows["adversarial/3"]["error"]
    assert sum("error" in r for r in rows.values()) == 2
    summary = json.loads((tmp_path / "summary.json").read_text())["results"][0]
    assert (summary["n"], summary["n_errors"]) == (8, 2)
    err = capsys.readouterr().err
    assert "2 of 10 sample(s) failed" in err and "rerun with --retry-errors" in err
    # rerun: nothing to do, same table
    assert cli.main(args) == 0
    assert len(_rows(tmp_path, "baseline")) == 10


def test_interrupted_cli_run_exits_130_and_the_rerun_completes(models, tmp_path, capsys, monkeypatch):
    from attnkit.eval import runner

    args = ["eval", "--model", str(models["llava"]), "--data", str(DATA / "pope"), "--limit", "2",
            "--out", str(tmp_path), *FAST]
    real, calls = runner.generate_batch, []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 5:          # 1 warm-up + 3 samples written, then Ctrl-C
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(runner, "generate_batch", flaky)
    assert cli.main(args) == 130
    assert "rerun the same command to resume" in capsys.readouterr().err
    assert [r["id"] for r in _rows(tmp_path, "baseline")] == ["random/1", "random/2", "popular/1"]
    monkeypatch.setattr(runner, "generate_batch", real)
    assert cli.main(args) == 0
    ids = [r["id"] for r in _rows(tmp_path, "baseline")]
    assert sorted(ids) == sorted(f"{s}/{i}" for s in ("random", "popular", "adversarial") for i in (1, 2))
    assert len(ids) == 6


@pytest.mark.parametrize("bench,folder,where", [
    ("pope", "pope_bad_json", "coco_pope_popular.json:2: invalid JSON"),
    ("pope", "pope_bad_label", "coco_pope_random.json:3: field 'label'"),
    ("pope", "pope_missing_field", "coco_pope_adversarial.json:2: field 'image' is missing"),
    ("mme", "mme_bad_answer", "000000000001.txt:2: field 'answer'"),
    ("chair", "chair_missing_field", "instances_val2014.json: field 'annotations[1].category_id' is missing"),
    ("amber", "amber_missing_hallu", "annotations.json: field '[0].hallu' is missing"),
])
def test_malformed_file_exits_2_naming_path_line_field(bench, folder, where, models, tmp_path, capsys):
    args = ["eval", "--model", str(models["llava"]), "--bench", bench, "--data", str(DATA / "malformed" / folder),
            "--out", str(tmp_path), *FAST]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("attnkit: error: ") and str(DATA / "malformed" / folder) in err and where in err
    assert "Traceback" not in err
    assert not list(tmp_path.glob("*.jsonl"))


@pytest.mark.parametrize("extra,message", [
    (["--bench", "nope"], "unknown benchmark 'nope'; available: amber, chair, mme, pope"),
    (["--compare", "nope:keep=3"], "unknown intervention 'nope'"),
    (["--compare", "record:layers=-1"], "record: layers=-1 is out of range"),
    (["--compare", "record:depth=2"], "record: unknown parameter 'depth'"),
])
def test_bad_values_are_named(extra, message, models, tmp_path, capsys):
    args = ["eval", "--model", str(models["llava"]), "--data", str(DATA / "pope"), "--out", str(tmp_path),
            *FAST, *extra]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("attnkit: error: ") and message in err


def test_missing_paths_and_half_given_demo_args(models, tmp_path, capsys):
    assert cli.main(["eval", "--model", str(models["llava"]), "--data", str(tmp_path / "nowhere"), *FAST]) == 2
    assert "nowhere' is not a directory" in capsys.readouterr().err
    assert cli.main(["eval", "--model", str(tmp_path / "nomodel"), "--data", str(DATA / "pope"),
                     "--out", str(tmp_path), *FAST]) == 2
    assert "model folder" in capsys.readouterr().err
    assert cli.main(["eval", "--model", str(models["llava"]), *FAST]) == 2
    assert "give both --model PATH and --data DIR" in capsys.readouterr().err


def test_sweep_grid_expansion():
    assert cli.sweep_grid(["cls-prune:keep=32,64,128"]) == [
        "baseline", "cls-prune:keep=32", "cls-prune:keep=64", "cls-prune:keep=128"]
    assert cli.sweep_grid(["fastv:k=2,3,keep=0.25,0.5"]) == [
        "baseline", "fastv:k=2,keep=0.25", "fastv:k=2,keep=0.5", "fastv:k=3,keep=0.25", "fastv:k=3,keep=0.5"]
    assert cli.sweep_grid(["cls-prune:keep=32,64", "var:p=0.6"]) == [
        "baseline", "cls-prune:keep=32;var:p=0.6", "cls-prune:keep=64;var:p=0.6"]
    # two sweeps of one intervention merge their keys
    assert cli.sweep_grid(["fastv:k=2,3", "fastv:keep=0.5"]) == ["baseline", "fastv:k=2,keep=0.5",
                                                                  "fastv:k=3,keep=0.5"]
    assert cli.sweep_grid(["var"]) == ["baseline", "var"]
    with pytest.raises(ValueError, match="value '32' comes before any key="):
        cli.sweep_grid(["cls-prune:32,64"])
    with pytest.raises(ValueError, match="swept twice"):
        cli.sweep_grid(["fastv:k=2", "fastv:k=3"])


def test_ablate_runs_the_grid_with_the_baseline(models, tmp_path, capsys):
    args = ["ablate", "--model", str(models["llava"]), "--data", str(DATA / "pope"), "--limit", "1",
            "--sweep", "record:layers=0,1", "--out", str(tmp_path), *[a for a in FAST if a != "--no-plots"]]
    assert cli.main(args) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [r["config"] for r in summary["results"]] == ["baseline", "record:layers=0", "record:layers=1"]
    assert "ablation grid (3 configs)" in capsys.readouterr().err
    assert (tmp_path / "pope_metric_vs_tokens.png").is_file()


@pytest.mark.parametrize("family,grid", [("llava", [4, 4]), ("qwen2_vl", [4, 6])])
def test_inspect_writes_heatmaps(family, grid, models, tmp_path):
    image = tmp_path / "img.png"
    testing.tiny_image(3, width=48, height=32).save(image)
    out = tmp_path / "maps"
    assert cli.main(["inspect", "--model", str(models[family]), "--image", str(image), "--prompt",
                     "is there a cat ?", "--out", str(out), "--layers", "0+2", "--device", "cpu"]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["layer00.png", "layer02.png", "mean.png"]
    assert all(p.stat().st_size > 1000 for p in out.glob("*.png"))
    raw = json.loads((out / "attention.json").read_text())
    assert raw["family"] == family and sorted(raw["layers"]) == ["0", "2"]
    mass = raw["layers"]["0"]
    assert [len(mass), len(mass[0])] == grid
    assert 0 < sum(map(sum, mass)) <= 1.0 + 1e-5                # a share of the last token's attention


def test_qwen_folder_loads_the_image_only_processor(models):
    import torch

    processor = load_processor(models["qwen2_vl"])
    assert type(processor).__name__ == "Qwen2VLImageOnlyProcessor"
    reference = testing.tiny_processor("qwen2_vl")
    text = testing.tiny_prompt(reference, "is there a cat ?")
    got = processor(images=[testing.tiny_image(1)], text=[text], return_tensors="pt")
    want = reference(images=[testing.tiny_image(1)], text=[text], return_tensors="pt")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_calibrate_dispatches_or_names_what_can_be_calibrated(models, tmp_path, capsys, monkeypatch):
    base = ["--model", str(models["llava"]), "--data", str(DATA / "pope"), "--out", str(tmp_path / "c.json"),
            "--device", "cpu"]
    assert cli.main(["calibrate", "record", *base]) == 2
    assert "'record' needs no calibration" in capsys.readouterr().err
    assert cli.main(["calibrate", "nope", *base]) == 2
    assert "unknown intervention 'nope'" in capsys.readouterr().err

    from attnkit.interventions import REGISTRY, Record

    calls = []

    class Calibrated(Record):
        name = "calibrated-test"

        @classmethod
        def calibrate(cls, model, processor, samples, out_path, alpha: float = 2.0, layers=None, fast=False):
            calls.append((type(model).__name__, len(samples), out_path, alpha, layers, fast))
            out_path.write_text("{}")

    monkeypatch.setitem(REGISTRY, "calibrated-test", Calibrated)
    assert cli.main(["calibrate", "record", *base]) == 2
    assert "can be calibrated: calibrated-test" in capsys.readouterr().err
    assert cli.main(["calibrate", "calibrated-test", "--limit", "1", *base]) == 0
    assert calls == [("LlavaForConditionalGeneration", 3, tmp_path / "c.json", 2.0, None, False)]
    opts = ["--set", "alpha=1.5", "--set", "layers=1+3", "--set", "fast=true"]
    assert cli.main(["calibrate", "calibrated-test", *opts, *base]) == 0
    assert calls[-1][3:] == (1.5, (1, 3), True)
    assert cli.main(["calibrate", "calibrated-test", "--set", "beta=1", *base]) == 2
    err = capsys.readouterr().err
    assert "bad --set 'beta=1'; write key=value with a key among: alpha (default 2.0), layers" in err
    assert cli.main(["calibrate", "calibrated-test", "--set", "alpha=big", *base]) == 2
    assert "'big' is not a float" in capsys.readouterr().err


def test_default_eval_runs_the_embedded_demo(models, tmp_path, capsys, monkeypatch):
    """No arguments: the pruning configs on the clean split and the hallucination comparison on the prone one, one
    model load, two short tables with intervals, one legend, where the reports are, the time it took."""
    from attnkit.eval import loading

    demo = types.ModuleType("attnkit.synth.demo")
    demo.demo_model_path = lambda: models["llava"]
    demo.demo_data_path = lambda kind="clean": DATA / "pope"
    monkeypatch.setitem(sys.modules, "attnkit.synth.demo", demo)
    monkeypatch.setattr(cli, "DEMO_LIMIT", 1)
    monkeypatch.setattr(cli, "DEMO_COMPARE", ("baseline", "record:layers=0", "not-registered:keep=3"))
    monkeypatch.setattr(cli, "DEMO_PRONE_COMPARE", ("baseline", "record:layers=1"))
    loads = []
    real_load = loading.load_model_and_processor
    monkeypatch.setattr(loading, "load_model_and_processor", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    assert cli.main(["eval", "--out", str(tmp_path), *FAST]) == 0
    assert len(loads) == 1
    clean = json.loads((tmp_path / "pope" / "summary.json").read_text())
    prone = json.loads((tmp_path / "pope_prone" / "summary.json").read_text())
    assert clean["bench"] == prone["bench"] == "pope"
    assert [r["config"] for r in clean["results"]] == ["baseline", "record:layers=0"]
    assert [r["config"] for r in prone["results"]] == ["baseline", "record:layers=1"]
    assert sum(r["n"] + r["n_errors"] for r in clean["results"]) == 6       # 1 per split, 2 configs
    assert "f1" in clean["results"][0]["ci"] and "f1" in clean["results"][1]["paired"]
    out = capsys.readouterr().out
    assert out.count("| **baseline** |") == 2 and out.count("| config | n | errors | f1 ↑ | Δ f1 vs baseline |") == 2
    assert "## Pruning: accuracy vs visual tokens (clean demo POPE), 3 questions" in out
    assert "## Hallucination: baseline vs pai (prone demo POPE" in out
    assert out.count("percentile bootstrap interval") == 1
    for folder in ("pope", "pope_prone"):
        assert f"report: {tmp_path / folder / 'report.md'}" in out
    assert "took " in out
    assert (tmp_path / "pope" / "report.md").is_file() and (tmp_path / "pope_prone" / "report.md").is_file()


def test_demo_data_set_is_selectable(models, tmp_path, capsys, monkeypatch):
    asked = []
    demo = types.ModuleType("attnkit.synth.demo")
    demo.demo_model_path = lambda: models["llava"]
    demo.demo_data_path = lambda kind="clean": asked.append(kind) or DATA / "pope"
    monkeypatch.setitem(sys.modules, "attnkit.synth.demo", demo)
    monkeypatch.setattr(cli, "DEMO_LIMIT", 1)
    monkeypatch.setattr(cli, "DEMO_COMPARE", ("baseline",))
    monkeypatch.setattr(cli, "DEMO_PRONE_COMPARE", ("baseline",))
    assert cli.main(["eval", "--demo", "prone", "--out", str(tmp_path), *FAST]) == 0
    assert asked == ["prone"]
    assert json.loads((tmp_path / "summary.json").read_text())["results"][0]["config"] == "baseline"
    assert cli.main(["eval", "--demo", "prone", "--model", str(models["llava"]), "--data", str(DATA / "pope"),
                     "--out", str(tmp_path), *FAST]) == 2
    assert "--demo prone selects the embedded demo's data" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["eval", "--demo", "hard"])


def test_real_prone_demo_folder_exists():
    from attnkit.synth.demo import demo_data_path

    assert (demo_data_path("prone") / "synth_pope_adversarial.json").is_file()
    assert demo_data_path("prone") != demo_data_path()


def test_default_eval_without_the_demo_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "attnkit.synth.demo", None)
    assert cli.main(["eval", "--out", str(tmp_path), *FAST]) == 2
    assert "embedded demo (attnkit.synth.demo) is not available" in capsys.readouterr().err
    demo = types.ModuleType("attnkit.synth.demo")
    demo.demo_model_path = lambda: tmp_path / "not-built"
    demo.demo_data_path = lambda kind="clean": DATA / "pope"
    monkeypatch.setitem(sys.modules, "attnkit.synth.demo", demo)
    assert cli.main(["eval", "--out", str(tmp_path), *FAST]) == 2
    assert "embedded demo model is missing from this install" in capsys.readouterr().err


def test_list_names_interventions_models_benchmarks(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    for needle in ("interventions:", "  record ", "LlavaForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration",
                   "benchmarks:", "  pope ", "  chair ", "  mme ", "  amber "):
        assert needle in out


# --- what cannot work fails before the run, with one clear line (issue #13, item 2) -------------------
def _pope_dir(tmp_path: Path, text: str) -> Path:
    import shutil

    data = tmp_path / "data"
    shutil.copytree(DATA / "pope" / "images", data / "images")
    (data / "coco_pope_random.json").write_text(text)
    return data


def _one_line_error(capsys, needle: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith("attnkit: error: ") and needle in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    return err


def test_a_config_whose_every_sample_fails_exits_non_zero(models, tmp_path, capsys, monkeypatch):
    from attnkit.eval import runner

    real = runner.generate_batch

    def broken_when_wrapped(model, processor, handle, *a, **k):
        if handle.interventions:
            raise RuntimeError("this intervention cannot run here")
        return real(model, processor, handle, *a, **k)

    monkeypatch.setattr(runner, "generate_batch", broken_when_wrapped)
    args = ["eval", "--model", str(models["llava"]), "--data", str(DATA / "pope"), "--limit", "1",
            "--compare", "record:layers=0", "--out", str(tmp_path), *FAST]
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert "every sample failed for record:layers=0" in err and "this intervention cannot run here" in err


def test_cuda_on_a_torch_without_cuda_is_one_line(models, tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = ["eval", "--model", str(models["llava"]), "--data", str(DATA / "pope"), "--out", str(tmp_path),
            "--no-progress", "--device", "cuda"]
    assert cli.main(args) == 2
    _one_line_error(capsys, "--device cuda: this torch")
    assert cli.main([*args[:-1], "gpu"]) == 2
    _one_line_error(capsys, "--device 'gpu': use auto, cpu, cuda, cuda:N or map")


@pytest.mark.parametrize("flag", ["--max-new-tokens", "--limit"])
def test_non_positive_counts_are_refused(flag, models, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["eval", "--model", str(models["llava"]), "--data", str(DATA / "pope"), flag, "0"])
    assert exit_.value.code == 2
    assert f"argument {flag}: 0 must be a positive number" in capsys.readouterr().err


def test_empty_and_json_array_pope_files_are_named(models, tmp_path, capsys):
    base = ["eval", "--model", str(models["llava"]), "--out", str(tmp_path / "out"), *FAST]
    data = _pope_dir(tmp_path / "empty", "\n")
    assert cli.main([*base, "--data", str(data)]) == 2
    _one_line_error(capsys, "coco_pope_random.json: has no questions")
    rows = [{"question_id": 1, "image": "red.png", "text": "Is there a cat?", "label": "yes"}]
    data = _pope_dir(tmp_path / "array", json.dumps(rows, indent=1))
    assert cli.main([*base, "--data", str(data)]) == 2
    _one_line_error(capsys, "coco_pope_random.json:1: is a JSON array; this file must be JSON lines")


def test_a_truncated_jpeg_error_row_names_the_file(models, tmp_path, capsys):
    import io

    buf = io.BytesIO()
    testing.tiny_image(1, 64, 64).save(buf, format="JPEG")
    line = {"question_id": 1, "image": "cut.jpg", "text": "Is there a cat?", "label": "yes"}
    data = _pope_dir(tmp_path, json.dumps(line) + "\n" + json.dumps({**line, "question_id": 2, "image": "green.png"}))
    (data / "images" / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    assert cli.main(["eval", "--model", str(models["llava"]), "--data", str(data), "--out", str(tmp_path / "o"),
                     *FAST]) == 0
    rows = {r["id"]: r for r in _rows(tmp_path / "o", "baseline")}
    assert str(data / "images" / "cut.jpg") in rows["random/1"]["error"] and "truncated" in rows["random/1"]["error"]
    assert "prediction" in rows["random/2"]


def test_an_unwritable_out_is_one_line_before_the_model_loads(models, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert cli.main(["eval", "--model", str(tmp_path / "no-model"), "--data", str(DATA / "pope"),
                     "--out", str(tmp_path / "file" / "out"), *FAST]) == 2
    _one_line_error(capsys, f"output folder '{tmp_path / 'file' / 'out'}' is not writable")


def test_eval_runs_without_matplotlib(models, tmp_path):
    """The core install has no matplotlib: the report is written without plots, with a one-line note."""
    import os
    import subprocess

    argv = ["eval", "--model", str(models["llava"]), "--data", str(DATA / "pope"), "--limit", "1",
            "--out", str(tmp_path), *[a for a in FAST if a != "--no-plots"]]
    code = f"import sys; sys.modules['matplotlib'] = None; from attnkit import cli; sys.exit(cli.main({argv!r}))"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "plots skipped: matplotlib is not installed (pip install 'attnkit[eval]' adds it)" in done.stderr
    assert (tmp_path / "report.md").is_file() and not list(tmp_path.glob("*.png"))
