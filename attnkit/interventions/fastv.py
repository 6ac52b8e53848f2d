"""``fastv``: FastV — after layer K, drop the visual tokens that receive least attention (baseline)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from attnkit.hooks.attention import attention_probs
from attnkit.hooks.drop import Dropper
from attnkit.interventions.base import Intervention, param, register
from attnkit.interventions.cls_prune import check_keep, keep_count


@register
@dataclasses.dataclass
class FastV(Intervention):
    """FastV ("An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024).

    Layers 0..K-1 run on the full sequence. From the attention probabilities A of layer K-1 (heads
    averaged), visual token j scores ``a_j = Ā[last, j]`` (``rank="last"``, the released code: the last
    prompt token's row) or ``a_j = mean_q Ā[q, j]`` over the valid query tokens (``rank="mean"``, the
    paper); the top-``keep`` visual tokens of each sample stay, the others are removed from the hidden
    states, the KV cache and the masks of layers >= K, for the rest of prefill and every decode step.
    Kept tokens keep their original positions.

    - ``k`` (paper: K, default 2): first layer (0-based) that runs without the dropped tokens.
    - ``keep`` (paper: 1 - R, default 0.5): a count per sample, or a ratio in (0, 1] of its visual tokens.
    """

    name = "fastv"
    k: int = param(2, low=1, doc="first layer without the dropped tokens (paper: K)")
    keep: int | float = param(0.5, low=0, low_open=True, doc="visual tokens kept per sample: count, or ratio")
    rank: str = param("last", choices=("last", "mean"), doc="attention row(s) that rank tokens: code / paper")

    def __post_init__(self):
        super().__post_init__()
        check_keep(self.name, self.keep)
        self._dropper: Dropper | None = None

    def attach(self, ctx) -> None:
        if self.k >= ctx.adapter.num_layers:
            raise ValueError(f"fastv: k={self.k} is out of range; this model has layers 0..{ctx.adapter.num_layers - 1}"
                             f", so use 1 <= k <= {ctx.adapter.num_layers - 1}")
        self._dropper = Dropper(ctx, self.k)

    def attention_layers(self, ctx) -> list[int]:
        return [self.k - 1]

    def conflicts_with(self, other: Intervention) -> str | None:
        if other.name in ("cls-prune", "vte"):
            return "both drop visual tokens from the LLM; use one of them"
        return None

    def on_attention(self, call) -> None:
        spans = call.state.spans
        if not call.is_prefill or spans is None or call.q_len != spans.length or not spans.has_images():
            return
        if self.rank == "last":
            q = call.q_len
            received = attention_probs(call.query[:, :, -1:], call.key, call.mask, call.scaling,
                                       row_offset=q - 1, q_len=q)[:, :, 0]
        else:
            valid = spans.valid.to(call.query.device)
            received = torch.zeros(call.query.shape[:2] + (call.kv_len,), device=call.query.device)
            for rows, p in call.iter_probs():
                received += torch.where(valid[:, None, rows, None], p, 0.0).sum(2)
            received /= valid.sum(1).float()[:, None, None]
        received = received.mean(1)                                                   # [B, kv]
        keep = torch.zeros_like(spans.visual)
        for b in range(spans.batch_size):
            pos = spans.positions(b)
            if len(pos) == 0:
                continue
            k = keep_count(self.keep, len(pos), f"sample {b}")
            chosen = torch.topk(received[b, pos.to(received.device)], k).indices
            keep[b, pos[chosen.to(pos.device)]] = True
        self._dropper.set_keep(keep)

    def stats(self) -> dict[str, Any]:
        return self._dropper.stats() if self._dropper else {}
