"""The GPU run book (benchmarks/gpu.sh) end to end on the CPU with --dry-run, its step/budget logic, and the 7B
architectures it builds (on the meta device: no weights materialised)."""

from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_models

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu.sh"
SPECS_PER_BUDGET = 7   # the seven-method comparison of benchmarks.pruning.equal_budget_specs


def run_book(*args: str, env: dict | None = None, timeout: float = 400) -> tuple[subprocess.CompletedProcess, float]:
    """Runs gpu.sh; returns its result and its wall seconds."""
    done, wall, _ = run_book_timed(*args, env=env, timeout=timeout)
    return done, wall


def run_book_timed(*args: str, env: dict | None = None, timeout: float = 400):
    """Runs gpu.sh; returns its result, its wall seconds and the CPU seconds (user + system) of it and every process
    it started (on a machine shared with other jobs the CPU time is what the script itself costs)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, **(env or {})}
    env.pop("OUT", None)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    done = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=timeout)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return done, time.monotonic() - t0, cpu


def sections(text: str) -> dict[str, str]:
    """'## heading' -> its text up to the next '## ' heading."""
    parts = re.split(r"^## (.+)$", text, flags=re.M)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts), 2)}


def table_rows(text: str, first_cell: str) -> list[list[str]]:
    """The cells of the table lines whose first cell starts with ``first_cell``."""
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith(f"| {first_cell}")]


def data_rows(text: str) -> list[list[str]]:
    """The rows of the one markdown table in ``text``, without its header and rule."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith("|") and not line.startswith("|---")]
    return rows[1:]


def test_dry_run_end_to_end_writes_every_section(tmp_path):
    out = tmp_path / "gpu_results.md"
    done, wall, cpu = run_book_timed("--dry-run", "--out", str(out))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # the run book promises < 2 minutes: its processes run one after the other on one thread each, so their CPU
    # time is its wall time on an idle machine (the wall time here also holds other jobs' load)
    assert cpu < 120, f"the dry run cost {cpu:.0f} s of CPU time ({wall:.0f} s wall)"
    assert f"results: {out}" in done.stdout
    text = out.read_text()
    assert "FAILED" not in text and "SKIPPED" not in text and "CUT" not in text, text
    head, secs = text.split("\n## ")[0], sections(text)
    for field in ("- GPU: **", "DRY RUN", "- date: ", "- torch: ", "- transformers: ", "- flash_attn: "):
        assert field in head, field
    budgets = {"llava": ["21", "14", "7"], "llava_next": ["16"], "qwen2_5_vl": ["21", "14", "7"]}
    for family, keeps in budgets.items():
        title = f"{family}: toy dims of {gpu_models.CHECKPOINTS[family]}"
        body = next(v for k, v in secs.items() if k.startswith(title))
        parts = dict(zip(re.findall(r"^### (.+)$", body, flags=re.M), re.split(r"^### .+$", body, flags=re.M)[1:]))
        assert list(parts) == ["No-op wrapping overhead (sdpa)", "Pruners at equal budgets (sdpa)",
                               "Pruners at equal budgets (eager)", "Pruners at equal budgets (flash_attention_2)",
                               "var / vhr / pai decode overhead (sdpa)"]
        (overhead,) = data_rows(parts["No-op wrapping overhead (sdpa)"])
        assert float(overhead[-1]) > 0
        rows = data_rows(parts["Pruners at equal budgets (sdpa)"])
        assert [r[0] for r in rows][0] == "baseline" and len(rows) == 1 + SPECS_PER_BUDGET * len(keeps)
        for name in ("cls-prune", "fastv", "visionzip", "dart", "pyramiddrop", "sparsevlm"):
            assert sum(r[0].startswith(name + ":") for r in rows) == len(keeps) * (2 if name == "cls-prune" else 1)
        assert [r[0] for r in rows if r[0].startswith("cls-prune:") and "random" not in r[0]] == \
            [f"cls-prune:keep={k}" for k in keeps]
        for r in rows:
            assert r[6] == "n/a"                             # peak memory: CUDA only
            assert float(r[9]) > 0 and float(r[7]) > 0       # achieved / ideal, speed-up
        eager = data_rows(parts["Pruners at equal budgets (eager)"])
        assert len(eager) == 1 + SPECS_PER_BUDGET     # the first budget only in a dry run
        assert "skipped: no CUDA device" in parts["Pruners at equal budgets (flash_attention_2)"]
        decode = data_rows(parts["var / vhr / pai decode overhead (sdpa)"])
        assert [r[0].split(":")[0].strip("`") for r in decode] == ["var", "vhr", "pai"]
    assert "flash-attention-2: flash_attn does not import; dry run" in text
    throughput = secs["Eval throughput: llava"]
    if (ROOT / "benchmarks" / "eval_throughput.py").exists():
        assert "`python -m benchmarks.eval_throughput --family llava --dry-run --no-lmms`" in throughput
        assert "| runner | 1 |" in throughput   # its table, in the results file
    else:
        assert "skipped: benchmarks.eval_throughput not available" in throughput
    steps = data_rows(next(v for k, v in secs.items() if k.startswith("Steps (")))
    assert [r[0] for r in steps] == ["flash-attn", "measure", "throughput:llava"]
    assert [r[1] for r in steps][:2] == ["skipped", "ok"]


def _stub(tmp_path: Path, body: str) -> dict:
    """A stand-in for benchmarks.eval_throughput (the batch helper's module) that prints its arguments."""
    (tmp_path / "stub_tput.py").write_text("import sys, time\nprint('| argv | ' + ' '.join(sys.argv[1:]) + ' |')\n"
                                           + body)
    return {"PYTHONPATH": str(tmp_path)}


def test_throughput_step_calls_the_interface_and_goes_on_after_a_failure(tmp_path):
    env = _stub(tmp_path, "sys.exit(4 if sys.argv[sys.argv.index('--family') + 1] == 'llava_next' else 0)\n")
    out = tmp_path / "r.md"
    done, _ = run_book("--steps", "throughput", "--throughput-module", "stub_tput", "--out", str(out), env=env)
    assert done.returncode == 1   # one step failed
    text = out.read_text()
    for family, dtype in (("llava", "float16"), ("llava_next", "float16"), ("qwen2_5_vl", "bfloat16")):
        assert f"| argv | --family {family} --size 7b --batches 1 8 32 --device cuda --dtype {dtype} |" in text
    steps = {r[0]: r[1] for r in table_rows(text, "throughput:")}
    assert steps == {"throughput:llava": "ok", "throughput:llava_next": "FAILED", "throughput:qwen2_5_vl": "ok"}

    done, _ = run_book("--dry-run", "--steps", "throughput", "--throughput-module", "stub_tput", "--out", str(out),
                       env=_stub(tmp_path, ""))
    assert done.returncode == 0
    assert re.findall(r"^\| argv \| (.*) \|$", out.read_text(), flags=re.M) == ["--family llava --dry-run --no-lmms"]


def test_missing_throughput_module_is_a_noted_skip(tmp_path):
    out = tmp_path / "r.md"
    done, _ = run_book("--steps", "throughput", "--throughput-module", "benchmarks.no_such_module", "--out", str(out))
    assert done.returncode == 0
    text = out.read_text()
    assert text.count("skipped: benchmarks.no_such_module not available: eval throughput skipped") == 3


def test_budget_skips_and_cuts_steps_with_a_note(tmp_path):
    out = tmp_path / "r.md"
    env = _stub(tmp_path, "time.sleep(60)\n")
    done, seconds = run_book("--dry-run", "--steps", "throughput", "--throughput-module", "stub_tput",
                             "--budget-s", "16", "--families", "llava qwen2_5_vl", "--out", str(out), env=env)
    assert done.returncode == 1 and seconds < 40
    text = out.read_text()
    cut_at = re.search(r"\*\*CUT\*\* at the step's (\d+)-s limit\.", text)   # the dry run calls the first family only
    assert cut_at and 1 <= int(cut_at.group(1)) <= 16      # what is left of the 16-s budget when the step starts
    (cut,) = table_rows(text, "throughput:llava")
    assert cut[1] == "CUT"

    done, _ = run_book("--steps", "throughput", "--throughput-module", "stub_tput", "--budget-s", "10",
                       "--out", str(out), env=env)
    assert done.returncode == 1
    text = out.read_text()
    assert text.count("**SKIPPED**: the 10-s budget ran out") == 3 and "| argv |" not in text


def test_bad_options_are_named(tmp_path):
    for args, message in ((["--budget-s", "soon"], "--budget-s 'soon' is not a whole number"),
                          (["--families", "llava gemma3"], "unknown family 'gemma3' (allowed: llava llava_next"),
                          (["--steps", "warmup"], "unknown step 'warmup' (allowed: flash-attn measure throughput)"),
                          (["--fast"], "unknown option '--fast'")):
        done, _ = run_book(*args, "--out", str(tmp_path / "r.md"))
        assert done.returncode == 2 and message in done.stderr


def test_without_a_gpu_the_real_run_stops_at_once(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    out = tmp_path / "r.md"
    done, _ = run_book("--steps", "measure", "--out", str(out))
    assert done.returncode == 1
    assert "no CUDA device" in done.stdout and "- GPU: **no GPU" in out.read_text()


# -- the architectures ------------------------------------------------------------------------------------------------
# parameter counts on the checkpoints' model cards (llava-hf: 7.06B; Qwen2-VL-7B and Qwen2.5-VL-7B: 8.29B)
CARD_PARAMS = {"llava": 7.06e9, "llava_next": 7.06e9, "qwen2_vl": 8.29e9, "qwen2_5_vl": 8.29e9}


@pytest.mark.parametrize("family", gpu_models.FAMILIES)
def test_7b_configs_match_the_published_models(family):
    model = gpu_models.build(family, device="meta")   # parameters created on the target device, never on the CPU
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert {p.dtype for p in model.parameters()} == {gpu_models.DTYPES[family]}
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - CARD_PARAMS[family]) / CARD_PARAMS[family] < 0.005, n
    inputs = gpu_models.inputs(family)
    visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
    # FasterVLM's counts: 576 for LLaVA-1.5 (336 px / 14), 2880 for LLaVA-NeXT (+ 48 newline tokens); Qwen 672 px
    assert (gpu_models.content_tokens(family), visual) == {"llava_next": (2880, 2928)}.get(family, (576, 576))


def test_a_failing_part_is_reported_and_the_next_parts_run_on_a_clean_model(tmp_path, monkeypatch):
    import attnkit
    from benchmarks import gpu_run

    def broken(model, *args):   # fails while the model is wrapped, as a pruner raising mid-generate would
        attnkit.wrap(model, "cls-prune:keep=8")
        raise RuntimeError("boom")

    monkeypatch.setattr(gpu_run, "_pruning_part", broken)
    out = tmp_path / "r.md"
    assert gpu_run.family_step("llava", out, time.time() + 600, ["sdpa"], dry_run=True) == 1
    parts = re.split(r"^### (.+)$", out.read_text(), flags=re.M)
    body = dict(zip(parts[1::2], parts[2::2]))
    assert "**FAILED** after" in body["Pruners at equal budgets (sdpa)"]
    assert "RuntimeError: boom" in body["Pruners at equal budgets (sdpa)"]
    decode = data_rows(body["var / vhr / pai decode overhead (sdpa)"])
    assert [r[0].split(":")[0].strip("`") for r in decode] == ["var", "vhr", "pai"]
