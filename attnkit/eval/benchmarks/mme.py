"""MME (Fu et al., "MME: A Comprehensive Evaluation Benchmark for Multimodal Large Language Models", 2023).

Reads the published release folder (``data_dir`` or its ``MME_Benchmark_release_version/``): one folder per
subtask; either ``images/`` + ``questions_answers_YN/`` (one ``<image stem>.txt`` per image) or images and
``.txt`` files side by side. Each non-blank ``.txt`` line is ``question<TAB>Yes|No`` (two per image in MME).
Splits are the subtask folder names; MME's 10 perception and 4 cognition subtasks come first, in MME's order.
Scoring: ``parse_mme_answer`` + ``mme_scores``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import ClassVar

from attnkit.eval.benchmarks.base import DEFAULT_YES_NO_SUFFIX, Benchmark, BenchmarkFormatError, Sample
from attnkit.eval.metrics import MME_COGNITION, MME_PERCEPTION, MMEResult, mme_scores, parse_mme_answer

_IMAGE_EXTS = (".jpg", ".png", ".jpeg", ".JPG", ".PNG", ".JPEG", ".bmp", ".webp")
_RELEASE = "MME_Benchmark_release_version"


class MMEBenchmark(Benchmark):
    """MME yes/no questions; ``<subtask>/score`` = 100 * (acc + acc+), ``perception`` and ``cognition`` sums.

    Options: ``prompt_suffix`` appended to each question (lmms-eval's default post-prompt; "" for none),
    ``max_new_tokens``.
    """

    name: ClassVar[str] = "mme"
    max_new_tokens: ClassVar[int] = 16
    primary_metric: ClassVar[str] = "perception"
    higher_is_better: ClassVar[dict[str, bool]] = {"perception": True, "cognition": True, "score": True, "acc": True,
                                                    "acc_plus": True, "n_unparsed": False}
    default_options: ClassVar[dict] = {"prompt_suffix": DEFAULT_YES_NO_SUFFIX, "max_new_tokens": None}

    @property
    def root(self) -> Path:
        return self.data_dir / _RELEASE if (self.data_dir / _RELEASE).is_dir() else self.data_dir

    def subtasks(self) -> list[str]:
        """Subtask folders present (a folder with ``questions_answers_YN/`` or with .txt files)."""
        found = [d.name for d in self.root.iterdir()
                 if d.is_dir() and ((d / "questions_answers_YN").is_dir() or any(d.glob("*.txt")))]
        known = [*MME_PERCEPTION, *MME_COGNITION]
        return [s for s in known if s in found] + sorted(s for s in found if s not in known)

    def _load(self) -> dict[str, list[Sample]]:
        available = self.subtasks()
        if not available:
            raise FileNotFoundError(f"no MME subtask folders (with questions_answers_YN/ or .txt files) in "
                                    f"{self.root}")
        return {subtask: self._read_subtask(subtask) for subtask in self._select_splits(available)}

    def _read_subtask(self, subtask: str) -> list[Sample]:
        folder = self.root / subtask
        if (folder / "questions_answers_YN").is_dir():
            txt_dir, image_dir = folder / "questions_answers_YN", folder / "images"
        else:
            txt_dir, image_dir = folder, folder
        samples = []
        for txt in sorted(txt_dir.glob("*.txt")):
            image = _image_for(image_dir, txt.stem)
            for k, (question, answer, lineno) in enumerate(_read_pairs(txt)):
                samples.append(Sample(id=f"{subtask}/{image.name}/{k}", image=image,
                                      question=question + self.options["prompt_suffix"], answer=answer,
                                      split=subtask, meta={"image_key": image.name, "question": question,
                                                           "file": f"{subtask}/{txt.relative_to(folder)}",
                                                           "line": lineno}))
        return samples

    def score(self, samples: Sequence[Sample], predictions: Mapping[str, str]) -> dict[str, float]:
        results = [MMEResult(s.split, s.meta["image_key"], s.answer.lower(),
                             parse_mme_answer(predictions.get(s.id)), missing=predictions.get(s.id) is None)
                   for s in samples]
        out = mme_scores(results)
        n_missing = sum(r.missing for r in results)
        out["n"], out["n_missing"] = len(results) - n_missing, n_missing
        return out


def _image_for(image_dir: Path, stem: str) -> Path:
    """The image named like the .txt file; a not-yet-existing ``<stem>.jpg`` when none is found (runner's error)."""
    for ext in _IMAGE_EXTS:
        if (image_dir / f"{stem}{ext}").is_file():
            return image_dir / f"{stem}{ext}"
    return image_dir / f"{stem}.jpg"


def _read_pairs(path: Path) -> list[tuple[str, str, int]]:
    """(question, "Yes"|"No", line number) for each non-blank line ``question<TAB>answer``."""
    pairs = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise BenchmarkFormatError(path, f"not UTF-8 text: {e.reason}") from None
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        parts = line.rstrip("\r\n").split("\t")
        if len(parts) != 2:
            raise BenchmarkFormatError(path, f"expected 'question<TAB>Yes|No', got {len(parts)} tab-separated "
                                             f"field(s)", line=lineno)
        question, answer = parts[0].strip(), parts[1].strip()
        if not question:
            raise BenchmarkFormatError(path, "must not be empty", line=lineno, field="question")
        if answer.lower() not in ("yes", "no"):
            raise BenchmarkFormatError(path, f"must be 'Yes' or 'No', got {answer!r}", line=lineno, field="answer")
        pairs.append((question, answer.capitalize(), lineno))
    return pairs
