"""The benchmark interface: a loader of local files in a published format plus the benchmark's own scoring."""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

DEFAULT_YES_NO_SUFFIX = "\nAnswer the question using a single word or phrase."  # LLaVA-1.5 / lmms-eval post_prompt


@dataclass(frozen=True)
class Sample:
    """One model query. ``question`` is the user text without any chat template."""

    id: str  # unique within the benchmark, e.g. "random/1", "existence/000000006040.jpg/0"
    image: Path | None  # may not exist or be unreadable: the runner records an error row for it
    question: str
    answer: Any  # ground truth in the benchmark's own terms
    split: str  # POPE split / MME subtask / AMBER "generative"|"discriminative" / CHAIR "caption"
    meta: dict = field(default_factory=dict)  # JSON-serialisable extras


class BenchmarkFormatError(ValueError):
    """A malformed benchmark file; the message names the path, the line (when there is one) and the field."""

    def __init__(self, path: str | Path, message: str, line: int | None = None, field: str | None = None):
        self.path, self.line, self.field = Path(path), line, field
        where = f"{path}:{line}" if line is not None else f"{path}"
        what = f"field '{field}' {message}" if field else message
        super().__init__(f"{where}: {what}")


class Benchmark:
    """Base of every benchmark. Subclasses set the class variables and implement ``_load`` and ``score``.

    ``options`` are the subclass's ``default_options`` overridden by keyword; an unknown one is a ``ValueError``.
    ``limit`` keeps the first N samples of each split (loaders emit a deterministic order).
    """

    name: ClassVar[str]
    max_new_tokens: ClassVar[int]
    primary_metric: ClassVar[str]
    higher_is_better: ClassVar[dict[str, bool]]  # fnmatch pattern on the last "/" component of a metric key
    default_options: ClassVar[dict[str, Any]] = {}

    def __init__(self, data_dir: str | Path, splits: Sequence[str] | None = None, limit: int | None = None,
                 **options: Any):
        unknown = sorted(set(options) - set(self.default_options))
        if unknown:
            allowed = ", ".join(sorted(self.default_options)) or "none"
            raise ValueError(f"unknown option(s) {unknown} for benchmark '{self.name}'; allowed: {allowed}")
        if limit is not None and limit < 1:
            raise ValueError(f"limit={limit} must be a positive number of samples per split (or None for all)")
        self.data_dir = Path(data_dir)
        self.splits = [splits] if isinstance(splits, str) else (list(splits) if splits is not None else None)
        self.limit = limit
        self.options = {**self.default_options,
                        **{k: _coerce(k, v, self.default_options[k]) for k, v in options.items()}}
        if "max_new_tokens" in self.options and self.options["max_new_tokens"] is not None:
            self.max_new_tokens = int(self.options["max_new_tokens"])  # instance override of the class default

    # -- loading -------------------------------------------------------------------------------------------------------
    def samples(self) -> list[Sample]:
        """Load and validate; deterministic order; ``limit`` = first N per split."""
        if not self.data_dir.is_dir():
            raise FileNotFoundError(f"benchmark '{self.name}': data directory {self.data_dir} does not exist")
        out: list[Sample] = []
        for items in self._load().values():
            out.extend(items[: self.limit] if self.limit is not None else items)
        ids = [s.id for s in out]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise BenchmarkFormatError(self.data_dir, f"duplicate sample id '{dup}'")
        return out

    def _load(self) -> dict[str, list[Sample]]:
        """Split name -> its samples, in order (only the requested splits)."""
        raise NotImplementedError

    def _select_splits(self, available: Sequence[str]) -> list[str]:
        if self.splits is None:
            return list(available)
        missing = [s for s in self.splits if s not in available]
        if missing:
            raise ValueError(f"benchmark '{self.name}': split(s) {missing} not found in {self.data_dir}; "
                             f"available: {', '.join(available) or 'none'}")
        return list(self.splits)

    def max_new_tokens_for(self, sample: Sample) -> int:
        """Generation budget for one sample (AMBER mixes captions and yes/no questions)."""
        return int(sample.meta.get("max_new_tokens", self.max_new_tokens))

    # -- scoring -------------------------------------------------------------------------------------------------------
    def score(self, samples: Sequence[Sample], predictions: Mapping[str, str]) -> dict[str, float]:
        raise NotImplementedError

    @staticmethod
    def _present(samples: Sequence[Sample], predictions: Mapping[str, str]) -> tuple[list[Sample], int]:
        """Samples that have a prediction, and how many do not (error rows)."""
        kept = [s for s in samples if s.id in predictions and predictions[s.id] is not None]
        return kept, len(samples) - len(kept)

    @classmethod
    def is_higher_better(cls, metric: str) -> bool | None:
        """Arrow for a metric key such as "random/f1"; None when neither direction is better (counts, yes_ratio)."""
        leaf = metric.rsplit("/", 1)[-1]
        for pattern, better in cls.higher_is_better.items():
            if fnmatch.fnmatchcase(leaf, pattern):
                return better
        return None


def _coerce(name: str, value: Any, default: Any) -> Any:
    """Options may arrive as command-line strings ("n=200", "gt_captions=none", "prompt_suffix=\\nAnswer ...")."""
    if not isinstance(value, str):
        return value
    if value.strip().lower() in ("none", "null"):
        return None
    if name.startswith("prompt"):
        return value.replace("\\n", "\n")
    if isinstance(default, bool):
        if value.strip().lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"option {name}={value!r}: use true or false")
        return value.strip().lower() in ("true", "1", "yes")
    if isinstance(default, int) or (default is None and name in _INT_OPTIONS):
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"option {name}={value!r}: expected an integer") from None
    return value


_INT_OPTIONS = ("n", "seed", "max_new_tokens", "yes_no_max_new_tokens")


# -- file helpers used by the loaders ----------------------------------------------------------------------------------
def read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise BenchmarkFormatError(path, f"invalid JSON: {e.msg} (column {e.colno})", line=e.lineno) from None
    except UnicodeDecodeError as e:
        raise BenchmarkFormatError(path, f"not UTF-8 text: {e.reason}") from None


def read_json_lines(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) per non-blank line of a JSON-lines file (a JSON array is refused with a hint)."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            if line.lstrip().startswith("["):
                raise BenchmarkFormatError(path, "is a JSON array; this file must be JSON lines (one object per "
                                                 "line, e.g. {\"question_id\": 1, ...}); convert it with "
                                                 "jq -c '.[]' FILE > FILE.jsonl", line=lineno)
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise BenchmarkFormatError(path, f"invalid JSON: {e.msg} (character {e.pos + 1})", line=lineno
                                           ) from None
            if not isinstance(obj, dict):
                raise BenchmarkFormatError(path, f"expected a JSON object, got {type(obj).__name__}", line=lineno)
            yield lineno, obj


def require(obj: Mapping, key: str, kind: type | tuple[type, ...], path: Path, line: int | None = None) -> Any:
    """``obj[key]`` checked for presence and type (bool is not accepted as int); non-empty when a string."""
    if key not in obj:
        raise BenchmarkFormatError(path, "is missing", line=line, field=key)
    value = obj[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise BenchmarkFormatError(path, f"must be {names}, got {value!r}", line=line, field=key)
    if isinstance(value, str) and not value.strip():
        raise BenchmarkFormatError(path, "must not be empty", line=line, field=key)
    return value


def json_field(item: Any, key: str, kind: type | tuple[type, ...], path: Path, where: str) -> Any:
    """``item[key]`` of one entry of a JSON file, present and of type ``kind`` (bool is not an int); ``where`` names
    the entry in the error, e.g. "annotations[3]"."""
    if not isinstance(item, dict):
        raise BenchmarkFormatError(path, f"must be an object, got {item!r}", field=where)
    if key not in item:
        raise BenchmarkFormatError(path, "is missing", field=f"{where}.{key}")
    value = item[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise BenchmarkFormatError(path, f"must be {names}, got {value!r}", field=f"{where}.{key}")
    return value


def find_image_dir(data_dir: Path, image_dir: str | Path | None, candidates: Sequence[str] = ("images", "val2014")
                   ) -> Path:
    """The explicit ``image_dir`` (as given, like any command-line path), else the first existing candidate
    folder in ``data_dir``, else ``data_dir`` itself."""
    if image_dir is not None:
        return Path(image_dir)
    for name in candidates:
        if (data_dir / name).is_dir():
            return data_dir / name
    return data_dir
