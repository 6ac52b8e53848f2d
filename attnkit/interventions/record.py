"""``record``: how much attention text gives to the image, per layer and head (changes nothing)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from attnkit.hooks.drop import layout_at
from attnkit.interventions.base import Intervention, param, register


@register
@dataclasses.dataclass
class Record(Intervention):
    """Record text→image attention at prefill, aggregated (never the full L×L maps).

    For each recorded layer l, sample b and head h:

    - ``visual_share[l][b, h] = mean_{q ∈ T_b} Σ_{k ∈ V_b} P_lh[q, k]`` — T_b are the text tokens of
      sample b after its first visual token (they can see the image; padding excluded), V_b its
      visual tokens; NaN if T_b is empty.
    - ``last_query[l][b]`` = ``P_lh[q_last, V_b]`` as [H, |V_b|]: what the last prompt token (the one
      that predicts the first answer token) looks at in the image, in visual-token order;
      ``last_query_positions[l][b]`` are the prompt positions of those columns.

    Probabilities are computed as eager attention does, in chunks of query rows; the layer's output
    still comes from the model's own implementation, so recording does not change any logit. With a
    token dropper (``cls-prune``, ``fastv``, ...) each layer is recorded over the tokens it really sees:
    V_b and ``last_query`` then cover the kept visual tokens only, in their order.
    """

    name = "record"
    layers: tuple[int, ...] | None = param(None, low=0, doc="decoder layers to record (default: all)")

    def __post_init__(self):
        super().__post_init__()
        self.visual_share: dict[int, torch.Tensor] = {}
        self.last_query: dict[int, list[torch.Tensor]] = {}
        self.last_query_positions: dict[int, list[torch.Tensor]] = {}   # prompt positions of last_query's columns

    def attention_layers(self, ctx) -> list[int]:
        return list(range(ctx.adapter.num_layers)) if self.layers is None else list(self.layers)

    def reset(self) -> None:
        self.visual_share, self.last_query, self.last_query_positions = {}, {}, {}

    def on_attention(self, call) -> None:
        spans = call.state.spans
        if not call.is_prefill or spans is None or not spans.has_images():
            return
        layout = layout_at(call.state, call.layer_idx)            # after a token dropper: the kept tokens only
        if layout[0].shape[1] != call.q_len or call.q_len != call.kv_len:
            return
        visual = layout[0].to(call.query.device)                 # [B, L] keys (= queries at prefill)
        text = layout[2].to(call.query.device)                   # [B, L] queries
        B, H = call.query.shape[:2]
        total = torch.zeros(B, H, dtype=torch.float32, device=call.query.device)
        last = None
        for rows, p in call.iter_probs():
            share = (p * visual[:, None, None, :].float()).sum(-1)            # [B, H, r]
            total += torch.where(text[:, None, rows], share, 0.0).sum(-1)
            if rows.stop == call.q_len:
                last = p[:, :, -1, :]                                          # [B, H, kv]
        n_text = text.sum(-1).float()[:, None]
        self.visual_share[call.layer_idx] = (total / n_text).cpu()
        self.last_query[call.layer_idx] = [last[b][:, visual[b]].cpu() for b in range(B)]
        plan = call.state.plan_at(call.layer_idx)
        index = torch.arange(visual.shape[1]).expand(B, -1) if plan is None else plan.index.cpu()
        self.last_query_positions[call.layer_idx] = [index[b][visual[b].cpu()] for b in range(B)]

    def stats(self) -> dict[str, Any]:
        if not self.visual_share:
            return {"layers": [], "note": "nothing recorded (no prefill with images yet)"}
        return {"layers": sorted(self.visual_share),
                "visual_share": {l: v.tolist() for l, v in sorted(self.visual_share.items())}}
