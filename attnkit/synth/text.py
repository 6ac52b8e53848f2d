"""The synthetic world's language: captions, yes/no questions, prompts and the word vocabulary."""

from __future__ import annotations

import numpy as np

from attnkit.synth.world import CATEGORIES, SCENE_TYPES, Scene

POPE_QUESTION = "Is there a {} in the image?"
POPE_SUFFIX = " Answer the question using a single word or phrase."
CAPTION_PROMPTS = (
    "Please describe this image in detail.",
    "Describe this image.",
    "What is in the image?",
    "Generate a short caption of the image.",
)
CHAIR_PROMPT = CAPTION_PROMPTS[0]


def caption(scene: Scene) -> str:
    """``"a kitchen scene with a cup , a table and a bottle ."`` (objects in vocabulary order)."""
    names = [f"a {n}" for n in scene.categories]
    listed = names[0] if len(names) == 1 else " , ".join(names[:-1]) + " and " + names[-1]
    return f"a {scene.kind} scene with {listed} ."


def question_answers(scene: Scene, rng: np.random.Generator, cooccur: dict[str, dict[str, float]],
                     frequency: dict[str, float], n: int = 2, suffix_prob: float = 0.5,
                     negative_mix: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)) -> list[tuple[str, str]]:
    """Up to ``n`` balanced (question, "yes"/"no") pairs, alternating, each category asked at most once.

    Asking a category once means no answer can be copied from an earlier turn: every one has to come
    from the image. ``negative_mix`` gives the shares of random, popular and co-occurring negatives.
    Random negatives leave each category a prior P(yes | category) that grows with its frequency, as
    on COCO; popular and co-occurring negatives teach the model to look rather than guess.
    """
    present = scene.categories
    absent = [c.name for c in CATEGORIES if c.name not in present]
    k = min(n // 2, len(present), len(absent))
    positives = [present[i] for i in rng.permutation(len(present))[:k]]
    negatives: list[str] = []
    for _ in range(k):
        mode = rng.choice(3, p=np.asarray(negative_mix) / sum(negative_mix))
        if mode == 0:
            w = np.ones(len(absent))
        elif mode == 1:
            w = np.array([frequency[a] for a in absent]) + 1e-3
        else:
            w = np.array([sum(cooccur[p].get(a, 0.0) for p in present) for a in absent]) + 1e-3
        negatives.append(absent.pop(int(rng.choice(len(absent), p=w / w.sum()))))
    out = [pair for yes, no in zip(positives, negatives, strict=True) for pair in ((yes, "yes"), (no, "no"))]
    return [(POPE_QUESTION.format(c) + (POPE_SUFFIX if rng.random() < suffix_prob else ""), a) for c, a in out]


def vocabulary() -> list[str]:
    """Every word the templates can produce, lower-cased (the tokenizer lower-cases its input)."""
    texts = [POPE_QUESTION, POPE_SUFFIX, *CAPTION_PROMPTS, "USER: ASSISTANT: a an with scene and yes no , ."]
    words = {w for t in texts for w in _split(t.lower().replace("{}", ""))}
    words |= set(SCENE_TYPES)
    for c in CATEGORIES:
        words |= {c.name, *c.synonyms}
    return sorted(words)


def _split(text: str) -> list[str]:
    import re

    return re.findall(r"\w+|[^\w\s]+", text)
