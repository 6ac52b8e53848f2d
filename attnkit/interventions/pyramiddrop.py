"""``pyramiddrop``: PyramidDrop — in stages, keep a share λ of the visual tokens by the last token's attention."""

from __future__ import annotations

import dataclasses
import math

import torch

from attnkit.interventions.base import param, register
from attnkit.interventions.pruning import Pruner, SampleView


def default_stages(num_layers: int) -> tuple[int, ...]:
    """The paper's boundaries 8, 16, 24 of 32 layers, scaled to ``num_layers`` (within 1..n-1)."""
    return tuple(sorted({min(num_layers - 1, max(1, round(num_layers * s / 32))) for s in (8, 16, 24)}))


@register
@dataclasses.dataclass
class PyramidDrop(Pruner):
    """PyramidDrop ("Accelerating Your Large Vision-Language Models via Pyramid Visual Redundancy
    Reduction", CVPR 2025).

    Stages end at ``layers`` b_1 < b_2 < …; before layer b_s, with h the residual stream entering it:
    ``q = W_q^{(b_s)} Norm^{(b_s)}(h_last)``, ``K = W_k^{(b_s)} Norm^{(b_s)}(h)`` (layer b_s's own norm,
    projections, q/k norms and rotary: what that layer would compute), ``a_j = 1/H Σ_h softmax(q_h K_hᵀ/√d)_j``
    over all keys, and the top ``⌊N₀ λ^s⌋`` visual tokens stay (N₀ = the sample's visual tokens, so shares
    are of the ORIGINAL count, as in the code); h_last = each sample's last real prompt token.

    - ``layers`` (paper: layer_list, default 8, 16, 24 for 32 layers, scaled to other depths);
    - ``ratio`` (paper: λ, default 0.5; image_token_ratio_list = λ, λ², λ³).

    Departures: kept tokens keep their ORIGINAL positions (the code renumbers them 0..n per stage and
    shifts decode positions); GQA and Qwen's q/k norms are handled (the code assumes H_kv = H).
    With one stage the ranking is FastV's at the next layer: ``pyramiddrop:layers=K,ratio=r`` keeps the
    tokens ``fastv:k=K+1,keep=r`` keeps (FastV ranks with layer K's attention and drops after it;
    PyramidDrop computes layer K's ranking first and drops before it), where ⌊N r⌋ = round(N r).
    """

    name = "pyramiddrop"
    layers: tuple[int, ...] | None = param(None, low=1, doc="stage boundaries (default: 8, 16, 24 of 32, scaled)")
    ratio: float = param(0.5, low=0, high=1, low_open=True, doc="share kept per stage (paper: λ)")
    inside = frozenset({"next_attention"})

    def check(self, ctx) -> None:
        n = ctx.adapter.num_layers
        bad = [i for i in (self.layers or ()) if i >= n]
        if bad:
            raise ValueError(f"pyramiddrop: layers {bad} do not exist; this model has layers 0..{n - 1}, so stage "
                             f"boundaries are in 1..{n - 1}")

    def stages(self, num_layers: int) -> tuple[int, ...]:
        return tuple(sorted(set(self.layers))) if self.layers else default_stages(num_layers)

    def select(self, view: SampleView) -> torch.Tensor:
        stage = self.stages(self._ctx.adapter.num_layers).index(view.layer) + 1
        n0 = self._ctx.state.spans.counts()[view.sample]
        keep = min(view.n, max(1, math.floor(n0 * self.ratio**stage)))
        return torch.topk(view.last_attention(), keep).indices
