"""``fastv``: FastV — after layer K, drop the visual tokens that receive least attention (baseline)."""

from __future__ import annotations

import dataclasses

import torch

from attnkit.interventions.base import param, register
from attnkit.interventions.pruning import Pruner, SampleView, count


@register
@dataclasses.dataclass
class FastV(Pruner):
    """FastV ("An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024).

    Layers 0..K-1 run on the full sequence. From the attention probabilities A of layer K-1 (heads
    averaged), visual token j scores ``a_j = Ā[last, j]`` (``rank="last"``, the released code: the last
    prompt token's row — each sample's last real token, so right padding is handled) or
    ``a_j = mean_q Ā[q, j]`` over the valid query tokens (``rank="mean"``, the paper); the top-``keep``
    visual tokens of each sample stay, the others are removed from the hidden states, the KV cache and
    the masks of layers >= K, for the rest of prefill and every decode step. Kept tokens keep their
    original positions.

    - ``k`` (paper: K, default 2): first layer (0-based) that runs without the dropped tokens.
    - ``keep`` (paper: 1 - R, default 0.5): a count per sample, or a ratio in (0, 1] of its visual tokens.
    """

    name = "fastv"
    k: int = param(2, low=1, doc="first layer without the dropped tokens (paper: K)")
    keep: int | float = param(0.5, low=0, low_open=True, doc="visual tokens kept per sample: count, or ratio")
    rank: str = param("last", choices=("last", "mean"), doc="attention row(s) that rank tokens: code / paper")
    inside = frozenset({"attention"})
    budget_fields = ("keep",)
    stage_field = "k"

    def stages(self, num_layers: int) -> tuple[int, ...]:
        return (self.k,)

    def select(self, view: SampleView) -> torch.Tensor:
        if self.rank == "last":
            received = view.last_attention()
        else:
            probs = view.attention(view.valid.nonzero().squeeze(1)).mean(0)       # [valid rows, L]
            received = probs.mean(0)[view.slots.to(probs.device)]
        k = count(self.keep, view.n, "keep", f"sample {view.sample}")
        return torch.topk(received, k).indices
