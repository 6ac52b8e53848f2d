"""``sparsevlm``: SparseVLM — text raters rank the visual tokens in stages; dropped tokens are recycled."""

from __future__ import annotations

import dataclasses

import torch

from attnkit.interventions.base import param, register
from attnkit.interventions.pruning import Pruner, SampleView, Selection, check_budget

# the released v1.5 budgets after each pruning layer for LLaVA-1.5's 576 tokens (a 32-layer average of 192/...)
BUDGETS = {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)}
LAYERS = (2, 6, 15)          # of 32: pruning after these layers (v1.5); v1 (adaptive) adds 19


@register
@dataclasses.dataclass
class SparseVLM(Pruner):
    """SparseVLM ("Visual Token Sparsification for Efficient Vision-Language Model Inference", ICML 2025).

    Raters (once, from the LLM's input embeddings): ``R = softmax_T(V Tᵀ)`` over the text T after the image,
    ``r = mean_V R``; raters = {t : r_t > mean(r)}. After each pruning layer ℓ (layer ℓ itself runs on all
    current tokens), ``s_j = mean_{t∈raters} mean_h P_ℓ[h, t, j]`` (softmax over all keys) and the top
    ``B_ℓ`` visual tokens stay (at most N_cur − 1). Recycling: of the dropped, the top ``⌊0.3·n_del⌋+1`` by s
    are clustered by DPC-kNN into ``⌊n/10⌋+1`` clusters (distance ‖x_i−x_j‖/√D, k = clusters neighbours,
    density exp(−mean d²), centres = top δ·density) and each cluster becomes one token, the mean of its
    members' states, placed at its centre's position (the code appends them after the kept visual tokens).

    - ``keep``: LLaVA-1.5's setting 192 / 128 / 96 / 64, i.e. the released v1.5 budgets B_ℓ after layers
      2, 6, 15 (e.g. 192 -> 300, 200, 110 of 576; their 32-layer average is the setting), scaled to the
      image's N; another count k uses the 192 schedule's shape scaled by k/192; a ratio r means r·576.
    - ``adaptive=true``: the arXiv v1 rule instead, ``B_ℓ = min(⌊rank(P_ℓ[raters, V])·scale⌋, N_cur − 1)``
      at layers 2, 6, 15, 19 (``keep`` unused).
    - Layers scale with depth (``round(ℓ·n/32)``). Departures: kept and recycled tokens keep their ORIGINAL
      positions (v1.5 renumbers them); the clustering's 1e-6 random tie-break is left out (deterministic);
      batches of any size (the code runs batch 1).
    - Qwen3-VL: a recycled token's DeepStack rows of the levels still to be added are its cluster's mean too.
    """

    name = "sparsevlm"
    keep: int | float = param(192, low=0, low_open=True, doc="setting (192/128/96/64 of 576) or ratio")
    adaptive: bool = param(False, doc="v1's rank-adaptive budgets instead of v1.5's schedule")
    scale: float = param(13.5, low=0, low_open=True, doc="adaptive: tokens per unit of rank")
    recycle: bool = param(True, doc="merge the best dropped tokens into a few (token recycling)")
    inside = frozenset({"attention"})

    def __post_init__(self):
        super().__post_init__()
        check_budget(self.name, "keep", self.keep)

    def attach(self, ctx) -> None:
        super().attach(ctx)
        ctx.installed.forward_pre_hook(ctx.adapter.language_model, self._raters_from_embeddings, with_kwargs=True)
        self._raters: list[torch.Tensor] = []

    def stages(self, num_layers: int) -> tuple[int, ...]:
        base = LAYERS + ((19,) if self.adaptive else ())
        return tuple(sorted({min(num_layers - 1, round(layer * num_layers / 32) + 1) for layer in base}))

    def _raters_from_embeddings(self, module, args, kwargs):
        spans, embeds = self._ctx.state.spans, kwargs.get("inputs_embeds")
        if self._ctx.state.step != 0 or spans is None or embeds is None or embeds.shape[1] != spans.length:
            return
        text = spans.text_after_image().to(embeds.device)
        self._raters = []
        for b in range(spans.batch_size):
            v, t = embeds[b, spans.visual[b].to(embeds.device)].float(), embeds[b, text[b]].float()
            r = torch.softmax(v @ t.T, dim=-1).mean(0) if len(v) and len(t) else torch.zeros(0)
            self._raters.append(text[b].nonzero().squeeze(1)[r > r.mean()].cpu())

    def budget(self, stage: int, n0: int) -> int:
        keep = self.keep * 576 if isinstance(self.keep, float) else self.keep
        schedule = BUDGETS.get(keep) or tuple(b * keep / 192 for b in BUDGETS[192])
        return max(1, round(schedule[stage] * n0 / 576))

    def select(self, view: SampleView) -> Selection | None:
        plan = self._ctx.state.plan_at(view.layer - 1)
        raters = self._raters[view.sample]
        raters = raters if plan is None else plan.slots_of(raters, view.sample)
        if len(raters) == 0:
            return None
        probs = view.attention(raters).mean(0)                                # [raters, L]
        score = probs.mean(0)[view.slots.to(probs.device)].cpu()
        stage = self.stages(self._ctx.adapter.num_layers).index(view.layer)
        if self.adaptive:
            rank = int(torch.linalg.matrix_rank(probs[:, view.slots.to(probs.device)].float()))
            if rank >= view.n:
                return None                  # v1: a full-rank block prunes nothing at this layer
            n_keep = rank * self.scale
        else:
            n_keep = self.budget(stage, self._ctx.state.spans.counts()[view.sample])
        n_keep = min(int(n_keep), view.n - 1)
        if n_keep <= 0 or n_keep >= view.n:
            return None
        kept = torch.topk(score, n_keep).indices
        if not self.recycle:
            return Selection(kept)
        dropped = torch.ones(view.n, dtype=torch.bool)
        dropped[kept] = False
        dropped = dropped.nonzero().squeeze(1)
        best = dropped[torch.topk(score[dropped], len(dropped) * 3 // 10 + 1).indices]
        centres, rows, w = recycle(view.hidden[best.to(view.hidden.device)].float(), len(best) // 10 + 1,
                                   with_weights=True)
        weights = torch.zeros(len(centres), view.n)
        weights[:, best] = w
        return Selection(torch.cat([kept, best[centres]]), rows.to(view.hidden), weights)


def recycle(x: torch.Tensor, clusters: int, with_weights: bool = False):
    """DPC-kNN clustering of the rows ``x`` [n, D] into ``clusters``: centre indices [c] and each cluster's mean;
    ``with_weights`` adds the means as weights [c, n] (1/|cluster| on its members)."""
    n = x.shape[0]
    c = min(clusters, n)
    dist = torch.cdist(x[None], x[None])[0] / x.shape[1] ** 0.5
    knn = torch.topk(dist, min(c, n), dim=-1, largest=False).values
    density = torch.exp(-(knn**2).mean(-1))
    higher = density[None, :] > density[:, None]
    delta = torch.where(higher, dist, dist.max()).min(-1).values
    centres = torch.topk(delta * density, c).indices
    assign = dist[:, centres].argmin(-1)
    assign[centres] = torch.arange(c, device=x.device)
    sums = torch.zeros(c, x.shape[1], device=x.device).index_add_(0, assign, x)
    counts = torch.bincount(assign, minlength=c).clamp(min=1)[:, None].to(x)
    if not with_weights:
        return centres.cpu(), sums / counts
    weights = torch.zeros(c, n)
    weights[assign.cpu(), torch.arange(n)] = 1.0 / counts[assign, 0].float().cpu()
    return centres.cpu(), sums / counts, weights
