"""``pai``: Paying More Attention to Image (baseline) — raise the last query row's logits on image keys."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from attnkit.interventions.base import Intervention, param, register


def visual_keys(spans, kv_len: int, device: torch.device) -> torch.Tensor | None:
    """[B, kv] True on the key columns that hold visual tokens (prompt positions; later columns are generated text).

    None when the spans do not describe this call (no spans, or more prompt positions than keys).
    """
    if spans is None or spans.length > kv_len:
        return None
    visual = spans.visual.to(device)
    if kv_len > spans.length:
        visual = torch.nn.functional.pad(visual, (0, kv_len - spans.length), value=False)
    return visual


@register
@dataclasses.dataclass
class PAI(Intervention):
    """PAI (Liu et al., "Paying More Attention to Image", ECCV 2024), attention amplification only.

    In layers ``[start_layer, end_layer)``, all heads, the **last query row** only (the row that predicts
    the next token: the last prompt row at prefill, the new row at each decode step), pre-softmax::

        z[i_last, j] <- z[i_last, j] + alpha * |z[i_last, j]|      for image keys j,

    other rows and keys untouched, then the usual softmax. ``alpha`` (paper: alpha, default 0.2);
    layers default to the released code's ``[2, 32)`` for 32 layers, i.e. 2 ... L-1 for any depth.
    The paper's optional logit refinement (CFG with a text-only branch) is not part of this baseline.

    Needs: visual positions (``call.state.spans``, per sample) and the layer's logits, so the chosen
    layers run eager attention (prefill: all rows in chunks; decode: one row).
    Identity: ``alpha=0``.
    """

    name = "pai"
    alpha: float = param(0.2, low=0.0, doc="amplification (paper: alpha)")
    start_layer: int = param(2, low=0, doc="first amplified layer (paper code: start_layer)")
    end_layer: int | None = param(None, low=1, doc="one past the last amplified layer (default: the layer count)")

    def __post_init__(self):
        super().__post_init__()
        self._calls = 0

    def attention_layers(self, ctx) -> list[int]:
        end = ctx.adapter.num_layers if self.end_layer is None else self.end_layer
        if end > ctx.adapter.num_layers or self.start_layer >= end:
            raise ValueError(f"pai: layers [{self.start_layer}, {end}) do not fit this model's "
                             f"{ctx.adapter.num_layers} layers; use 0 <= start_layer < end_layer <= "
                             f"{ctx.adapter.num_layers}")
        return list(range(self.start_layer, end))

    def reset(self) -> None:
        self._calls = 0

    def on_attention(self, call) -> None:
        visual = visual_keys(call.state.spans, call.kv_len, call.query.device)
        if visual is None or not bool(visual.any()):
            return
        last = call.q_len - 1
        image = visual[:, None, None, :]  # [B, 1, 1, kv]
        self._calls += 1

        def amplify(rows: slice, scores: torch.Tensor) -> torch.Tensor:
            if not rows.start <= last < rows.stop:
                return scores
            i = last - rows.start
            z = scores[:, :, i:i + 1]
            scores = scores.clone()
            scores[:, :, i:i + 1] = torch.where(image, z + self.alpha * z.abs(), z)
            return scores

        call.edit_scores(amplify)

    def stats(self) -> dict[str, Any]:
        return {"amplified_calls": self._calls}
