"""``pai``: Paying More Attention to Image (baseline) — raise the last query row's logits on image keys."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from attnkit.interventions.base import Intervention, param, register


@dataclasses.dataclass
class PromptLayout:
    """The prompt as one layer's keys see it: [B, P] masks over its P prompt columns (generated columns follow).

    Without token dropping P is the prompt length and the masks are the visual spans'. When a dropper
    publishes its plan as ``state.keep_plan`` (``index`` [B, Lk] kept prompt positions, ``slot_valid``,
    ``from_layer``), layers from ``from_layer`` on see only the kept positions, in that order.
    """

    visual: torch.Tensor
    valid: torch.Tensor
    text_after_image: torch.Tensor

    @property
    def length(self) -> int:
        return self.visual.shape[1]

    def key_offset(self, kv_len: int, step: int) -> int:
        """Prompt columns before a call's first key column. The keys are the last ``kv_len`` positions of the
        sequence so far (prompt + ``step`` generated tokens): all of them, except in a decode step of a
        sliding-window layer whose cache keeps only the window (Gemma 3's local layers)."""
        return max(self.length + step - kv_len, 0) if step > 0 else 0

    def keys(self, kv_len: int, mask: torch.Tensor, step: int = 0) -> torch.Tensor | None:
        """``mask`` [B, P] over the call's ``kv_len`` key columns (see :meth:`key_offset`), False on generated
        tokens; None if the call has fewer columns than the prompt (an unknown layout)."""
        offset = self.key_offset(kv_len, step)
        visible = mask[:, min(offset, self.length):]
        if kv_len < visible.shape[1] or (offset == 0 and kv_len < self.length):
            return None
        return torch.nn.functional.pad(visible, (0, kv_len - visible.shape[1]), value=False)


def prompt_layout(state, layer_idx: int, device: torch.device) -> PromptLayout | None:
    """The :class:`PromptLayout` of decoder layer ``layer_idx`` for the current request (None: no spans)."""
    spans = state.spans
    if spans is None:
        return None
    visual, valid, text = spans.visual, spans.valid, spans.text_after_image()
    plan = getattr(state, "keep_plan", None)
    if plan is not None and layer_idx >= plan.from_layer:
        index, slot = plan.index.to(visual.device), plan.slot_valid.to(visual.device)
        visual, valid, text = (m.gather(1, index) & slot for m in (visual, valid, text))
    return PromptLayout(visual.to(device), valid.to(device), text.to(device))


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
    layers run eager attention for that row only; the other prefill rows keep the model's implementation.
    Identity: ``alpha=0``.
    """

    name = "pai"
    alpha: float = param(0.2, low=0.0, doc="amplification (paper: alpha)")
    start_layer: int = param(2, low=0, doc="first amplified layer (paper code: start_layer)")
    end_layer: int | None = param(None, low=1, doc="one past the last amplified layer (default: the layer count)")

    def __post_init__(self):
        super().__post_init__()
        self._calls = 0
        self._layouts: dict[tuple, PromptLayout | None] = {}

    def attention_layers(self, ctx) -> list[int]:
        end = ctx.adapter.num_layers if self.end_layer is None else self.end_layer
        if end > ctx.adapter.num_layers or self.start_layer >= end:
            raise ValueError(f"pai: layers [{self.start_layer}, {end}) do not fit this model's "
                             f"{ctx.adapter.num_layers} layers; use 0 <= start_layer < end_layer <= "
                             f"{ctx.adapter.num_layers}")
        return list(range(self.start_layer, end))

    def reset(self) -> None:
        self._calls, self._layouts = 0, {}

    def on_attention(self, call) -> None:
        key = (call.layer_idx, id(call.state.spans), id(getattr(call.state, "keep_plan", None)))
        if key not in self._layouts:  # once per request and layer: decode steps need no host synchronisation
            layout = prompt_layout(call.state, call.layer_idx, call.query.device)
            self._layouts[key] = layout if layout is not None and bool(layout.visual.any()) else None
        layout = self._layouts[key]
        visual = None if layout is None else layout.keys(call.kv_len, layout.visual, call.state.step)
        if visual is None:
            return
        last = call.q_len - 1
        image = visual[:, None, None, :]  # [B, 1, 1, kv]
        self._calls += 1

        def amplify(rows: slice, scores: torch.Tensor) -> torch.Tensor:
            if not rows.start <= last < rows.stop:
                return scores
            i = last - rows.start
            z = scores[:, :, i:i + 1]
            amplified = torch.where(image, z + self.alpha * z.abs(), z)
            if scores.shape[2] == 1:   # the usual case: only the last row runs eagerly
                return amplified
            scores = scores.clone()
            scores[:, :, i:i + 1] = amplified
            return scores

        call.edit_scores(amplify, rows=slice(last, last + 1))

    def stats(self) -> dict[str, Any]:
        return {"amplified_calls": self._calls}
