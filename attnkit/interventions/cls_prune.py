"""``cls-prune``: FasterVLM — keep the visual tokens with most [CLS] attention, drop the rest before the LLM."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from attnkit.hooks.drop import Dropper
from attnkit.interventions.base import Intervention, param, register

SCORES = ("auto", "cls", "received", "norm", "random", "uniform")


def keep_count(keep: int | float, n: int, what: str) -> int:
    """Tokens to keep out of ``n``: ``keep`` is a count, or a ratio in (0, 1] (rounded, at least 1)."""
    if isinstance(keep, float):
        return max(1, round(n * keep))
    if keep > n:
        raise ValueError(f"keep={keep} exceeds the {n} visual tokens of {what}; use keep <= {n} or a ratio in (0, 1]")
    return keep


def check_keep(name: str, keep: int | float) -> None:
    if isinstance(keep, float) and not 0.0 < keep <= 1.0:
        raise ValueError(f"{name}: keep={keep} is out of range; allowed: a count >= 1 or a ratio in (0, 1]")


def _select(scores: torch.Tensor | None, groups: torch.Tensor, keep: int | float, what: str) -> torch.Tensor:
    """Indices kept: tokens of group -1 always; the budget over the others, shared between groups in proportion
    to their size, each group's share taken by top score (or evenly spaced when ``scores`` is None)."""
    free = groups >= 0
    n = int(free.sum())
    k = keep_count(keep, n, what)
    chosen = [(~free).nonzero().squeeze(1)]
    ids = [int(g) for g in groups[free].unique()]
    given = 0
    for j, g in enumerate(ids):
        members = (groups == g).nonzero().squeeze(1)
        k_g = k - given if j == len(ids) - 1 else round(k * len(members) / n)
        given += k_g
        if k_g <= 0:
            continue
        if scores is None:
            pick = torch.linspace(0, len(members) - 1, k_g).round().long()
        else:
            pick = torch.topk(scores[members], k_g).indices
        chosen.append(members[pick])
    return torch.cat(chosen).sort().values


@register
@dataclasses.dataclass
class ClsPrune(Intervention):
    """[CLS]-attention visual token pruning (FasterVLM, "[CLS] Attention is All You Need for Training-Free
    Visual Token Pruning", arXiv 2412.01818).

    For each image with patches i = 1..N, at the vision layer whose output feeds the LLM (-2 for LLaVA):
    ``s_i = 1/H Σ_h softmax(q_cls,h · k_h,iᵀ / √d)``; keep the top-``keep`` patches by s, in their
    original order, and feed only those to the LLM. Kept tokens keep their ORIGINAL positions (1-D for
    LLaVA, 3-D mrope for Qwen-VL), so the result equals running the model on those tokens where they
    were; ``positions="compact"`` re-indexes them 0..n as FasterVLM's code does (to reproduce its
    numbers; LLaVA only).

    - ``keep`` (paper: visual_token_num, e.g. 144 = 75 % reduction of 576): a count per image, or a
      ratio in (0, 1] of each image's tokens. Default 0.25.
    - LLaVA-NeXT (AnyRes): each crop is scored by its own [CLS] row and the scores are packed like the
      features (base crop, unpadded grid, one newline per grid row). The budget counts the image's
      patch tokens; base crop and grid share it in proportion to their token counts (FasterVLM keeps
      the same k in each of its 5 fixed crops, which is the same rule for equal crops); newline tokens
      are always kept, as in FasterVLM's spatial_unpad branch, and not counted.
    - ``score``: ``auto`` = the family's default: ``cls`` for CLIP towers; Qwen-VL has no [CLS], so
      ``received`` = mean attention each patch receives in the last full-attention vision block, pooled
      over the 2x2 merge unit (the author's recommendation). Ablations: ``received`` on CLIP too,
      ``norm`` (L2 norm of the visual token entering the LLM), ``random`` (seeded), ``uniform``
      (evenly spaced in token order) — all on the same budget.
    """

    name = "cls-prune"
    keep: int | float = param(0.25, low=0, low_open=True, doc="tokens kept per image: count, or ratio in (0, 1]")
    score: str = param("auto", choices=SCORES, doc="token score")
    positions: str = param("original", choices=("original", "compact"), doc="RoPE positions of kept tokens")
    seed: int = param(0, low=0, doc="seed of score=random")

    def __post_init__(self):
        super().__post_init__()
        check_keep(self.name, self.keep)
        self._pending: list[torch.Tensor] | None = None
        self._dropper: Dropper | None = None
        self._kind = self.score

    def attach(self, ctx) -> None:
        adapter = ctx.adapter
        self._kind = adapter.vision_scores[0] if self.score == "auto" else self.score
        if self._kind in ("cls", "received"):
            adapter.install_vision_scores(ctx.installed, self._kind, self._on_scores)
        elif adapter.family == "llava_next":  # the packed layout (base / grid / newlines) comes with the scores
            adapter.install_vision_scores(ctx.installed, "cls", self._on_scores)
        if self.positions == "compact" and adapter.family.startswith("qwen"):
            raise ValueError("cls-prune: positions='compact' reproduces FasterVLM's LLaVA code (1-D positions); "
                             f"{adapter.family} uses 3-D mrope positions: use positions='original'")
        self._dropper = Dropper(ctx, 0, decide=self._decide, compact_positions=self.positions == "compact")

    def conflicts_with(self, other: Intervention) -> str | None:
        if other.name in ("fastv", "vte"):
            return "both drop visual tokens from the LLM; use one of them"
        return None

    def _on_scores(self, scores: list[torch.Tensor], groups: list[torch.Tensor] | None) -> None:
        self._pending = (scores, groups)

    def _decide(self, state, embeds: torch.Tensor) -> torch.Tensor | None:
        spans = state.spans
        pending, self._pending = self._pending, None
        if not spans.has_images():
            return None
        keep = torch.zeros_like(spans.visual)
        images = [(b, pos) for b in range(spans.batch_size) for pos in spans.images(b)]
        if pending is not None and len(pending[0]) != len(images):
            raise RuntimeError(f"cls-prune: got vision scores for {len(pending[0])} images but the prompt holds "
                               f"{len(images)}")
        gen = torch.Generator().manual_seed(self.seed)
        grouped = pending is not None and pending[1] is not None
        for i, (b, pos) in enumerate(images):
            n = len(pos)
            groups = pending[1][i] if grouped else torch.zeros(n, dtype=torch.long)
            if self._kind == "random":
                s = torch.rand(n, generator=gen)
            elif self._kind == "norm":
                s = embeds[b, pos.to(embeds.device)].float().norm(dim=-1).cpu()
            elif self._kind == "uniform":
                s = None
            else:
                s = pending[0][i].float().cpu()
            chosen = _select(s, groups, self.keep, f"image {i} of sample {b}")
            keep[b, pos[chosen.to(pos.device)]] = True
        return keep

    def stats(self) -> dict[str, Any]:
        return {"score": self._kind, **(self._dropper.stats() if self._dropper else {})}
