"""Benchmark metrics as pure functions: answer parsing, POPE, CHAIR, MME and AMBER scores.

Rates are fractions in [0, 1] (MME scores are in the benchmark's points: 0-200 per subtask). A division by zero
gives 0.0. The conventions followed, and where they are approximated, are stated in each docstring.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import NamedTuple

YesNo = str  # "yes" | "no"


def _div(a: float, b: float) -> float:
    return a / b if b else 0.0


def _f1(precision: float, recall: float) -> float:
    return _div(2 * precision * recall, precision + recall)


# -- yes/no answers ----------------------------------------------------------------------------------------------------
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def parse_yes_no(text: str | None) -> YesNo | None:
    """Yes/no answer by the POPE evaluation convention (RUCAIBox/POPE ``evaluate.py``, LLaVA ``eval_pope.py``).

    Keep the first sentence (text before the first '.'), split into words; "no" or "not" among them -> "no".
    The official script maps *everything else* to "yes"; here "yes" needs the word "yes" and anything else is
    None (unparseable), so callers can count such answers (``pope_metrics`` then applies the official "yes").
    Differences from the script: matching is case-insensitive (it matches only "No", "no", "not") and words are
    split on whitespace and punctuation (it splits on spaces after removing commas).
    """
    if not text:
        return None
    first = text.lower().split(".", 1)[0]
    words = set(_WORD.findall(first))
    if words & {"no", "not"}:
        return "no"
    if "yes" in words:
        return "yes"
    return None


def parse_mme_answer(text: str | None) -> YesNo | None:
    """MME's rule (eval_tool ``calculation.py``, lmms-eval ``mme``): lowercase; exactly "yes"/"no", else "yes" in
    the first 4 characters, else "no" in them; otherwise None ("other", always wrong). Leading whitespace is
    stripped first (the script assumes stripped answers)."""
    if text is None:
        return None
    answer = text.strip().lower()
    if answer in ("yes", "no"):
        return answer
    prefix = answer[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return None


@dataclass(frozen=True)
class Confusion:
    """Binary confusion counts for a chosen positive class."""

    tp: int = 0
    fp: int = 0
    tn: int = 0
    fn: int = 0

    @property
    def n(self) -> int:
        return self.tp + self.fp + self.tn + self.fn

    def metrics(self) -> dict[str, float]:
        precision, recall = _div(self.tp, self.tp + self.fp), _div(self.tp, self.tp + self.fn)
        return {"accuracy": _div(self.tp + self.tn, self.n), "precision": precision, "recall": recall,
                "f1": _f1(precision, recall)}


def confusion(labels: Iterable[str], preds: Iterable[str], positive: str) -> Confusion:
    tp = fp = tn = fn = 0
    for label, pred in zip(labels, preds, strict=True):
        if pred == positive:
            tp, fp = (tp + 1, fp) if label == positive else (tp, fp + 1)
        else:
            fn, tn = (fn + 1, tn) if label == positive else (fn, tn + 1)
    return Confusion(tp, fp, tn, fn)


def pope_metrics(labels: Sequence[YesNo], preds: Sequence[YesNo | None], unparsed_as: YesNo = "yes"
                 ) -> dict[str, float]:
    """POPE (Li et al. 2023) with "yes" as the positive class: accuracy, precision, recall, F1 and yes_ratio.

    ``preds`` are parsed answers (``parse_yes_no``); None (unparseable) counts as ``unparsed_as`` -- "yes" in the
    official script -- and is reported in ``n_unparsed``. ``yes_ratio`` is the share of *predicted* "yes" (the
    official definition; lmms-eval computes it from the ground truth).
    """
    if unparsed_as not in ("yes", "no"):
        raise ValueError(f"unparsed_as={unparsed_as!r}; use 'yes' (official POPE) or 'no'")
    filled = [unparsed_as if p is None else p for p in preds]
    counts = confusion(labels, filled, positive="yes")
    return {**pope_from_counts(counts), "tp": counts.tp, "fp": counts.fp, "tn": counts.tn, "fn": counts.fn,
            "n": counts.n, "n_unparsed": sum(p is None for p in preds)}


def pope_from_counts(counts: Confusion) -> dict[str, float]:
    """POPE's rates from its confusion counts ("yes" positive): accuracy, precision, recall, F1, yes_ratio. The
    metrics are functions of summed per-question counts, which is what makes a bootstrap over questions cheap."""
    return {**counts.metrics(), "yes_ratio": _div(counts.tp + counts.fp, counts.n)}


# -- MME ---------------------------------------------------------------------------------------------------------------
MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
                  "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


class MMEResult(NamedTuple):
    subtask: str
    image: str
    truth: YesNo
    pred: YesNo | None  # parsed answer
    missing: bool = False  # no prediction (error row): excluded from acc, and its image from acc+


def mme_scores(results: Iterable[MMEResult]) -> dict[str, float]:
    """MME (Fu et al. 2023): per subtask ``acc`` (per question) and ``acc_plus`` (per image: all its questions --
    two in MME -- right), ``score`` = 100 * (acc + acc_plus); ``perception`` / ``cognition`` = sum of the scores
    of the subtasks of that kind that are present (their count in ``perception_subtasks`` / ``cognition_subtasks``).
    Unparsed answers are wrong. Subtasks outside MME's 14 are scored but summed into neither total."""
    by_image: dict[str, dict[str, list[MMEResult]]] = defaultdict(lambda: defaultdict(list))
    for r in results:
        by_image[r.subtask][r.image].append(r)
    out: dict[str, float] = {}
    for subtask, images in by_image.items():
        answered = [r for rs in images.values() for r in rs if not r.missing]
        complete = [rs for rs in images.values() if not any(r.missing for r in rs)]
        acc = _div(sum(r.pred == r.truth for r in answered), len(answered))
        acc_plus = _div(sum(all(r.pred == r.truth for r in rs) for rs in complete), len(complete))
        out[f"{subtask}/acc"], out[f"{subtask}/acc_plus"] = acc, acc_plus
        out[f"{subtask}/score"] = 100 * (acc + acc_plus)
        out[f"{subtask}/n"] = len(answered)
        out[f"{subtask}/n_unparsed"] = sum(r.pred is None for r in answered)
    for kind, names in (("perception", MME_PERCEPTION), ("cognition", MME_COGNITION)):
        present = [s for s in names if s in by_image]
        out[kind] = sum(out[f"{s}/score"] for s in present)
        out[f"{kind}_subtasks"] = len(present)
    return out


# -- words -------------------------------------------------------------------------------------------------------------
_IRREGULAR = {"men": "man", "women": "woman", "children": "child", "people": "person", "mice": "mouse",
              "geese": "goose", "feet": "foot", "teeth": "tooth", "oxen": "ox", "knives": "knife", "wives": "wife",
              "dice": "die", "gentlemen": "gentleman", "policemen": "policeman",
              "firemen": "fireman", "fishermen": "fisherman", "businessmen": "businessman", "cacti": "cactus"}
# Tried in order against a vocabulary: plain "-s" first so "phones" is "phone" (not the synonym-list typo "phon").
_SUFFIXES = (("s", ""), ("es", ""), ("ies", "y"), ("ves", "f"), ("ves", "fe"))


def singularize(word: str, vocabulary: Collection[str] = ()) -> str:
    """Rule-based singular of a lowercase word (no NLTK). A word in ``vocabulary`` is kept (so "skis", "people",
    "scissors" stay); irregular plurals come from a table ("men" -> "man"); otherwise the first suffix rule whose
    result is in ``vocabulary`` wins, and without a hit the word is returned unchanged (with an empty vocabulary
    the usual English rule is applied instead)."""
    if word in vocabulary:
        return word
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    if len(word) <= 3 or word.endswith("ss"):
        return word
    if not vocabulary:
        return _default_singular(word)
    for suffix, repl in _SUFFIXES:
        if word.endswith(suffix) and len(word) - len(suffix) >= 2 and word[: -len(suffix)] + repl in vocabulary:
            return word[: -len(suffix)] + repl
    return word


def _default_singular(word: str) -> str:
    for suffix, repl in (("ies", "y"), ("ches", "ch"), ("shes", "sh"), ("sses", "ss"), ("xes", "x"), ("s", "")):
        if word.endswith(suffix) and not word.endswith("ss"):
            return word[: -len(suffix)] + repl
    return word


def tokenize(text: str) -> list[str]:
    """Lowercase word tokens; hyphens and apostrophes split words ("man's" -> "man", "s")."""
    return re.findall(r"[a-z0-9]+", text.lower())


# -- CHAIR -------------------------------------------------------------------------------------------------------------
SYNONYMS_RESOURCE = ("attnkit", "assets/eval/coco_synonyms.txt")


def load_synonyms(path: str | Path | None = None) -> dict[str, list[str]]:
    """Read a synonyms file: one category per line, ``canonical, synonym, synonym, ...``; '#' starts a comment.
    Default: the shipped 80-category COCO list used by CHAIR (``attnkit/assets/eval/coco_synonyms.txt``)."""
    if path is None:
        text = resources.files(SYNONYMS_RESOURCE[0]).joinpath(SYNONYMS_RESOURCE[1]).read_text(encoding="utf-8")
        where = SYNONYMS_RESOURCE[1]
    else:
        text, where = Path(path).read_text(encoding="utf-8"), str(path)
    synonyms: dict[str, list[str]] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        names = [" ".join(tokenize(n)) for n in line.split(",")]
        names = [n for n in names if n]
        if not names:
            raise ValueError(f"{where}:{lineno}: a synonyms line needs a category name")
        canonical = names[0]
        synonyms.setdefault(canonical, [])
        synonyms[canonical] += [n for n in names if n not in synonyms[canonical]]
    return synonyms


# Rohrbach et al.'s rules (LisaAnne/Hallucination utils/chair.py): phrases read as one word, and qualifiers that
# would otherwise fire "person" ("baby bird" is a bird, "passenger train" a train).
_EXTRA_PHRASES = {"home plate": "home plate", "train track": "train track", "toilet seat": "toilet",
                  "wine glas": "wine glass"}
_ANIMAL_WORDS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "animal",
                 "cub")
_VEHICLE_WORDS = ("jet", "train")


class Mention(NamedTuple):
    word: str  # the (singular) word or phrase in the caption
    category: str  # canonical category
    position: int  # token index in the caption


class CaptionObjects(NamedTuple):
    categories: frozenset[str]
    mentions: list[Mention]


class CaptionObjectExtractor:
    """Caption -> mentioned COCO categories, as CHAIR does it (Rohrbach et al. 2018, ``utils/chair.py``), NLTK-free.

    Steps: lowercase word tokens; singular forms (``singularize`` against the synonym vocabulary, instead of
    pattern/WordNet lemmatisation); multi-word phrases joined, longest first (every multi-word synonym, plus
    "home plate" and "train track" which name no category, so "train track" does not fire "train"); "baby X" /
    "adult X" for animal words and "passenger jet/train" read as X (no "person"), "toilet seat" as "toilet";
    "seat" dropped when "toilet" is in the caption; every remaining word that is a synonym is one mention of its
    canonical category. Like the original there is no part-of-speech filter ("orange" the colour counts as the
    fruit); unlike it, verbs are not lemmatised ("skiing" does not fire "skis") and 3-word phrases match.
    """

    def __init__(self, synonyms: Mapping[str, Sequence[str]] | None = None):
        synonyms = load_synonyms() if synonyms is None else synonyms
        self.inverse: dict[str, str] = {}
        for canonical, names in synonyms.items():
            for name in (canonical, *names):
                self.inverse.setdefault(" ".join(tokenize(name)), " ".join(tokenize(canonical)))
        self.phrases: dict[str, str] = {p: p for p in self.inverse if " " in p}
        self.phrases.update(_EXTRA_PHRASES)
        for animal in _ANIMAL_WORDS:
            self.phrases[f"baby {animal}"] = self.phrases[f"adult {animal}"] = animal
        for vehicle in _VEHICLE_WORDS:
            self.phrases[f"passenger {vehicle}"] = vehicle
        self.vocabulary = {w for p in (*self.inverse, *self.phrases) for w in p.split()}
        self.max_phrase = max((len(p.split()) for p in self.phrases), default=1)

    def words(self, text: str) -> list[tuple[str, int]]:
        """(word or joined phrase, token position) after singularisation and phrase joining."""
        tokens = [singularize(t, self.vocabulary) for t in tokenize(text)]
        out, i = [], 0
        while i < len(tokens):
            for n in range(min(self.max_phrase, len(tokens) - i), 1, -1):
                phrase = " ".join(tokens[i:i + n])
                if phrase in self.phrases:
                    out.append((self.phrases[phrase], i))
                    i += n
                    break
            else:
                out.append((tokens[i], i))
                i += 1
        if any(w == "toilet" for w, _ in out):
            out = [(w, i) for w, i in out if w != "seat"]
        return out

    def __call__(self, text: str) -> CaptionObjects:
        mentions = [Mention(w, self.inverse[w], i) for w, i in self.words(text) if w in self.inverse]
        return CaptionObjects(frozenset(m.category for m in mentions), mentions)

    def category(self, name: str) -> str:
        """Canonical category of an annotation's category name (itself when it is not in the synonyms)."""
        key = " ".join(tokenize(name))
        return self.inverse.get(key, key)


def chair_metrics(mentions: Sequence[Sequence[str]], gt_objects: Sequence[Collection[str]],
                  n_words: Sequence[int] | None = None) -> dict[str, float]:
    """CHAIR (Rohrbach et al. 2018) over captions; caption k mentions categories ``mentions[k]`` (one entry per
    mention, repeats kept) and has ground-truth categories ``gt_objects[k]``.

    chair_s = captions with >= 1 hallucinated mention / captions; chair_i = hallucinated mentions / all mentions;
    recall = sum_k |mentioned_k & gt_k| / sum_k |gt_k| (the usual extension, e.g. OPERA's chair.py);
    avg_len = mean of ``n_words`` (caption length in words).
    """
    if len(mentions) != len(gt_objects):
        raise ValueError(f"{len(mentions)} captions but {len(gt_objects)} ground-truth object sets")
    totals = [sum(column) for column in zip(*(chair_counts(said, gt) for said, gt in zip(mentions, gt_objects)),
                                            strict=True)] or [0] * len(CHAIR_COUNTS)
    return chair_from_counts(len(mentions), *totals, n_words=None if n_words is None else sum(n_words))


CHAIR_COUNTS = ("n_mentions", "n_hallucinated", "hallucinated_caption", "covered", "n_gt")


def chair_counts(said: Sequence[str], gt: Collection[str]) -> tuple[int, int, int, int, int]:
    """One caption's additive CHAIR counts (:data:`CHAIR_COUNTS`): mentions, hallucinated mentions, whether any
    mention is hallucinated (0/1), ground-truth categories it names, ground-truth categories."""
    gt = set(gt)
    wrong = sum(c not in gt for c in said)
    return len(said), wrong, int(wrong > 0), len(set(said) & gt), len(gt)


def chair_from_counts(n: int, n_mentions: int, n_hallucinated: int, hallucinated_captions: int, covered: int,
                      n_gt: int, n_words: int | None = None) -> dict[str, float]:
    """CHAIR's rates from counts summed over ``n`` captions (``n_words``: their total length in words)."""
    out = {"chair_s": _div(hallucinated_captions, n), "chair_i": _div(n_hallucinated, n_mentions),
           "recall": _div(covered, n_gt), "n": n, "n_mentions": n_mentions, "n_hallucinated": n_hallucinated}
    if n_words is not None:
        out["avg_len"] = _div(n_words, n)
    return out


# -- AMBER -------------------------------------------------------------------------------------------------------------
_PRONOUNS_MODALS = frozenset("i you we they he she it who which to can could will would should may might must not "
                             "also often usually".split())
_DETERMINERS = frozenset("a an the this that these those its his her their our my your some any each every one two "
                         "three four five several many few of".split())
_ADJECTIVE_ONLY = frozenset({"hot"})


class AmberNounExtractor:
    """Object words of a response for AMBER, without NLTK/spaCy: lowercase tokens, singularised against the AMBER
    vocabulary (``relation.json`` keys and values), kept when in the vocabulary.

    Approximates AMBER's "nouns by NLTK POS tag, WordNet-lemmatised" with context rules: a vocabulary word right
    after a pronoun, modal, "to" or "not" is read as a verb and dropped ("they watch", "to leave"); "can" counts
    only after a determiner or number ("a can"); "hot" is never a noun. Hyphenated words ("air-conditioning") are
    matched whole first.
    """

    def __init__(self, vocabulary: Collection[str]):
        self.vocabulary = frozenset(w.lower() for w in vocabulary)

    def __call__(self, text: str) -> list[str]:
        raw = re.findall(r"[a-z0-9]+(?:-[a-z0-9]+)*", text.lower())
        tokens: list[str] = []
        for tok in raw:
            tokens += [tok] if tok in self.vocabulary or "-" not in tok else tok.split("-")
        nouns = []
        for i, tok in enumerate(tokens):
            word = singularize(tok, self.vocabulary)
            if word not in self.vocabulary or word in _ADJECTIVE_ONLY:
                continue
            before = tokens[i - 1] if i else ""
            if before in _PRONOUNS_MODALS or (word == "can" and before not in _DETERMINERS and not before.isdigit()):
                continue
            nouns.append(word)
        return nouns


def amber_vocabulary(association: Mapping[str, Sequence[str]]) -> set[str]:
    """AMBER's ``hallucination_words``: every key and associated word of ``relation.json``."""
    return {w for key, values in association.items() for w in (key, *values)}


def amber_generative(nouns: Sequence[Sequence[str]], truths: Sequence[Sequence[str]], hallus: Sequence[Sequence[str]],
                     association: Mapping[str, Sequence[str]], safe_words: Collection[str] = ()) -> dict[str, float]:
    """AMBER generative metrics (Wang et al. 2023, ``inference.py``) for responses with object words ``nouns[k]``,
    annotated objects ``truths[k]`` and hallucination-prone objects ``hallus[k]``.

    Only words in the AMBER vocabulary count. A word is safe when in ``safe_words`` (counted, never hallucinated),
    or equal to a truth object or one of its associated words (that truth object is then covered); any other
    word is a hallucination (and covers the hallu object it equals or is associated with).
    chair = hallucinated words / words; cover = covered truth objects / truth objects; hal = responses with >= 1
    hallucinated word / responses; cog = covered hallu objects / hallu objects. Reproduces the script's matching
    (first match in "associated words, then the objects", repeated objects counted separately) except its spaCy
    similarity > 0.8 step: a word that only *resembles* a truth object counts as a hallucination here.
    """
    n_words = n_hallu_words = covered = n_truth = hallu_covered = n_hallu = responses_with_hallu = 0
    safe_words, vocab = set(safe_words), amber_vocabulary(association)
    for said, truth, hallu in zip(nouns, truths, hallus, strict=True):
        said = [w for w in said if w in vocab]
        truth_flags, hallu_flags = _amber_flags(truth, association), _amber_flags(hallu, association)
        hallucinated = 0
        for word in said:
            if word in safe_words:
                continue
            if truth_flags.mark(word):
                continue
            hallu_flags.mark(word)
            hallucinated += 1
        n_words += len(said)
        n_hallu_words += hallucinated
        responses_with_hallu += hallucinated > 0
        covered, n_truth = covered + sum(truth_flags.covered), n_truth + len(truth)
        hallu_covered, n_hallu = hallu_covered + sum(hallu_flags.covered), n_hallu + len(hallu)
    n = len(nouns)
    return {"chair": _div(n_hallu_words, n_words), "cover": _div(covered, n_truth),
            "hal": _div(responses_with_hallu, n), "cog": _div(hallu_covered, n_hallu), "n": n,
            "n_words": n_words, "n_hallucinated": n_hallu_words}


@dataclass
class _AmberFlags:
    """The script's lookup list: associated words of each object (owner index), then the objects themselves."""

    lookup: list[tuple[str, int]]
    covered: list[int]

    def mark(self, word: str) -> bool:
        for w, owner in self.lookup:
            if w == word:
                self.covered[owner] = 1
                return True
        return False


def _amber_flags(objects: Sequence[str], association: Mapping[str, Sequence[str]]) -> _AmberFlags:
    lookup = [(a, i) for i, obj in enumerate(objects) for a in association.get(obj, ())]
    lookup += [(obj, i) for i, obj in enumerate(objects)]
    return _AmberFlags(lookup, [0] * len(objects))


def amber_discriminative(truths: Sequence[YesNo], preds: Sequence[YesNo | None]) -> dict[str, float]:
    """AMBER discriminative metrics (``inference.py``): accuracy, and precision / recall / F1 with **"no" as the
    positive class** (precision = right "no" answers / "no" answers, recall = right "no" answers / "no" truths).
    An unparsed answer (None) is wrong and is not a "no" answer. F1 is 2PR/(P+R) (the script adds 1e-4 to the
    denominator)."""
    counts = confusion(truths, preds, positive="no")
    accuracy = _div(sum(p == t for p, t in zip(preds, truths, strict=True)), len(truths))  # None is never right
    return {**counts.metrics(), "accuracy": accuracy, "n": counts.n, "n_unparsed": sum(p is None for p in preds)}
