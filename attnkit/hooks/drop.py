"""Dropping (and merging) visual tokens in the LLM: from a stage's layer on, the sequence holds only its kept tokens.

One mechanism for every pruner, with one or several stages (each a subset of the one before):

- a stage at layer 0 acts on the language model's input: a pre-hook gathers ``inputs_embeds``, the
  ORIGINAL position ids (1-D, or Qwen's 3-/4-row mrope ids) and an explicit 2-D mask;
- a stage at layer K > 0 acts on the output of layer K-1 (a forward hook gathers it); pre-hooks on
  the layers of the stage gather the rotary ``position_embeddings`` / ``position_ids`` and use a mask
  rebuilt for the shorter sequence;
- a stage may replace the rows of some kept tokens (merged tokens): they enter layer K with those rows;
- the decision is asked for by the dropper from inside its own hook (``decide(layer, hidden)``), so
  the order in which hooks were registered never matters;
- decode: the cache of each stage's layers is simply shorter; the 2-D mask (prompt + generated
  columns) is compressed per stage; positions continue from the original prompt length;
- the language model's output is scattered back to the prompt length (dropped rows are zero), so
  ``logits`` keep the shape of ``input_ids``.

Samples may keep different numbers of tokens: kept index lists are left-padded and the pad slots
masked. Needs a dynamic (growing) KV cache.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class Decision:
    """A stage's choice: ``keep`` [B, L] bool over PROMPT positions (non-visual ones always stay; only
    positions the current layout still holds may be kept), and optional replacement rows per sample:
    ``rows[b] = (positions [m], values [m, D])`` for kept positions whose row changes (merged tokens)."""

    keep: torch.Tensor
    rows: list[tuple[torch.Tensor, torch.Tensor] | None] | None = None
    weights: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] | None = None   # per sample: see KeepPlan


@dataclass
class KeepPlan:
    """Which prompt positions stay from layer ``from_layer`` on."""

    index: torch.Tensor        # [B, Lk] prompt positions kept, in order, left-padded with 0
    slot_valid: torch.Tensor   # [B, Lk] False on pad slots
    prompt_len: int
    from_layer: int
    visual_before: list[int]
    visual_after: list[int]
    merged: list[int] = field(default_factory=list)   # per sample: kept tokens whose rows were replaced
    # per sample: (merged positions [m], member positions [n], weights [m, n]) blocks, where the pruner gave them
    sources: list = field(default_factory=list)

    @classmethod
    def from_keep(cls, keep: torch.Tensor, visual: torch.Tensor, from_layer: int,
                  visual_before: list[int] | None = None) -> KeepPlan:
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
        before = visual.sum(1).tolist() if visual_before is None else visual_before
        return cls(index, slot_valid, L, from_layer, before, (visual & keep).sum(1).tolist(), [0] * B)

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Select the kept positions of ``x`` along ``dim`` (the prompt-length axis; the batch axis precedes it)."""
        return gather_along(x, dim, self.index)

    def compress_mask(self, mask_2d: torch.Tensor) -> torch.Tensor:
        """A 2-D padding mask over prompt (+ generated) columns -> over kept (+ generated) columns."""
        prompt = self.gather(mask_2d[:, : self.prompt_len], 1).bool() & self.slot_valid.to(mask_2d.device)
        return torch.cat([prompt.to(mask_2d.dtype), mask_2d[:, self.prompt_len:]], dim=1)

    def slots_of(self, positions: torch.Tensor, b: int) -> torch.Tensor:
        """Slots (indices into this layout) of prompt ``positions`` of sample ``b`` (all must be kept)."""
        where = torch.full((self.prompt_len,), -1, dtype=torch.long)
        idx = self.index[b].cpu()[self.slot_valid[b].cpu()]
        where[idx] = torch.arange(self.index.shape[1] - len(idx), self.index.shape[1])
        slots = where[positions.cpu()]
        if bool((slots < 0).any()):
            raise ValueError("a stage may only keep tokens the previous stage kept")
        return slots


def gather_along(x: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """``x`` gathered at ``index`` [B, Lk] along ``dim`` (the batch axis precedes it; broadcast batches expand)."""
    dim = dim % x.dim()
    idx = index.to(x.device)
    B, Lk = idx.shape
    if x.shape[dim - 1] != B:  # batch-broadcast tensors such as rotary cos/sin of shape [1, L, D]
        x = x.expand(*x.shape[: dim - 1], B, *x.shape[dim:])
    view = [1] * x.dim()
    view[dim - 1], view[dim] = B, Lk
    sizes = list(x.shape)
    sizes[dim] = Lk
    return torch.gather(x, dim, idx.view(view).expand(sizes))


def layout_at(state, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """``(visual, valid, text_after_image)`` [B, L_layer] of the sequence decoder layer ``layer_idx`` sees at
    prefill (after any drop stage before it); None without spans."""
    spans = state.spans
    if spans is None:
        return None
    visual, valid, text = spans.visual, spans.valid, spans.text_after_image()
    plan = state.plan_at(layer_idx)
    if plan is not None:
        index, slot = plan.index.to(visual.device), plan.slot_valid.to(visual.device)
        visual, valid, text = (m.gather(1, index) & slot for m in (visual, valid, text))
    return visual, valid, text


class Dropper:
    """Installs the hooks that run each stage's layers on its kept tokens.

    ``decide(layer, hidden) -> Decision | None`` is called at prefill for each layer of ``layers``
    (None: every layer 1..n-1, for decisions made at run time): with the language model's input
    embeddings for layer 0, else with the output of layer ``layer - 1`` (in the current layout).
    """

    def __init__(self, ctx, layers: tuple[int, ...] | None, decide: Callable, compact_positions: bool = False):
        n = ctx.adapter.num_layers
        if not ctx.adapter.supports_token_dropping:
            raise ValueError(f"dropping visual tokens is not yet supported on {ctx.adapter.family}")
        if getattr(ctx.adapter.language_model, "has_sliding_layers", False) and not ctx.adapter.rebuilds_sliding_masks:
            raise ValueError("dropping visual tokens is not supported for sliding-window layers")
        candidates = tuple(range(1, n)) if layers is None else tuple(sorted(set(layers)))
        bad = [k for k in candidates if not 0 <= k < n]
        if bad:
            raise ValueError(f"cannot drop tokens before layer {bad[0]}; this model has layers 0..{n - 1}, so a "
                             f"drop layer is in 0..{n - 1} (0 = before the LLM)")
        if compact_positions and candidates != (0,):
            raise ValueError("compact positions are only defined when dropping before the LLM (layer 0)")
        self.ctx, self.candidates, self.decide, self.compact = ctx, candidates, decide, compact_positions
        ctx.adapter.install_token_dropping(ctx)
        self._shift: torch.Tensor | None = None   # original - compact position of each sample (compact mode)
        self.lm = ctx.adapter.language_model
        self._layer_kwargs: dict[int, dict] = {}   # per plan (by from_layer): kwargs for its layers
        self._mask_2d: torch.Tensor | None = None
        self._caller_positions = True
        self._top_mask, self._mask_inputs = None, {}   # the top call's padding mask; adapter.mask_inputs of it
        self._decode_masks: dict[int, torch.Tensor] = {}
        inst = ctx.installed
        inst.forward_pre_hook(ctx.model, self._top_pre, with_kwargs=True)
        inst.forward_pre_hook(self.lm, self._lm_pre, with_kwargs=True)
        inst.forward_hook(self.lm, self._lm_post)
        layers_ = ctx.adapter.decoder_layers
        for k in candidates:
            if k > 0:
                inst.forward_hook(layers_[k - 1], functools.partial(self._after_layer, k))
        inst.forward_pre_hook(layers_[0], self._keep_rotary, with_kwargs=True)
        self._rotary: tuple | None = None
        first = min((k for k in candidates if k > 0), default=n)
        for i in range(first, n):
            inst.forward_pre_hook(layers_[i], functools.partial(self._layer_pre, i), with_kwargs=True)

    # --- plans ---------------------------------------------------------------------------------------
    @property
    def plans(self) -> list[KeepPlan]:
        """This run's plans (on the run state, so other interventions can map positions through them)."""
        return self.ctx.state.keep_plans

    @property
    def plan(self) -> KeepPlan | None:
        """The last plan in force."""
        return self.plans[-1] if self.plans else None

    def _new_plan(self, decision: Decision, from_layer: int) -> KeepPlan:
        spans = self.ctx.state.spans
        visual = spans.visual.to(decision.keep.device)
        before = self.plan.visual_after if self.plan is not None else None
        plan = KeepPlan.from_keep(decision.keep | ~visual, visual, from_layer, before)
        if self.plan is not None:
            for b in range(spans.batch_size):
                self.plan.slots_of(plan.index[b][plan.slot_valid[b]], b)   # checks: a subset of the last stage
        self.ctx.state.keep_plans.append(plan)
        return plan

    def _apply(self, decision: Decision, from_layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Gather ``hidden`` (the current layout) to the new plan's kept rows and write the replacement rows."""
        previous = self.plan
        plan = self._new_plan(decision, from_layer)
        plan.sources = decision.weights or []
        if previous is None:
            kept = plan.gather(hidden, 1)
        else:
            rel = torch.stack([previous.slots_of(plan.index[b], b) for b in range(plan.index.shape[0])])
            kept = gather_along(hidden, 1, rel)
        if decision.rows is not None:
            kept = kept.clone()
            for b, item in enumerate(decision.rows):
                if item is None or len(item[0]) == 0:
                    continue
                positions, values = item
                kept[b, plan.slots_of(positions, b).to(kept.device)] = values.to(kept.dtype).to(kept.device)
                plan.merged[b] = len(positions)
        return kept

    def _input_index(self, plan: KeepPlan) -> torch.Tensor:
        """``plan``'s rows as indices into the language model's input sequence (the first plan, if at layer 0)."""
        first = self.plans[0]
        if first.from_layer != 0:
            return plan.index
        return torch.stack([first.slots_of(plan.index[b], b) for b in range(plan.index.shape[0])])

    def probe_attention(self, layer: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(query, key, scaling)`` that decoder layer ``layer``'s attention computes for the residual stream
        ``hidden`` (the current layout, prefill), through the model's own modules (norm, projections, q/k norms,
        rotary); nothing is cached or returned to the model."""
        from attnkit.hooks.attention import ATTR

        plan = self.plan
        cos, sin = self.ctx.adapter.layer_rotary(layer, self._rotary, self._rotary_positions, hidden)
        if plan is not None and hidden.shape[1] != cos.shape[-2]:
            index = self._input_index(plan)
            cos, sin = gather_along(cos, 1, index), gather_along(sin, 1, index)
        attn = self.ctx.adapter.decoder_layers[layer].self_attn
        hook = getattr(attn, ATTR)
        hook.probe = []
        try:
            attn(hidden_states=self.ctx.adapter.attention_input(layer, hidden), position_embeddings=(cos, sin),
                 attention_mask=None, past_key_values=None)
            query, key, scaling = hook.probe[0]
        finally:
            hook.probe = None
        return query, key, scaling

    # --- hooks -----------------------------------------------------------------------------------------
    def _keep_rotary(self, module, args, kwargs):
        if self.ctx.state.step == 0:
            self._rotary, self._rotary_positions = kwargs.get("position_embeddings"), kwargs.get("position_ids")

    def _top_pre(self, module, args, kwargs):
        # the handle clears state.keep_plans at each prefill; _lm_pre clears the per-forward layer kwargs
        self._caller_positions = self.ctx.adapter.forward_arg("position_ids", args, kwargs) is not None
        self._top_mask = self.ctx.adapter.forward_arg("attention_mask", args, kwargs)
        self._mask_inputs = self.ctx.adapter.mask_inputs(args, kwargs)

    def _lm_pre(self, module, args, kwargs):
        state = self.ctx.state
        embeds = kwargs.get("inputs_embeds")
        self._layer_kwargs = {}
        if embeds is None or state.spans is None:
            return None
        B, q = embeds.shape[:2]
        cache = kwargs.get("past_key_values")
        mask = kwargs.get("attention_mask")
        mask = self._top_mask if isinstance(mask, dict) else mask    # masks the model prepared: its padding mask
        if state.step == 0 and q == state.spans.length:                      # prefill
            self._mask_2d = torch.ones(B, q, dtype=torch.long, device=embeds.device) if mask is None else mask
            if 0 not in self.candidates or not state.spans.has_images():
                return None
            decision = self.decide(0, embeds)
            if decision is None:
                return None
            positions = kwargs.get("position_ids")
            if positions is None:
                past = cache.get_seq_length() if cache is not None else 0
                positions = (torch.arange(q, device=embeds.device) + past).expand(B, q)
            kwargs["inputs_embeds"] = self._apply(decision, 0, embeds)
            kwargs["position_ids"] = self.plan.gather(positions, -1)
            kept_mask = self.plan.compress_mask(self._mask_2d)
            kwargs["attention_mask"] = self.ctx.adapter.kept_masks(self._mask_inputs, kwargs["inputs_embeds"],
                                                                   kept_mask, cache, 0, self._kept_positions(self.plan))
            if self.compact:
                kwargs["position_ids"] = self._compact(kwargs["position_ids"], kept_mask)
            return args, kwargs
        if not self.plans:
            return None
        if mask is None or mask.dim() != 2:
            first = self.plans[0]
            generated = cache.get_seq_length(first.from_layer) + q - first.index.shape[1]
            mask = torch.cat([self._mask_2d, self._mask_2d.new_ones(B, generated)], dim=1)
        self._decode_masks = {p.from_layer: p.compress_mask(mask) for p in self.plans}
        if self.plans[0].from_layer == 0:
            kwargs["attention_mask"] = self._decode_masks[0]
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
        first = self.plans[0]
        cache_prompt = first.index.shape[1] if first.from_layer == 0 else first.prompt_len
        shift = first.prompt_len - cache_prompt
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(embeds.shape[1], device=embeds.device) + past).expand(embeds.shape[0], -1)
        return position_ids + shift

    def _after_layer(self, layer, module, args, output):
        state = self.ctx.state
        if state.step != 0 or state.spans is None or not state.spans.has_images():
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        current = self.plan.index.shape[1] if self.plan is not None else state.spans.length
        if hidden.shape[1] != current or (self.plan is not None and self.plan.from_layer >= layer):
            return None
        hidden = self.ctx.adapter.layer_output(layer - 1, hidden)
        decision = self.decide(layer, hidden)
        kept = hidden if decision is None else self._apply(decision, layer, hidden)
        return (kept, *output[1:]) if isinstance(output, tuple) else kept

    def _layer_pre(self, layer_idx, module, args, kwargs):
        plan = self.ctx.state.plan_at(layer_idx)
        if plan is None or plan.from_layer == 0:
            return None     # the language model's own kwargs already describe a layer-0 plan
        hidden = args[0] if args else kwargs["hidden_states"]
        prefill = self.ctx.state.step == 0 and hidden.shape[1] == plan.index.shape[1]
        # per plan and rotary (Gemma 3's local and global layers have their own)
        key = (plan.from_layer, id((kwargs.get("position_embeddings") or (None,))[0]))
        cached = self._layer_kwargs.get(key)
        if cached is None or cached["q_len"] != hidden.shape[1]:
            cached = self._layer_kwargs[key] = self._kwargs_for(plan, hidden, kwargs, prefill)
        kwargs.update({k: v for k, v in cached.items() if k != "q_len"})
        if isinstance(kwargs["attention_mask"], dict):   # masks by layer type
            kwargs["attention_mask"] = kwargs["attention_mask"][self.lm.config.layer_types[layer_idx]]
        return args, kwargs

    def _kwargs_for(self, plan: KeepPlan, hidden, kwargs, prefill: bool) -> dict:
        out: dict = {"q_len": hidden.shape[1]}
        cache = kwargs.get("past_key_values")
        if prefill:
            index = self._input_index(plan)
            cos, sin = kwargs["position_embeddings"]
            out["position_embeddings"] = (gather_along(cos, 1, index), gather_along(sin, 1, index))
            if kwargs.get("position_ids") is not None:
                out["position_ids"] = gather_along(kwargs["position_ids"], -1, index)
            mask_2d = plan.compress_mask(self._mask_2d)
        else:
            mask_2d = self._decode_masks[plan.from_layer]
        out["attention_mask"] = self.ctx.adapter.kept_masks(self._mask_inputs, hidden, mask_2d, cache, plan.from_layer,
                                                            self._kept_positions(plan) if prefill else None)
        return out

    @staticmethod
    def _kept_positions(plan: KeepPlan) -> torch.Tensor:
        """``plan``'s kept prompt positions [B, Lk], -1 on pad slots."""
        return torch.where(plan.slot_valid, plan.index, -1)

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
        spans = self.ctx.state.spans
        if not self.plans:
            if spans is None or not spans.has_images():
                return {"note": "no image in the input: nothing dropped"}
            return {"note": "nothing dropped", "visual_tokens": spans.counts(), "visual_tokens_kept": spans.counts()}
        last = self.plan
        kept = [[int(p) for p in last.index[b][last.slot_valid[b]] if spans.visual[b, p]]
                for b in range(spans.batch_size)]
        out = {"from_layer": last.from_layer, "visual_tokens": spans.counts(),
               "visual_tokens_kept": last.visual_after, "kept_positions": kept}
        if len(self.plans) > 1:
            out["stages"] = [{"from_layer": p.from_layer, "visual_tokens_kept": p.visual_after,
                              "kept_positions": [[int(t) for t in p.index[b][p.slot_valid[b]] if spans.visual[b, t]]
                                                 for b in range(spans.batch_size)]} for p in self.plans]
        if any(any(p.merged) for p in self.plans):
            out["merged_tokens"] = [sum(p.merged[b] for p in self.plans) for b in range(spans.batch_size)]
        return out
