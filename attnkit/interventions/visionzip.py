"""``visionzip``: VisionZip — dominant tokens by [CLS] attention plus contextual tokens merged by key similarity."""

from __future__ import annotations

import dataclasses

import torch

from attnkit.interventions.base import param, register
from attnkit.interventions.pruning import ImageView, Pruner, Selection, count, topk_in_groups


@register
@dataclasses.dataclass
class VisionZip(Pruner):
    """VisionZip ("Longer is Better but Not Necessary in Vision Language Models", CVPR 2025), before the LLM.

    At the vision layer whose output feeds the LLM (CLIP layer -2), per image:

    - dominant: ``D = topk_j s_j`` with ``s_j = Σ_h A_h[cls, j]`` (the code's head sum; a head mean here, the
      same ranking; Qwen-VL has no [CLS]: the mean attention each token receives, pooled over the 2x2 merge
      unit, as for ``cls-prune``);
    - contextual: the remaining M tokens in order; targets ``t = 0, step, 2·step, …`` (``step = ⌊M/C⌋``,
      the first C); every other remaining token j joins ``argmax_t cos(k̄_j, k̄_t)`` (k̄: that layer's keys,
      head mean); ``c_t = X_t + mean_{j→t} X_j`` on the layer's output rows X (the projector's input),
      then projected. A contextual token sits at its target's position.

    Kept tokens keep their ORIGINAL positions (VisionZip's LLaVA code renumbers the shorter sequence).
    ``dominant``/``contextual`` count patches (paper defaults 54 + 10 for 64 tokens; 108 + 20 for 128;
    162 + 30 for 192). The released code counts the [CLS] state inside ``dominant`` (54 = 53 patches +
    [CLS], fed to the projector); HF LLaVA never feeds [CLS], so ``visionzip:contextual=0,dominant=D``
    keeps exactly what ``cls-prune:keep=D`` keeps. Merging uses ``target + mean(members)`` as the code
    does (not a mean over target ∪ members). LLaVA-NeXT: here dominant tokens are shared between the
    base crop and the grid as ``cls-prune``'s shared budget and contextual targets are taken over the whole
    image's remaining tokens; the released code instead runs VisionZip on each 336² crop (D + C per crop,
    merging within the crop, no unpadding) and only places the contextual tokens together at the end.
    Qwen-VL: keys are taken before the rotary embedding and pooled over the merge unit; merging acts
    on the merger's input units. Qwen3-VL: a contextual token's DeepStack rows are ``ds_t + mean_{j→t} ds_j``
    of each level's rows (the same weights, :attr:`Selection.weights`).
    """

    name = "visionzip"
    dominant: int | float = param(54, low=0, low_open=True, doc="dominant tokens per image: count or ratio")
    contextual: int | float = param(10, low=0, doc="contextual (merged) tokens per image: count or ratio")
    vision = frozenset({"score", "keys", "features"})
    budget_fields = ("dominant", "contextual")

    def check(self, ctx) -> None:
        fixed = ctx.adapter.fixed_visual_tokens
        if fixed is not None and isinstance(self.dominant, int) and isinstance(self.contextual, int) \
                and self.dominant + self.contextual > fixed:
            raise ValueError(f"visionzip: dominant + contextual = {self.dominant + self.contextual} exceeds the "
                             f"{fixed} visual tokens every image has on {ctx.adapter.family}")

    def select(self, view: ImageView) -> Selection:
        what = f"image {view.image} of the batch (sample {view.sample})"
        d = count(self.dominant, view.n, "dominant", what)
        dominant = topk_in_groups(view.score, view.group, d)
        rest = torch.ones(view.n, dtype=torch.bool)
        rest[dominant] = False
        rest = rest.nonzero().squeeze(1)
        c = 0 if self.contextual == 0 else min(count(self.contextual, view.n, "contextual", what), len(rest))
        if c == 0:
            return Selection(dominant)
        targets, merged, w = contextual_tokens(view.keys[rest].float(), view.features[rest], c, with_weights=True)
        weights = torch.zeros(c, view.n)
        weights[:, rest] = w
        return Selection(torch.cat([dominant, rest[targets]]), view.project(merged).to(view.embeds), weights)


def contextual_tokens(keys: torch.Tensor, features: torch.Tensor, c: int, with_weights: bool = False):
    """VisionZip's merge of M remaining tokens into ``c``: returns the target indices [c] and the merged rows
    ``X_t + mean_{j→t} X_j`` [c, ...] (in float32); members are assigned by cosine similarity of ``keys``.
    ``with_weights`` adds the merge as weights [c, M] (1 on the target, 1/|members| on each member)."""
    m = keys.shape[0]
    step = max(1, m // c)
    targets = torch.arange(0, m, step)[:c]
    is_target = torch.zeros(m, dtype=torch.bool)
    is_target[targets] = True
    members = (~is_target).nonzero().squeeze(1)
    unit = keys / keys.norm(dim=-1, keepdim=True)
    assign = (unit[members] @ unit[targets].T).argmax(-1).cpu()             # [members] -> target slot
    flat = features.float().reshape(m, -1)
    sums = torch.zeros(c, flat.shape[1]).index_add_(0, assign, flat[members].cpu())
    counts = torch.bincount(assign, minlength=c).clamp(min=1)[:, None]
    merged = flat[targets].cpu() + sums / counts
    merged = merged.view(c, *features.shape[1:]).to(features.device)
    if not with_weights:
        return targets, merged
    weights = torch.zeros(c, m)
    weights[torch.arange(c), targets] = 1.0
    weights[assign, members] = 1.0 / counts[assign, 0].float()
    return targets, merged, weights
