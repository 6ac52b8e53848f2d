"""``dart``: DART — keep the visual tokens least duplicated by a few pivot tokens, at layer K."""

from __future__ import annotations

import dataclasses

import torch

from attnkit.interventions.base import param, register
from attnkit.interventions.pruning import Pruner, SampleView, count


@register
@dataclasses.dataclass
class DART(Pruner):
    """DART ("Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More",
    2025): duplication-aware pruning inside the LLM, no attention maps needed.

    Before layer K, per sample, with k_i the keys of layer K-1 (post-RoPE, all heads concatenated) and
    h_i = Norm(output of layer K-1) (the LLM's final norm, as the released code):

    - pivots: ``P_img = topk_{i∈V} ‖k_i‖₁`` (``pivots``) and ``P_txt = topk_{i∈T} ‖k_i‖₁`` (``text_pivots``;
      T = the text after the image);
    - ``per = ⌊keep / (pivots + text_pivots)⌋``; for each pivot p in turn, the ``per`` still-free visual tokens
      with the LOWEST ``cos(h_p, h_j)`` are kept and leave the free set;
    - kept = P_img ∪ those: ``pivots + (pivots + text_pivots)·per`` tokens (the code's count: 4 + 8·⌊128/8⌋
      = 132 for "128"; ``stats()`` reports the real count). The rest leave states, KV cache and masks of
      layers >= K, kept tokens keep their original positions (as the code's gapped ``position_ids``).

    Defaults are the released scripts' (K = 2, pivots 4 + 4, ``keep`` = ``max_num_trunction`` = 128); a
    ratio r gives ``per = ⌊N·r / (pivots + text_pivots)⌋`` (the Qwen code's ``int(N(1-ratio)/8)``); the
    released LLaVA-NeXT runs use ``keep=320`` (``retain_token_num_for_llava_next``). The code iterates pivots
    in Python ``set`` order (hash order, which changes the greedy result); here in prompt order, image first.
    """

    name = "dart"
    k: int = param(2, low=1, doc="first layer without the dropped tokens (paper: pruned_layer)")
    keep: int | float = param(128, low=0, low_open=True, doc="budget: count (max_num_trunction) or ratio")
    pivots: int = param(4, low=1, doc="image pivot tokens (pivot_image_token)")
    text_pivots: int = param(4, low=0, doc="text pivot tokens (pivot_text_token)")
    inside = frozenset({"keys"})
    budget_fields = ("keep",)
    stage_field = "k"

    def stages(self, num_layers: int) -> tuple[int, ...]:
        return (self.k,)

    def select(self, view: SampleView) -> torch.Tensor:
        if view.keys is None:
            raise RuntimeError("dart: layer k-1's keys were not recorded for this prefill (a cached prefix?)")
        budget = count(self.keep, view.n, "keep", f"sample {view.sample}")
        keys = view.keys.float()                                              # [H_kv, L, d]
        norms = keys.abs().sum(-1).sum(0).cpu()                               # ‖k_i‖₁ over all heads: [L]
        text = view.text.cpu().nonzero().squeeze(1)
        img_pivots = torch.topk(norms[view.slots], min(self.pivots, view.n)).indices.sort().values
        txt_pivots = text[torch.topk(norms[text], min(self.text_pivots, len(text))).indices].sort().values
        per = (int(view.n * self.keep) if isinstance(self.keep, float) else budget) // (self.pivots + self.text_pivots)
        h = view.final_norm(view.hidden_all).float()
        h = h / h.norm(dim=-1, keepdim=True)
        visual_h = h[view.slots.to(h.device)]
        free = torch.ones(view.n, dtype=torch.bool)
        free[img_pivots] = False
        kept = [img_pivots]
        for pivot in torch.cat([visual_h[img_pivots.to(h.device)], h[txt_pivots.to(h.device)]]):
            candidates = free.nonzero().squeeze(1)
            if per == 0 or len(candidates) == 0:
                break
            similarity = (visual_h[candidates.to(h.device)] @ pivot).cpu()
            chosen = candidates[torch.topk(-similarity, min(per, len(candidates))).indices]
            free[chosen] = False
            kept.append(chosen)
        return torch.cat(kept)
