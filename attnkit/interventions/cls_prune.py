"""``cls-prune``: FasterVLM — keep the visual tokens with most [CLS] attention, drop the rest before the LLM."""

from __future__ import annotations

import dataclasses

import torch

from attnkit.interventions.base import param, register
from attnkit.interventions.pruning import ImageView, Pruner, count, topk_in_groups

SCORES = ("auto", "cls", "received", "norm", "random", "uniform")


@register
@dataclasses.dataclass
class ClsPrune(Pruner):
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
      features (base crop, unpadded grid, one newline per grid row; newlines are always kept and not
      counted). ``budget="shared"`` splits ``keep`` between the base crop and the grid in proportion to
      their token counts (the grid's share by top score over all its crops, so crops may get unequal
      shares); ``budget="per_crop"`` keeps the same k = keep / crops in every crop, as FasterVLM's code
      does (it prunes each crop before packing; an unpadded crop smaller than k keeps all its tokens).
    - LLaVA-OneVision and InternVL: the same rule per image. OneVision: base crop vs the AnyRes-max grid (a
      downsampled grid token belongs to the crop with the largest bilinear weight), row newlines always kept;
      InternVL: the thumbnail (group 0) vs the tiles, ``per_crop`` = the same k in every tile and the thumbnail.
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
    budget: str = param("shared", choices=("shared", "per_crop"), doc="LLaVA-NeXT: budget over crops")
    seed: int = param(0, low=0, doc="seed of score=random")
    budget_fields = ("keep",)

    @property
    def vision(self) -> frozenset[str]:
        return frozenset({"score"}) if self.score in ("auto", "cls", "received") else frozenset()

    def score_kind(self, adapter) -> str:
        return adapter.vision_scores[0] if self.score in ("auto", "norm", "random", "uniform") else self.score

    def check(self, ctx) -> None:
        if self.positions == "compact" and ctx.adapter.family.startswith("qwen"):
            raise ValueError("cls-prune: positions='compact' reproduces FasterVLM's LLaVA code (1-D positions); "
                             f"{ctx.adapter.family} uses 3-D mrope positions: use positions='original'")
        self._gen = None

    def positions_compact(self) -> bool:
        return self.positions == "compact"

    def select(self, view: ImageView) -> torch.Tensor:
        if view.image == 0 or self._gen is None:
            self._gen = torch.Generator().manual_seed(self.seed)
        k = count(self.keep, view.n, "keep", f"image {view.image} of the batch (sample {view.sample})")
        if self.score == "random":
            s = torch.rand(view.n, generator=self._gen)
        elif self.score == "norm":
            s = view.embeds.float().norm(dim=-1).cpu()
        elif self.score == "uniform":
            s = None
        else:
            s = view.score
        return topk_in_groups(s, view.group, k, self.budget)

    def extra_stats(self) -> dict:
        kind = self.score if self.score != "auto" else (self._ctx.adapter.vision_scores[0] if self._ctx else "auto")
        return {"score": kind}
