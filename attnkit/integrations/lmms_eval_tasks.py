"""Local lmms-eval tasks from attnkit's benchmark folders, so lmms-eval runs offline on your own files.

``write_pope_task(data_dir, out_dir)`` reads POPE question files in the published format (as ``attnkit eval``
does), writes their rows with the images embedded to ``{out_dir}/{task}.parquet`` (lmms-eval's POPE columns:
``question_id``, ``question``, ``answer``, ``image``, ``category`` = the split) and a task YAML that ``include``s
lmms-eval's own ``tasks/pope/pope.yaml``, so the prompt, generation settings and the five POPE metrics are
upstream's; only ``task``, ``dataset_path`` and ``dataset_kwargs`` are replaced. Then::

    lmms-eval --model attnkit --include_path OUT_DIR --tasks attnkit_pope --model_args pretrained=...

Needs ``datasets`` (installed with the ``lmms`` extra) and lmms-eval (only to find its ``pope.yaml``).
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path

DEFAULT_TASK = "attnkit_pope"


def upstream_yaml(task_dir: str = "pope", name: str = "pope.yaml") -> Path:
    """The path of one of lmms-eval's task YAMLs (lmms-eval is found, not imported)."""
    spec = importlib.util.find_spec("lmms_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("lmms-eval is not installed; pip install -e \".[lmms]\" && pip install --no-deps "
                          "lmms-eval==0.7.3")
    path = Path(next(iter(spec.submodule_search_locations))) / "tasks" / task_dir / name
    if not path.is_file():
        raise FileNotFoundError(f"lmms-eval has no {task_dir}/{name} ({path}); attnkit's tasks need lmms-eval 0.7.3")
    return path


def write_pope_task(data_dir: str | Path, out_dir: str | Path, task: str = DEFAULT_TASK, limit: int | None = None,
                    splits: Sequence[str] | None = None, post_prompt: str | None = None) -> Path:
    """Write ``{task}.parquet`` and ``{task}.yaml`` for the POPE files in ``data_dir``; returns the YAML path.

    ``limit``: first N questions of each split; ``post_prompt``: replaces upstream's "\\nAnswer the question
    using a single word or phrase." (e.g. "" for a model trained on bare questions).
    """
    import datasets

    from attnkit.eval.benchmarks import get_benchmark

    if not task.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"task name {task!r}: use letters, digits, '_' or '-'")
    include = upstream_yaml()
    samples = get_benchmark("pope", data_dir, splits=splits, limit=limit, prompt_suffix="").samples()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    columns: dict[str, list] = {"question_id": [], "question": [], "answer": [], "image": [], "category": []}
    for s in samples:
        if s.image is None or not Path(s.image).is_file():
            raise FileNotFoundError(f"{s.meta.get('file')}:{s.meta.get('line')}: image {s.image} does not exist")
        columns["question_id"].append(s.id)
        columns["question"].append(s.meta["text"])
        columns["answer"].append(s.answer)
        columns["image"].append({"bytes": Path(s.image).read_bytes(), "path": Path(s.image).name})
        columns["category"].append(s.split)
    features = datasets.Features({"question_id": datasets.Value("string"), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string"), "image": datasets.Image(),
                                  "category": datasets.Value("string")})
    parquet = (out_dir / f"{task}.parquet").resolve()
    datasets.Dataset.from_dict(columns, features=features).to_parquet(str(parquet))
    lines = [f"# written by attnkit.integrations.lmms_eval_tasks from {Path(data_dir).resolve()}",
             f"include: {json.dumps(str(include))}",
             f"task: {json.dumps(task)}",
             "dataset_path: parquet",
             f"dataset_kwargs: {{data_files: {{test: {json.dumps(str(parquet))}}}}}",
             "test_split: test"]
    if post_prompt is not None:
        lines += ["lmms_eval_specific_kwargs:", "  default:", '    pre_prompt: ""',
                  f"    post_prompt: {json.dumps(post_prompt)}"]
    path = out_dir / f"{task}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path
