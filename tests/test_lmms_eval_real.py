"""attnkit through the real lmms-eval 0.7.3 (installed in CI by the README's install line; skipped without it).

Its model registry, its request objects and ``simple_evaluate`` on a local POPE task written from the shipped
demo data, the ``lmms-eval`` command line as the README gives it, and a 2-process run on the CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (pip install --no-deps lmms-eval==0.7.3)")
pytest.importorskip("datasets", reason="lmms-eval's dependencies are not installed (pip install -e '.[lmms]')")

import attnkit  # noqa: E402
from attnkit.integrations import lmms_eval as adapter  # noqa: E402
from attnkit.integrations.lmms_eval_tasks import write_pope_task  # noqa: E402

DEMO = Path(attnkit.__file__).parent / "assets" / "demo"
SPEC = "fastv:k=2,keep=36"            # two parameters: the case lmms-eval's comma split breaks without quotes
ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lmms_env")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp / "hf_datasets"),
            "ATTNKIT_CACHE_DIR": str(tmp / "attnkit_cache"), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lmms_task")
    write_pope_task(DEMO / "data", out, limit=2)            # 2 questions per split: 6 docs
    return out


def test_the_registry_resolves_attnkit_to_the_plugin_class():
    from lmms_eval.models import get_model

    from attnkit.integrations.lmms_eval_model import AttnkitLMMS

    assert get_model("attnkit") is AttnkitLMMS


def test_simple_evaluate_on_a_local_pope_task_equals_attnkit_eval(task_dir, tmp_path, monkeypatch, capsys):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from attnkit.eval import runner
    from attnkit.eval.benchmarks import get_benchmark
    from attnkit.integrations.lmms_eval_model import AttnkitLMMS

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    model = AttnkitLMMS(pretrained=str(DEMO / "model"), interventions=SPEC, output_dir=str(tmp_path / "store"))
    try:
        out = simple_evaluate(model=model, tasks=["attnkit_pope"], log_samples=True,
                              task_manager=TaskManager("WARNING", include_path=str(task_dir), include_defaults=False))
        samples = out["samples"]["attnkit_pope"]
        got = {s["doc"]["question_id"]: s["resps"][0][0] for s in samples}
        assert len(got) == 6 and set(out["results"]["attnkit_pope"]) >= {"pope_accuracy,none", "pope_f1_score,none"}
        # the same answers as attnkit's own runner: same prompt (upstream's post_prompt) and generation budget
        bench = get_benchmark("pope", DEMO / "data", limit=2)
        model.generator.handle.remove()
        results = runner.evaluate(bench, [SPEC], tmp_path / "runner",
                                  runner.RunSettings(str(DEMO / "model"), max_new_tokens=128),
                                  model=model.generator.model, processor=model.generator.processor, progress=False)
        rows = {r["id"]: r["prediction"] for r in runner.read_rows(Path(results[0].path))}
        assert rows == got

        # a failing request: counted, printed, answered ""; strict=true ends the run (SystemExit: status 1)
        model.generator.handle = attnkit.wrap(model.generator.model, *model.generator.specs)
        real = model.generator.generate_prompts
        calls = []

        def fail_once(prompts, images, gen_kwargs):
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("boom")
            return real(prompts, images, gen_kwargs)

        monkeypatch.setattr(model.generator, "generate_prompts", fail_once)
        model.generator.output_dir = tmp_path / "store2"
        model.generator._stores.clear()
        capsys.readouterr()
        simple_evaluate(model=model, tasks=["attnkit_pope"], log_samples=True,
                        task_manager=TaskManager("WARNING", include_path=str(task_dir), include_defaults=False))
        assert 'attnkit: 1 of 6 request(s) failed and were answered ""' in capsys.readouterr().err
        model.generator.strict, model.generator.output_dir = True, tmp_path / "store3"
        model.generator._stores.clear()
        calls.clear()
        with pytest.raises(adapter.SampleFailures, match="boom"):
            simple_evaluate(model=model, tasks=["attnkit_pope"],
                            task_manager=TaskManager("WARNING", include_path=str(task_dir), include_defaults=False))
    finally:
        model.generator.close()


@pytest.fixture(scope="module")
def varied_task_dir(tmp_path_factory) -> Path:
    """3 questions per split of the demo's POPE, question i after i times "please": prompts of unequal length."""
    root = tmp_path_factory.mktemp("lmms_varied")
    data = root / "data"
    data.mkdir()
    (data / "images").symlink_to(DEMO / "data" / "images")
    for split in ("random", "popular", "adversarial"):
        rows = [json.loads(line) for line in (DEMO / "data" / f"synth_pope_{split}.json").read_text().splitlines()[:3]]
        lines = [json.dumps({**r, "text": "please " * i + r["text"]}) for i, r in enumerate(rows)]
        (data / f"synth_pope_{split}.json").write_text("\n".join(lines) + "\n")
    write_pope_task(data, root / "task")
    return root / "task"


def test_batch_size_4_answers_as_batch_size_1_through_simple_evaluate(varied_task_dir, tmp_path, monkeypatch):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from attnkit.integrations.lmms_eval_model import AttnkitLMMS

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    answers, sizes = {}, {}
    for batch in ("1", "4"):
        model = AttnkitLMMS(pretrained=str(DEMO / "model"), interventions=SPEC, output_dir=str(tmp_path / batch),
                            batch_size=batch)
        real, seen = model.generator.generate_prompts, []

        def counted(prompts, images, gen_kwargs, real=real, seen=seen):
            seen.append(len(prompts))
            return real(prompts, images, gen_kwargs)

        monkeypatch.setattr(model.generator, "generate_prompts", counted)
        try:
            out = simple_evaluate(model=model, tasks=["attnkit_pope"], log_samples=True,
                                  task_manager=TaskManager("WARNING", include_path=str(varied_task_dir),
                                                           include_defaults=False))
        finally:
            model.generator.close()
        answers[batch] = {s["doc"]["question_id"]: s["resps"][0][0] for s in out["samples"]["attnkit_pope"]}
        sizes[batch] = sorted(seen)
    assert len(answers["1"]) == 9 and answers["4"] == answers["1"]
    assert sizes == {"1": [1] * 9, "4": [1, 4, 4]}


def _lmms_eval(args: list[str], env: dict, prefix: list[str] | None = None, timeout: int = 240):
    cmd = [*(prefix or [sys.executable, "-m", "lmms_eval"]), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)


def _results(out: Path) -> dict:
    (path,) = out.rglob("*_results.json")
    return json.loads(path.read_text())["results"]["attnkit_pope"]


def test_the_readme_command_line_runs_a_two_parameter_spec(task_dir, tmp_path, env):
    args = ["--model", "attnkit", "--model_args",
            f'pretrained={DEMO / "model"},interventions="{SPEC}",output_dir={tmp_path / "store"}',
            "--tasks", "attnkit_pope", "--include_path", str(task_dir), "--output_path", str(tmp_path / "out"),
            "--batch_size", "2", "--max_batch_size", "8"]
    done = _lmms_eval(args, env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Error during evaluation" not in done.stderr, done.stderr[-3000:]
    assert "ignored" not in done.stderr
    assert 0.0 <= _results(tmp_path / "out")["pope_accuracy,none"] <= 1.0
    (store,) = (tmp_path / "store").glob("attnkit_pope__*.jsonl")
    assert len(store.read_text().splitlines()) == 6


def test_two_cpu_processes_each_take_their_shard(task_dir, tmp_path, env):
    args = ["--model", "attnkit", "--model_args",
            f'pretrained={DEMO / "model"},interventions="{SPEC}",output_dir={tmp_path / "store"}',
            "--tasks", "attnkit_pope", "--include_path", str(task_dir), "--output_path", str(tmp_path / "out")]
    prefix = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
              "-m", "lmms_eval"]
    done = _lmms_eval(args, env, prefix=prefix, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Error during evaluation" not in done.stderr, done.stderr[-3000:]
    stores = sorted((tmp_path / "store").glob("attnkit_pope__*.jsonl"))
    assert [p.name.split(".")[-2] for p in stores] == ["rank0", "rank1"]
    assert [len(p.read_text().splitlines()) for p in stores] == [3, 3]
    assert "pope_accuracy,none" in _results(tmp_path / "out")
