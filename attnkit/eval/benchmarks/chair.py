"""CHAIR (Rohrbach et al., "Object Hallucination in Image Captioning", EMNLP 2018) on COCO.

Reads COCO instance annotations (``instances_val2014.json`` style: ``images`` with ``id``/``file_name``,
``annotations`` with ``image_id``/``category_id``, ``categories`` with ``id``/``name``), found as the option
``annotations`` or the one ``instances_*.json`` / ``*_instances.json`` in ``data_dir`` or ``data_dir/annotations``.
As in the original code, objects named in the reference captions (the same name with "captions" for "instances",
e.g. ``captions_val2014.json``; option ``gt_captions``) are added to an image's ground truth when that file is
present. Synonyms: option ``synonyms``, else the one ``*synonyms.txt`` in ``data_dir``, else the shipped COCO list.
Images to caption: the option ``image_list`` (a file with one COCO image id or file name per line; a relative path
is tried in ``data_dir`` too), else every annotated image; ``n`` draws that many with ``seed`` (sorted by id
afterwards). Image files: ``image_dir``, ``<data_dir>/val2014/``, ``<data_dir>/images/`` or ``data_dir``.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from attnkit.eval.benchmarks.base import (
    Benchmark,
    BenchmarkFormatError,
    Sample,
    find_image_dir,
    json_field,
    read_json,
)
from attnkit.eval.metrics import CaptionObjectExtractor, chair_metrics, load_synonyms

DEFAULT_PROMPT = "Please describe this image in detail."


def _field(items: list, index: int, key: str, kind: type, path: Path, section: str) -> Any:
    return json_field(items[index], key, kind, path, f"{section}[{index}]")


def _section(data: Any, key: str, path: Path) -> list:
    if not isinstance(data, dict):
        raise BenchmarkFormatError(path, "expected a COCO annotation object with images/annotations/categories")
    if key not in data:
        raise BenchmarkFormatError(path, "is missing", field=key)
    if not isinstance(data[key], list):
        raise BenchmarkFormatError(path, f"must be a list, got {type(data[key]).__name__}", field=key)
    return data[key]


class ChairBenchmark(Benchmark):
    """Captioning hallucination: chair_s, chair_i (lower is better), recall, avg_len.

    Options: ``annotations``, ``gt_captions`` ("auto", a path, or None to use instances only), ``synonyms`` ("auto",
    a path, or None for the shipped COCO list), ``image_list``, ``image_dir``, ``n``, ``seed``, ``prompt``,
    ``max_new_tokens``.
    """

    name: ClassVar[str] = "chair"
    max_new_tokens: ClassVar[int] = 512  # OPERA / VCD-style long captions
    primary_metric: ClassVar[str] = "chair_i"
    higher_is_better: ClassVar[dict[str, bool]] = {"chair_s": False, "chair_i": False, "recall": True,
                                                    "n_hallucinated": False}
    default_options: ClassVar[dict] = {"annotations": None, "gt_captions": "auto", "synonyms": "auto",
                                       "image_list": None, "image_dir": None, "n": None, "seed": 0,
                                       "prompt": DEFAULT_PROMPT, "max_new_tokens": None}

    def __init__(self, data_dir, splits=None, limit=None, **options):
        super().__init__(data_dir, splits, limit, **options)
        self._extractor: CaptionObjectExtractor | None = None

    @property
    def extractor(self) -> CaptionObjectExtractor:
        if self._extractor is None:
            synonyms = self.options["synonyms"]
            if synonyms == "auto":
                found = sorted(self.data_dir.glob("*synonyms.txt"))
                synonyms = found[0] if len(found) == 1 else None
            self._extractor = CaptionObjectExtractor(load_synonyms(synonyms) if synonyms else None)
        return self._extractor

    def annotation_file(self) -> Path:
        if self.options["annotations"] is not None:
            return Path(self.options["annotations"])
        found = sorted(p for d in (self.data_dir, self.data_dir / "annotations") if d.is_dir()
                       for p in (*d.glob("instances_*.json"), *d.glob("*_instances.json")))
        preferred = [p for p in found if p.name == "instances_val2014.json"]
        if len(found) == 1 or preferred:
            return (preferred or found)[0]
        if not found:
            raise FileNotFoundError(f"no COCO instance annotations (instances_*.json) in {self.data_dir} or "
                                    f"{self.data_dir / 'annotations'}; pass annotations=<path>")
        raise ValueError(f"several annotation files {[p.name for p in found]}; pass annotations=<path>")

    def _load(self) -> dict[str, list[Sample]]:
        self._select_splits(["caption"])
        path = self.annotation_file()
        images, objects = self._read_instances(path)
        captions = self._captions_file(path)
        if captions is not None:
            self._add_caption_objects(captions, objects)
        chosen = self._chosen_ids(images)
        image_dir = find_image_dir(self.data_dir, self.options["image_dir"], ("val2014", "images"))
        return {"caption": [Sample(id=f"caption/{i}", image=image_dir / images[i], question=self.options["prompt"],
                                   answer=i, split="caption",
                                   meta={"file_name": images[i], "gt_objects": sorted(objects.get(i, ()))})
                            for i in chosen]}

    def _read_instances(self, path: Path) -> tuple[dict[int, str], dict[int, set[str]]]:
        data = read_json(path)
        images_raw, anns, cats = (_section(data, k, path) for k in ("images", "annotations", "categories"))
        names = {_field(cats, k, "id", int, path, "categories"): _field(cats, k, "name", str, path, "categories")
                 for k in range(len(cats))}
        images = {_field(images_raw, k, "id", int, path, "images"): _field(images_raw, k, "file_name", str, path,
                                                                          "images")
                  for k in range(len(images_raw))}
        objects: dict[int, set[str]] = {}
        for k in range(len(anns)):
            image_id = _field(anns, k, "image_id", int, path, "annotations")
            cat = _field(anns, k, "category_id", int, path, "annotations")
            if cat not in names:
                raise BenchmarkFormatError(path, f"{cat} is not a category id", field=f"annotations[{k}].category_id")
            objects.setdefault(image_id, set()).add(self.extractor.category(names[cat]))
        return images, objects

    def _captions_file(self, instances: Path) -> Path | None:
        option = self.options["gt_captions"]
        if option is None or option is False:
            return None
        if option != "auto":
            return Path(option)
        candidate = instances.with_name(instances.name.replace("instances", "captions", 1))
        return candidate if candidate.is_file() else None

    def _add_caption_objects(self, path: Path, objects: dict[int, set[str]]) -> None:
        anns = _section(read_json(path), "annotations", path)
        for k in range(len(anns)):
            image_id = _field(anns, k, "image_id", int, path, "annotations")
            caption = _field(anns, k, "caption", str, path, "annotations")
            objects.setdefault(image_id, set()).update(self.extractor(caption).categories)

    def _chosen_ids(self, images: dict[int, str]) -> list[int]:
        list_path = self.options["image_list"]
        if list_path is not None:
            list_path = Path(list_path) if Path(list_path).is_file() else self.data_dir / list_path
        ids = self._read_image_list(list_path, images) if list_path is not None else sorted(images)
        n = self.options["n"]
        if n is not None and n < len(ids):
            ids = sorted(random.Random(self.options["seed"]).sample(ids, int(n)))
        return ids

    @staticmethod
    def _read_image_list(path: Path, images: dict[int, str]) -> list[int]:
        by_name = {name: i for i, name in images.items()}
        ids: list[int] = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                entry = line.split("#", 1)[0].strip()
                if not entry:
                    continue
                image_id = int(entry) if entry.isdigit() else by_name.get(Path(entry).name)
                if image_id not in images:
                    raise BenchmarkFormatError(path, f"{entry!r} is not an image of the annotation file",
                                               line=lineno, field="image")
                if image_id in ids:
                    raise BenchmarkFormatError(path, f"{entry!r} is listed twice", line=lineno, field="image")
                ids.append(image_id)
        return ids

    def score(self, samples: Sequence[Sample], predictions: Mapping[str, str]) -> dict[str, float]:
        present, n_missing = self._present(samples, predictions)
        captions = [predictions[s.id] for s in present]
        mentions = [[m.category for m in self.extractor(c).mentions] for c in captions]
        out = chair_metrics(mentions, [s.meta["gt_objects"] for s in present], [len(c.split()) for c in captions])
        out["n_missing"] = n_missing
        return out
