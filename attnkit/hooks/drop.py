"""Dropping visual tokens inside the LLM: from layer K on, the sequence holds only the kept tokens.

One mechanism for K = 0 (pruning right after the vision tower: ``cls-prune``) and K > 0 (``fastv``):

- prefill, K = 0: a pre-hook on the language model gathers ``inputs_embeds``, the ORIGINAL position
  ids (1-D, or Qwen's 3-/4-row mrope ids) and an explicit 2-D mask;
- prefill, K > 0: a forward hook on layer K-1 gathers its output; pre-hooks on layers >= K gather the
  rotary ``position_embeddings`` and ``position_ids`` and use a mask rebuilt for the shorter sequence;
- decode: the cache of layers >= K is simply shorter; the 2-D mask (prompt + generated columns) is
  compressed the same way; positions continue from the original prompt length;
- the language model's output is scattered back to the prompt length (dropped rows are zero), so
  ``logits`` keep the shape of ``input_ids``.

Samples may keep different numbers of tokens: the kept index lists are left-padded and the pad slots
masked. Needs a dynamic (growing) KV cache.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers.masking_utils import create_causal_mask


@dataclass
class KeepPlan:
    """Which prompt positions stay from layer ``from_layer`` on."""

    index: torch.Tensor        # [B, Lk] prompt positions kept, in order, left-padded with 0
    slot_valid: torch.Tensor   # [B, Lk] False on pad slots
    prompt_len: int
    from_layer: int
    visual_before: list[int]
    visual_after: list[int]

    @classmethod
    def from_keep(cls, keep: torch.Tensor, visual: torch.Tensor, from_layer: int) -> KeepPlan:
        """``keep`` [B, L] bool over prompt positions (non-visual positions must be kept)."""
        B, L = keep.shape
        counts = keep.sum(1)
        Lk = int(counts.max())
        index = torch.zeros(B, Lk, dtype=torch.long, device=keep.device)
        slot_valid = torch.zeros(B, Lk, dtype=torch.bool, device=keep.device)
        for b in range(B):
            n = int(counts[b])
            index[b, Lk - n:] = keep[b].nonzero().squeeze(1)
            slot_valid[b, Lk - n:] = True
        return cls(index, slot_valid, L, from_layer, visual.sum(1).tolist(), (visual & keep).sum(1).tolist())

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Select the kept positions of ``x`` along ``dim`` (the prompt-length axis; the batch axis precedes it)."""
        dim = dim % x.dim()
        idx = self.index.to(x.device)
        B, Lk = idx.shape
        if x.shape[dim - 1] != B:  # batch-broadcast tensors such as rotary cos/sin of shape [1, L, D]
            x = x.expand(*x.shape[: dim - 1], B, *x.shape[dim:])
        view = [1] * x.dim()
        view[dim - 1], view[dim] = B, Lk
        sizes = list(x.shape)
        sizes[dim] = Lk
        return torch.gather(x, dim, idx.view(view).expand(sizes))

    def compress_mask(self, mask_2d: torch.Tensor) -> torch.Tensor:
        """A 2-D padding mask over prompt (+ generated) columns -> over kept (+ generated) columns."""
        prompt = self.gather(mask_2d[:, : self.prompt_len], 1).bool() & self.slot_valid.to(mask_2d.device)
        return torch.cat([prompt.to(mask_2d.dtype), mask_2d[:, self.prompt_len:]], dim=1)


class Dropper:
    """Installs the hooks that run layers >= ``from_layer`` on the kept tokens of the current plan.

    ``decide(state, inputs_embeds) -> keep`` ([B, L] bool, or None to keep everything) is called at prefill when the
    language model starts (K = 0); for K > 0 an intervention calls :meth:`set_keep` before layer K.
    """

    def __init__(self, ctx, from_layer: int | None, decide: Callable | None = None, compact_positions: bool = False):
        n = ctx.adapter.num_layers
        if from_layer is not None and not 0 <= from_layer < n:
            raise ValueError(f"cannot drop tokens from layer {from_layer}; this model has layers 0..{n - 1}")
        if not ctx.adapter.supports_token_dropping:
            raise ValueError(f"dropping visual tokens is not yet supported on {ctx.adapter.family}")
        if getattr(ctx.adapter.language_model, "has_sliding_layers", False):
            raise ValueError("dropping visual tokens is not supported for sliding-window layers")
        if compact_positions and from_layer != 0:
            raise ValueError("compact positions are only defined when dropping before the LLM (layer 0)")
        self.ctx, self.from_layer, self.decide, self.compact = ctx, from_layer, decide, compact_positions
        self._shift: torch.Tensor | None = None   # original - compact position of each sample (compact mode)
        self.lm = ctx.adapter.language_model
        self._layer_kwargs: dict | None = None
        self._mask_2d: torch.Tensor | None = None
        self._caller_positions = True
        self._decode_mask_2d: torch.Tensor | None = None
        inst = ctx.installed
        inst.forward_pre_hook(ctx.model, self._top_pre, with_kwargs=True)
        inst.forward_pre_hook(self.lm, self._lm_pre, with_kwargs=True)
        inst.forward_hook(self.lm, self._lm_post)
        layers = ctx.adapter.decoder_layers
        # a fixed K hooks layer K-1's output and layers >= K; a dynamic one (None: decided at run time) all
        first = 1 if from_layer is None else max(from_layer, 1)
        if from_layer != 0:
            for i in range(first, n):
                inst.forward_hook(layers[i - 1], functools.partial(self._gather_output, i - 1))
                inst.forward_pre_hook(layers[i], functools.partial(self._layer_pre, i), with_kwargs=True)

    # --- decisions -----------------------------------------------------------------------------
    def set_keep(self, keep: torch.Tensor | None, from_layer: int | None = None) -> None:
        """Keep these prompt positions ([B, L] bool; non-visual ones always stay) from layer ``from_layer`` on."""
        from_layer = self.from_layer if from_layer is None else from_layer
        if keep is None:
            self.ctx.state.keep_plan = None
            return
        if self.from_layer is None and not 1 <= from_layer < self.ctx.adapter.num_layers:
            raise ValueError(f"cannot drop tokens from layer {from_layer} at run time; use 1.."
                             f"{self.ctx.adapter.num_layers - 1}")
        spans = self.ctx.state.spans
        visual = spans.visual.to(keep.device)
        self.ctx.state.keep_plan = KeepPlan.from_keep(keep | ~visual, visual, from_layer)

    @property
    def plan(self) -> KeepPlan | None:
        """The current run's plan; kept on the run state so other interventions can map positions through it."""
        return self.ctx.state.keep_plan

    # --- hooks -----------------------------------------------------------------------------------
    def _top_pre(self, module, args, kwargs):
        # the handle clears state.keep_plan at each prefill; _lm_pre clears the per-forward layer kwargs
        self._caller_positions = self.ctx.adapter.forward_arg("position_ids", args, kwargs) is not None

    def _lm_pre(self, module, args, kwargs):
        state = self.ctx.state
        embeds = kwargs.get("inputs_embeds")
        self._layer_kwargs = None
        if embeds is None or state.spans is None:
            return None
        B, q = embeds.shape[:2]
        cache = kwargs.get("past_key_values")
        if state.step == 0 and q == state.spans.length:                      # prefill
            mask = kwargs.get("attention_mask")
            self._mask_2d = torch.ones(B, q, dtype=torch.long, device=embeds.device) if mask is None else mask
            if self.from_layer != 0 or self.decide is None:
                return None                       # K > 0: the plan comes from layer K-1; layers < K run as usual
            self.set_keep(self.decide(state, embeds))
            if self.plan is None:
                return None
            positions = kwargs.get("position_ids")
            if positions is None:
                past = cache.get_seq_length() if cache is not None else 0
                positions = (torch.arange(q, device=embeds.device) + past).expand(B, q)
            kwargs["inputs_embeds"] = self.plan.gather(embeds, 1)
            kwargs["position_ids"] = self.plan.gather(positions, -1)
            kwargs["attention_mask"] = self.plan.compress_mask(self._mask_2d)
            if self.compact:
                kwargs["position_ids"] = self._compact(kwargs["position_ids"], kwargs["attention_mask"])
            return args, kwargs
        if self.plan is None:
            return None
        mask = kwargs.get("attention_mask")
        if mask is None or mask.dim() != 2:
            generated = cache.get_seq_length(self.plan.from_layer) + q - self.plan.index.shape[1]
            mask = torch.cat([self._mask_2d, self._mask_2d.new_ones(B, generated)], dim=1)
        self._decode_mask_2d = self.plan.compress_mask(mask)
        if self.plan.from_layer == 0:
            kwargs["attention_mask"] = self._decode_mask_2d
        if not self._caller_positions:
            kwargs["position_ids"] = self._uncompressed_positions(kwargs.get("position_ids"), embeds, cache)
        if self.compact:
            kwargs["position_ids"] = kwargs["position_ids"] - self._shift.to(embeds.device)[:, None]
        return args, kwargs

    def _compact(self, positions: torch.Tensor, mask_2d: torch.Tensor) -> torch.Tensor:
        """FasterVLM's positions: the kept tokens numbered consecutively from each sample's first position."""
        valid = mask_2d.bool()
        start = torch.where(valid, positions, positions.new_full((), 1 << 30)).min(dim=1, keepdim=True).values
        compact = (start + valid.long().cumsum(1) - 1).clamp(min=0)
        compact = torch.where(valid, compact, positions)
        self._shift = positions[:, -1] - compact[:, -1]
        return compact

    def _uncompressed_positions(self, position_ids, embeds, cache):
        """The model derived decode positions from the (shorter) cache: shift them back to the prompt's."""
        cache_prompt = self.plan.index.shape[1] if self.plan.from_layer == 0 else self.plan.prompt_len
        shift = self.plan.prompt_len - cache_prompt
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(embeds.shape[1], device=embeds.device) + past).expand(embeds.shape[0], -1)
        return position_ids + shift

    def _gather_output(self, layer_idx, module, args, output):
        if self.plan is None or self.ctx.state.step != 0 or self.plan.from_layer != layer_idx + 1:
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        if hidden.shape[1] != self.plan.prompt_len:
            return None
        kept = self.plan.gather(hidden, 1)
        return (kept, *output[1:]) if isinstance(output, tuple) else kept

    def _layer_pre(self, layer_idx, module, args, kwargs):
        if self.plan is None or layer_idx < self.plan.from_layer:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        prefill = self.ctx.state.step == 0 and hidden.shape[1] == self.plan.index.shape[1]
        if self._layer_kwargs is None or self._layer_kwargs["q_len"] != hidden.shape[1]:
            self._layer_kwargs = self._kwargs_for_kept(hidden, kwargs, prefill)
        kwargs.update({k: v for k, v in self._layer_kwargs.items() if k != "q_len"})
        return args, kwargs

    def _kwargs_for_kept(self, hidden, kwargs, prefill: bool) -> dict:
        plan = self.plan
        out: dict = {"q_len": hidden.shape[1]}
        cache = kwargs.get("past_key_values")
        if prefill:
            cos, sin = kwargs["position_embeddings"]
            out["position_embeddings"] = (plan.gather(cos, 1), plan.gather(sin, 1))
            if kwargs.get("position_ids") is not None:
                out["position_ids"] = plan.gather(kwargs["position_ids"], -1)
            mask_2d = plan.compress_mask(self._mask_2d)
        else:
            mask_2d = self._decode_mask_2d
        out["attention_mask"] = create_causal_mask(config=self.lm.config, inputs_embeds=hidden, attention_mask=mask_2d,
                                                   past_key_values=cache, layer_idx=self.plan.from_layer)
        return out

    def _lm_post(self, module, args, output):
        plan, state = self.plan, self.ctx.state
        if plan is None or state.step != 0:
            return None
        hidden = output.last_hidden_state
        if hidden.shape[1] != plan.index.shape[1] or state.spans is None:
            return None
        full = hidden.new_zeros(hidden.shape[0], plan.prompt_len, hidden.shape[2])
        idx = plan.index.to(hidden.device)[..., None].expand_as(hidden)
        src = hidden * plan.slot_valid.to(hidden.device)[..., None]
        output.last_hidden_state = full.scatter_add(1, idx, src)
        return output

    def stats(self) -> dict:
        if self.plan is None:
            spans = self.ctx.state.spans
            if spans is None or not spans.has_images():
                return {"note": "no image in the input: nothing dropped"}
            return {"note": "nothing dropped", "visual_tokens": spans.counts(), "visual_tokens_kept": spans.counts()}
        spans = self.ctx.state.spans
        kept = [[int(p) for p in self.plan.index[b][self.plan.slot_valid[b]] if spans.visual[b, p]]
                for b in range(spans.batch_size)]
        return {"from_layer": self.plan.from_layer, "visual_tokens": self.plan.visual_before,
                "visual_tokens_kept": self.plan.visual_after, "kept_positions": kept}
