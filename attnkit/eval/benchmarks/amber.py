"""AMBER (Wang et al., "An LLM-free Multi-dimensional Benchmark for MLLMs Hallucination Evaluation", 2023).

Files read (the official repository's layout; ``data/`` may also be ``data_dir`` itself, and the query folder
``data/query/`` or ``query/``):

- ``query_generative.json``: ``[{"id": 1, "image": "AMBER_1.jpg", "query": "Describe this image."}, ...]``
- ``query_discriminative.json`` (or, when absent, the ``query_discriminative-*.json`` dimension files):
  ``{"id", "image", "query"}`` yes/no questions
- ``annotations.json``: per id ``type`` ("generative" or "discriminative-hallucination|attribute-*|relation"),
  ``truth`` (object list, or "yes"/"no") and, for generative, ``hallu`` (hallucination-prone objects)
- ``relation.json``: object -> associated words (the scoring vocabulary); ``safe_words.txt``: one word per line.

Images: ``image_dir``, else ``<data_dir>/images/``, ``<data_dir>/image/`` or ``data_dir``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from attnkit.eval.benchmarks.base import (
    DEFAULT_YES_NO_SUFFIX,
    Benchmark,
    BenchmarkFormatError,
    Sample,
    find_image_dir,
    json_field,
    read_json,
)
from attnkit.eval.metrics import (
    AmberNounExtractor,
    amber_discriminative,
    amber_generative,
    amber_vocabulary,
    parse_yes_no,
)

_DIMENSIONS = {"discriminative-hallucination": "existence", "discriminative-attribute-state": "attribute",
               "discriminative-attribute-number": "attribute", "discriminative-attribute-action": "attribute",
               "discriminative-relation": "relation"}
_SPLITS = ("generative", "discriminative")


def _get(item: Any, index: int, key: str, kind: type | tuple[type, ...], path: Path) -> Any:
    return json_field(item, key, kind, path, f"[{index}]")


def _str_list(value: Any, index: int, key: str, path: Path) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BenchmarkFormatError(path, f"must be a list of words, got {value!r}", field=f"[{index}].{key}")
    return value


class AmberBenchmark(Benchmark):
    """AMBER generative (chair, cover, hal, cog) and discriminative (accuracy/precision/recall/F1, "no" positive)
    splits; ``amber_score`` = ((1 - chair) + discriminative F1) / 2 (the paper's AMBER Score) when both are run.

    Options: ``image_dir``; ``prompt_suffix`` for the yes/no questions (default: LLaVA's short-answer instruction);
    ``max_new_tokens`` (captions) and ``yes_no_max_new_tokens`` (questions).
    """

    name: ClassVar[str] = "amber"
    max_new_tokens: ClassVar[int] = 512
    primary_metric: ClassVar[str] = "amber_score"
    higher_is_better: ClassVar[dict[str, bool]] = {"amber_score": True, "chair": False, "cover": True, "hal": False,
                                                    "cog": False, "accuracy": True, "precision": True, "recall": True,
                                                    "f1": True, "n_unparsed": False}
    default_options: ClassVar[dict] = {"image_dir": None, "prompt_suffix": DEFAULT_YES_NO_SUFFIX,
                                       "max_new_tokens": None, "yes_no_max_new_tokens": 16}

    @property
    def data_files(self) -> Path:
        return self.data_dir / "data" if (self.data_dir / "data").is_dir() else self.data_dir

    def _query_dir(self) -> Path:
        for d in (self.data_files / "query", self.data_dir / "query", self.data_files):
            if d.is_dir() and any(d.glob("query_*.json")):
                return d
        raise FileNotFoundError(f"no AMBER query files (query_generative.json, query_discriminative.json) in "
                                f"{self.data_files / 'query'} or {self.data_dir / 'query'}")

    def _query_files(self) -> dict[str, list[Path]]:
        qdir = self._query_dir()
        files = {"generative": [qdir / "query_generative.json"]} if (qdir / "query_generative.json").is_file() else {}
        if (qdir / "query_discriminative.json").is_file():
            files["discriminative"] = [qdir / "query_discriminative.json"]
        elif parts := sorted(qdir.glob("query_discriminative-*.json")):
            files["discriminative"] = parts
        return files

    def _load(self) -> dict[str, list[Sample]]:
        files = self._query_files()
        splits = self._select_splits([s for s in _SPLITS if s in files])
        annotations = self._annotations()
        image_dir = find_image_dir(self.data_dir, self.options["image_dir"], ("images", "image"))
        return {split: [s for path in files[split] for s in self._read_queries(path, split, annotations, image_dir)]
                for split in splits}

    def _annotations(self) -> dict[int, tuple[dict, int, Path]]:
        path = self.data_files / "annotations.json"
        data = read_json(path)
        if not isinstance(data, list):
            raise BenchmarkFormatError(path, "expected a JSON list of annotations")
        out = {}
        for k, item in enumerate(data):
            out[_get(item, k, "id", int, path)] = (item, k, path)
        return out

    def _read_queries(self, path: Path, split: str, annotations: Mapping[int, tuple[dict, int, Path]],
                      image_dir: Path) -> list[Sample]:
        rows = read_json(path)
        if not isinstance(rows, list):
            raise BenchmarkFormatError(path, "expected a JSON list of queries")
        samples = []
        for k, row in enumerate(rows):
            qid, image, query = (_get(row, k, key, kind, path) for key, kind in
                                 (("id", int), ("image", str), ("query", str)))
            if qid not in annotations:
                raise BenchmarkFormatError(path, f"{qid} has no entry in annotations.json", field=f"[{k}].id")
            ann, index, ann_path = annotations[qid]
            kind = _get(ann, index, "type", str, ann_path)
            if split == "generative":
                if kind != "generative":
                    raise BenchmarkFormatError(ann_path, f"must be 'generative' for a generative query, got {kind!r}",
                                               field=f"[{index}].type")
                truth = _str_list(_get(ann, index, "truth", list, ann_path), index, "truth", ann_path)
                hallu = _str_list(_get(ann, index, "hallu", list, ann_path), index, "hallu", ann_path)
                samples.append(Sample(id=f"generative/{qid}", image=image_dir / image, question=query, answer=truth,
                                      split=split, meta={"amber_id": qid, "hallu": hallu}))
            else:
                if kind not in _DIMENSIONS:
                    raise BenchmarkFormatError(ann_path, f"must be one of {sorted(_DIMENSIONS)}, got {kind!r}",
                                               field=f"[{index}].type")
                truth = _get(ann, index, "truth", str, ann_path).strip().lower()
                if truth not in ("yes", "no"):
                    raise BenchmarkFormatError(ann_path, f"must be 'yes' or 'no', got {truth!r}",
                                               field=f"[{index}].truth")
                samples.append(Sample(id=f"discriminative/{qid}", image=image_dir / image,
                                      question=query + self.options["prompt_suffix"], answer=truth, split=split,
                                      meta={"amber_id": qid, "type": kind, "dimension": _DIMENSIONS[kind],
                                            "max_new_tokens": int(self.options["yes_no_max_new_tokens"])}))
        return samples

    def _vocabulary(self) -> tuple[dict[str, list[str]], set[str]]:
        path = self.data_files / "relation.json"
        association = read_json(path)
        if not isinstance(association, dict):
            raise BenchmarkFormatError(path, "expected an object: word -> list of associated words")
        for word, values in association.items():
            if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
                raise BenchmarkFormatError(path, f"must be a list of words, got {values!r}", field=word)
        safe_path = self.data_files / "safe_words.txt"
        safe = set()
        if safe_path.is_file():
            safe = {w.strip() for w in safe_path.read_text(encoding="utf-8").splitlines() if w.strip()}
        return association, safe

    def score(self, samples: Sequence[Sample], predictions: Mapping[str, str]) -> dict[str, float]:
        present, n_missing = self._present(samples, predictions)
        out: dict[str, float] = {}
        generative = [s for s in present if s.split == "generative"]
        if generative:
            association, safe = self._vocabulary()
            extract = AmberNounExtractor(amber_vocabulary(association))
            m = amber_generative([extract(predictions[s.id]) for s in generative], [s.answer for s in generative],
                                 [s.meta["hallu"] for s in generative], association, safe)
            out.update({f"generative/{k}": v for k, v in m.items()})
        questions = [s for s in present if s.split == "discriminative"]
        if questions:
            parsed = {s.id: parse_yes_no(predictions[s.id]) for s in questions}
            m = amber_discriminative([s.answer for s in questions], [parsed[s.id] for s in questions])
            out.update({f"discriminative/{k}": v for k, v in m.items()})
            for dim in ("existence", "attribute", "relation"):
                part = [s for s in questions if s.meta["dimension"] == dim]
                if part:
                    m = amber_discriminative([s.answer for s in part], [parsed[s.id] for s in part])
                    out.update({f"discriminative/{dim}/{k}": v for k, v in m.items()})
        if generative and questions:
            out["amber_score"] = ((1 - out["generative/chair"]) + out["discriminative/f1"]) / 2
        out["n"], out["n_missing"] = len(present), n_missing
        return out
