"""POPE (Li et al., "Evaluating Object Hallucination in Large Vision-Language Models", EMNLP 2023).

Reads the published question files ``<dataset>_pope_<split>.json`` (JSON lines despite the extension, also
``.jsonl``): ``{"question_id": 1, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a snowboard in the
image?", "label": "yes"}``. Any ``*_pope_<split>.json[l]`` in ``data_dir`` is a split ("random", "popular",
"adversarial" first). Images come from ``image_dir``, else ``<data_dir>/images/``, ``<data_dir>/val2014/`` or
``data_dir`` itself. Scoring: ``parse_yes_no`` + ``pope_metrics`` per split and pooled over the splits.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import ClassVar

from attnkit.eval.benchmarks.base import (
    DEFAULT_YES_NO_SUFFIX,
    Benchmark,
    BenchmarkFormatError,
    Sample,
    find_image_dir,
    read_json_lines,
    require,
)
from attnkit.eval.metrics import parse_yes_no, pope_metrics

_SPLIT_ORDER = ("random", "popular", "adversarial")
_FILE = re.compile(r"^(?P<dataset>.+)_pope_(?P<split>[A-Za-z0-9-]+)\.jsonl?$")


class PopeBenchmark(Benchmark):
    """POPE yes/no object-existence questions; metrics per split (``random/f1``) and pooled (``f1``).

    Options: ``image_dir``; ``dataset`` (the file prefix, e.g. "coco", when several datasets share a folder);
    ``prompt_suffix`` appended to each question (LLaVA-1.5's short-answer instruction by default; "" for none);
    ``unparsed_as`` ("yes" as the official script, or "no"); ``max_new_tokens``.
    """

    name: ClassVar[str] = "pope"
    max_new_tokens: ClassVar[int] = 16
    primary_metric: ClassVar[str] = "f1"
    higher_is_better: ClassVar[dict[str, bool]] = {"accuracy": True, "precision": True, "recall": True, "f1": True,
                                                    "n_unparsed": False}
    default_options: ClassVar[dict] = {"image_dir": None, "dataset": None, "prompt_suffix": DEFAULT_YES_NO_SUFFIX,
                                       "unparsed_as": "yes", "max_new_tokens": None}

    def split_files(self) -> dict[str, Path]:
        """Split name -> question file found in ``data_dir``."""
        found: dict[str, Path] = {}
        for path in sorted(self.data_dir.iterdir()):
            m = _FILE.match(path.name)
            if not m or not path.is_file():
                continue
            if self.options["dataset"] is not None and m["dataset"] != self.options["dataset"]:
                continue
            split = m["split"]
            if split in found:
                raise BenchmarkFormatError(path, f"split '{split}' is also in {found[split].name}; pick one "
                                                 "dataset with the option dataset=<file prefix>")
            found[split] = path
        order = {s: i for i, s in enumerate(_SPLIT_ORDER)}
        return dict(sorted(found.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))

    def _load(self) -> dict[str, list[Sample]]:
        files = self.split_files()
        if not files:
            raise FileNotFoundError(f"no POPE question file (*_pope_<split>.json or .jsonl) in {self.data_dir}")
        image_dir = find_image_dir(self.data_dir, self.options["image_dir"])
        return {split: self._read(files[split], split, image_dir) for split in self._select_splits(list(files))}

    def _read(self, path: Path, split: str, image_dir: Path) -> list[Sample]:
        samples, seen = [], {}
        for line, row in read_json_lines(path):
            qid = require(row, "question_id", (int, str), path, line)
            image = require(row, "image", str, path, line)
            text = require(row, "text", str, path, line)
            label = require(row, "label", str, path, line)
            if label.strip().lower() not in ("yes", "no"):
                raise BenchmarkFormatError(path, f"must be 'yes' or 'no', got {label!r}", line=line, field="label")
            if str(qid) in seen:
                raise BenchmarkFormatError(path, f"duplicates question_id {qid!r} of line {seen[str(qid)]}",
                                           line=line, field="question_id")
            seen[str(qid)] = line
            samples.append(Sample(id=f"{split}/{qid}", image=image_dir / image,
                                  question=text + self.options["prompt_suffix"], answer=label.strip().lower(),
                                  split=split, meta={"question_id": qid, "text": text, "file": path.name,
                                                     "line": line}))
        if not samples:
            raise BenchmarkFormatError(path, "has no questions; a POPE file holds one JSON object per line: "
                                             '{"question_id": 1, "image": "...jpg", "text": "Is there a ...?", '
                                             '"label": "yes"}')
        return samples

    def score(self, samples: Sequence[Sample], predictions: Mapping[str, str]) -> dict[str, float]:
        present, n_missing = self._present(samples, predictions)
        out: dict[str, float] = {}
        by_split: dict[str, list[Sample]] = {}
        for s in present:
            by_split.setdefault(s.split, []).append(s)
        parsed = {s.id: parse_yes_no(predictions[s.id]) for s in present}
        for split, items in by_split.items():
            m = pope_metrics([s.answer for s in items], [parsed[s.id] for s in items], self.options["unparsed_as"])
            out.update({f"{split}/{k}": v for k, v in m.items() if k in _REPORTED})
        overall = pope_metrics([s.answer for s in present], [parsed[s.id] for s in present],
                               self.options["unparsed_as"])
        out.update({k: v for k, v in overall.items() if k in _REPORTED})
        out["n_missing"] = n_missing
        return out


_REPORTED = ("accuracy", "precision", "recall", "f1", "yes_ratio", "n", "n_unparsed")
