"""``pai``: Paying More Attention to Image (baseline): image attention of the last query row, then CFG on the logits."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from attnkit.hooks.branch import Branch, last_real, text_only_inputs
from attnkit.hooks.drop import layout_at
from attnkit.interventions.base import Intervention, param, register


@dataclasses.dataclass
class PromptLayout:
    """The prompt as one layer's keys see it: [B, P] masks over its P prompt columns (generated columns follow).

    Without token dropping P is the prompt length and the masks are the visual spans'. When a dropper
    publishes its plans (``state.plan_at(layer)``: ``index`` [B, Lk] kept prompt positions, ``slot_valid``,
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
    layout = layout_at(state, layer_idx)
    return None if layout is None else PromptLayout(*(m.to(device) for m in layout))


@register
@dataclasses.dataclass
class PAI(Intervention):
    """PAI (Liu et al., "Paying More Attention to Image", ECCV 2024): attention step + CFG logit step.

    Attention: in layers ``[start_layer, end_layer)``, all heads, the **last real query row** of each sample
    (the row that predicts the next token: each sample's last unpadded prompt row at prefill, the new row
    at each decode step), pre-softmax ``z[i, j] <- z[i, j] + alpha * |z[i, j]|`` for image keys j. ``alpha``
    (paper: alpha, 0.2); layers default to the released code's ``[2, 32)`` of 32, i.e. 2 ... L-1.

    Logits (``cfg=True``, the paper's commands ``--use-cfg --gamma 1.1``): with s = log_softmax of the
    logits and u = log_softmax of a text-only branch (the prompt with the image removed, run WITHOUT the
    attention step, as the released code's ``use_cfg`` pass)::

        out = gamma * (s - u) + u,      out[s < log(plausibility) + max s] = -inf

    ``gamma`` (paper: gamma, 1.1 as in the README; argparse default 2), ``plausibility`` 0.1 (hard-coded in
    the released CFG.py; ``gamma=1`` returns s uncut, as there). Differences from the released code: the
    branch keeps its own mask and positions (released: no mask, so padded batches break), follows beam
    reordering (released: never reordered), and generate re-normalises ``out`` (released beam search adds
    the unnormalised scores). Cost of ``cfg``: a second forward per step and a second KV cache.
    ``cfg=false`` is the attention step alone; identity: ``alpha=0,cfg=false``. Needs visual positions
    and the layer's logits (eager attention for the last rows only).
    """

    name = "pai"
    alpha: float = param(0.2, low=0.0, doc="amplification (paper: alpha)")
    start_layer: int = param(2, low=0, doc="first amplified layer (paper code: start_layer)")
    end_layer: int | None = param(None, low=1, doc="one past the last amplified layer (default: the layer count)")
    cfg: bool = param(True, doc="the CFG logit step with a text-only branch (doubles the forwards)")
    gamma: float = param(1.1, low=1.0, doc="guidance strength (paper: gamma)")
    plausibility: float = param(0.1, low=0.0, high=1.0, low_open=True, doc="keep tokens with p >= this * max p")

    def __post_init__(self):
        super().__post_init__()
        self._calls, self._branch = 0, None
        self._layouts: dict[tuple, tuple | None] = {}

    def attach(self, ctx) -> None:
        if self.cfg:
            self._branch = Branch(ctx, text_only_inputs, self.guide)

    def conflicts_with(self, other: Intervention) -> str | None:
        if self.cfg and getattr(other, "drops_tokens", False):
            return f"the text-only branch does not follow {other.name}'s token dropping; use pai:cfg=false"
        return None

    def guide(self, logits: torch.Tensor, text_only: torch.Tensor) -> torch.Tensor:
        """The CFG step on [B, V] logits of the full and the text-only input."""
        s = torch.log_softmax(logits, -1)
        if self.gamma == 1:
            return s
        u = torch.log_softmax(text_only, -1)
        out = self.gamma * (s - u) + u
        cut = s < torch.log(torch.tensor(self.plausibility)) + s.max(-1, keepdim=True).values
        return out.masked_fill(cut, float("-inf"))

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
        if self._branch is not None and self._branch.active:
            return   # the text-only branch runs without the attention step
        key = (call.layer_idx, id(call.state.spans), id(call.state.plan_at(call.layer_idx)))
        if key not in self._layouts:  # once per request and layer: decode steps need no host synchronisation
            layout = prompt_layout(call.state, call.layer_idx, call.query.device)
            if layout is None or not bool(layout.visual.any()):
                self._layouts[key] = None
            else:
                last = last_real(layout.valid, layout.length, layout.valid.shape[0], call.query.device)
                self._layouts[key] = (layout, last, int(last.min()), int(last.max()))
        entry = self._layouts[key]
        visual = None if entry is None else entry[0].keys(call.kv_len, entry[0].visual, call.state.step)
        if visual is None:
            return
        layout, last, lo, hi = entry
        if call.q_len != layout.length:        # decode (or a partial prompt): the last row predicts
            last, lo, hi = None, call.q_len - 1, call.q_len - 1
        image = visual[:, None, None, :]  # [B, 1, 1, kv]
        self._calls += 1

        def amplify(rows: slice, scores: torch.Tensor) -> torch.Tensor:
            # each sample's own last real row (right padding: they differ); other rows pass through
            row = torch.arange(rows.start, rows.stop, device=scores.device)[None, :]
            row = row == (lo if last is None else last[:, None])
            return torch.where(image & row[:, None, :, None], scores + self.alpha * scores.abs(), scores)

        call.edit_scores(amplify, rows=slice(lo, hi + 1))

    def stats(self) -> dict[str, Any]:
        return {"amplified_calls": self._calls, "cfg": self.cfg}
