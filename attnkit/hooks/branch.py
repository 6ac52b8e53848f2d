"""Two-branch logit steps: a second forward of the wrapped model per step, with its own inputs and KV cache.

Contrastive / guidance decoding (PAI's CFG step, VCD) combine the next-token logits of the model's own
forward (the "main" branch) with those of a second forward on other inputs: the prompt without its image,
or the same prompt with a distorted image. :class:`Branch` hooks the top model's forward: after each main
forward it runs the branch (``model.forward`` directly, so the top model's hooks are not re-entered; the
``active`` flag tells interventions that the branch is running) and writes ``combine(main, branch)`` into
the main output's logits at each sample's last real position (the next-token prediction; other positions
keep the main logits).

- Prefill: the branch builds its inputs from the main call (``inputs(call, state) -> BranchInputs``) and
  gets a fresh :class:`DynamicCache` when the main forward keeps a cache. Decode: the main call's new
  tokens go to the branch's cache, with the branch's own mask and positions (text-only: continuing from
  its own prompt length; same-layout: the main call's).
- Beam search: ``generate()`` reorders caches through ``model._reorder_cache``; the branch installs one
  (restored on removal) that reorders the main cache as generate would and the branch cache and row state
  with the same ``beam_idx``. Expanded batches (``num_beams``, ``num_return_sequences``) reach the branch
  already expanded.
- During the branch, ``state.spans`` are the branch's (text-only: no visual tokens), ``state.keep_plans``
  is None, and Qwen's cached ``rope_deltas`` are restored afterwards. Runs under ``torch.no_grad``.

Cost: one more forward per step (prefill and every decode step) and a second KV cache.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable

import torch
from transformers.cache_utils import DynamicCache

_DROPPED_FOR_TEXT = ("pixel_values", "pixel_values_videos", "image_sizes", "image_grid_thw", "video_grid_thw",
                     "mm_encoder_outputs", "mm_token_type_ids", "token_type_ids")


@dataclasses.dataclass
class BranchInputs:
    """The branch forward's keyword arguments; ``same_layout``: its sequence is the main call's, position by
    position (so its logits are read at the main's rows); otherwise it is left-aligned (read at its last row)."""

    kwargs: dict
    same_layout: bool


def last_real(mask: torch.Tensor | None, q_len: int, batch: int, device) -> torch.Tensor:
    """Per row, the index of the last column where ``mask`` ([B, >= q_len], last ``q_len`` columns) is 1."""
    if mask is None:
        return torch.full((batch,), q_len - 1, dtype=torch.long, device=device)
    pos = torch.arange(q_len, device=mask.device)
    return torch.where(mask[:, -q_len:].bool(), pos, -1).amax(1).clamp(min=0).to(device)


class Branch:
    """Run a second forward after each main forward and replace the main's next-token logits by
    ``combine(main_logits, branch_logits)`` (float32 [B, V] each). See the module docstring."""

    def __init__(self, ctx, inputs: Callable, combine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        self.ctx, self.inputs, self.combine = ctx, inputs, combine
        self.active = False
        self.cache, self.spans, self._skip = None, None, False
        self.rows: dict = {}          # per-row state of the branch's own inputs (text-only: mask, next position)
        self._names = list(inspect.signature(ctx.model.forward).parameters)
        ctx.installed.forward_hook(ctx.model, self._after, with_kwargs=True)
        model = ctx.model
        previous = getattr(model, "_reorder_cache", None)   # a model's own (bound) reordering, if it has one

        def reorder_cache(cache, beam_idx):
            if previous is not None:
                cache = previous(cache, beam_idx)
            elif hasattr(cache, "reorder_cache"):
                cache.reorder_cache(beam_idx)
            else:
                raise ValueError(f"{type(model).__name__} cannot use beam search with a {type(cache).__name__}")
            self.reorder(beam_idx)
            return cache

        ctx.installed.set_attr(model, "_reorder_cache", reorder_cache)

    def reorder(self, beam_idx: torch.Tensor) -> None:
        """Follow generate's beam reordering: the branch cache and every per-row tensor."""
        if self.cache is not None:
            self.cache.reorder_cache(beam_idx.to(_cache_device(self.cache, beam_idx)))
        self.rows = {k: v[beam_idx.to(v.device)] for k, v in self.rows.items()}

    def _after(self, module, args, kwargs, output):
        if self.active:
            return None
        logits = getattr(output, "logits", None)
        if not torch.is_tensor(logits):
            raise ValueError(f"a two-branch logit step needs the model output's logits; got {type(output).__name__} "
                             f"(call the model with return_dict=True, the default)")
        call = {**dict(zip(self._names, args)), **kwargs}
        state = self.ctx.state
        ids, embeds = call.get("input_ids"), call.get("inputs_embeds")
        q_len = (ids if ids is not None else embeds).shape[1]
        B = logits.shape[0]
        rows = (last_real(call.get("attention_mask"), q_len, B, logits.device) if logits.shape[1] == q_len
                else torch.full((B,), logits.shape[1] - 1, dtype=torch.long, device=logits.device))
        main = logits[torch.arange(B, device=logits.device), rows].float()
        prefill = state.step == 0
        if prefill:
            self.cache, self.rows = None, {}
            self._skip = state.spans is None or not state.spans.has_images()
        if self._skip:          # no image: both branches would see the same input
            other = main
        else:
            if not prefill and self.cache is None:
                raise RuntimeError("the second branch has no KV cache for this decode step: its prefill ran "
                                   "without a cache; run the prefill with use_cache=True (generate's default)")
            other = self._run(call, state, prefill, output.past_key_values is not None, rows)
        combined = self.combine(main, other).to(logits.dtype)
        output.logits = logits.index_put((torch.arange(B, device=logits.device), rows), combined)
        return output

    def _run(self, call: dict, state, prefill: bool, keep_cache: bool, rows: torch.Tensor) -> torch.Tensor:
        built = self.inputs(call, state, self, prefill)
        kw = built.kwargs
        if prefill:
            kw["past_key_values"] = DynamicCache(config=self.ctx.model.config) if keep_cache else None
        else:
            kw["past_key_values"] = self.cache
        kw["use_cache"] = kw["past_key_values"] is not None
        if not built.same_layout:
            kw["logits_to_keep"] = 1
        saved = (state.spans, state.keep_plans)
        saved_rope = [(m, m.__dict__["rope_deltas"]) for m in self.ctx.model.modules() if "rope_deltas" in m.__dict__]
        if prefill:   # the branch's own spans, for its prefill and every decode step
            self.spans = saved[0] if built.same_layout else self.ctx.adapter.visual_spans(
                kw["input_ids"], kw.get("attention_mask"), [])
        self.active = True
        try:
            state.spans, state.keep_plans = self.spans, []
            with torch.no_grad():
                out = self.ctx.model.forward(**kw)
        finally:
            self.active = False
            state.spans, state.keep_plans = saved
            for m, value in saved_rope:
                m.rope_deltas = value
        if kw["use_cache"]:
            self.cache = out.past_key_values
        logits = out.logits
        if built.same_layout and logits.shape[1] > 1:
            return logits[torch.arange(logits.shape[0], device=logits.device), rows.to(logits.device)].float()
        return logits[:, -1].float()


def text_only_inputs(call: dict, state, branch: Branch, prefill: bool) -> BranchInputs:
    """The prompt without its image: visual tokens (and Qwen's ``<|vision_start|>``/``<|vision_end|>``) removed,
    the rest kept in order, left-padded; positions ``cumsum(mask) - 1`` as generate numbers a text prompt,
    continued from the branch's own prompt length at each decode step."""
    ids = call.get("input_ids")
    if ids is None:
        raise ValueError("the text-only branch needs input_ids (got inputs_embeds); pass input_ids")
    mask = call.get("attention_mask")
    B, q = ids.shape
    if prefill:
        valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask[:, -q:].bool()
        drop = state.spans.visual.to(ids.device)
        for attr in ("vision_start_token_id", "vision_end_token_id"):
            tid = getattr(branch.ctx.model.config, attr, None)
            if tid is not None:
                drop = drop | (ids == tid)
        keep = valid & ~drop
        order = torch.sort(keep.long(), dim=1, stable=True).indices       # dropped first, kept (in order) last
        width = max(int(keep.sum(1).max()), 1)
        new_mask = keep.gather(1, order)[:, -width:].long()
        pad = getattr(branch.ctx.adapter.text_config, "pad_token_id", None) or 0
        new_ids = torch.where(new_mask.bool(), ids.gather(1, order)[:, -width:], pad)
        positions = (new_mask.cumsum(1) - 1).clamp(min=0)
    else:
        new_cols = torch.ones_like(ids) if mask is None else mask[:, -q:].long()
        new_ids, new_mask = ids, torch.cat([branch.rows["mask"], new_cols], 1)
        positions = branch.rows["next"][:, None] + (new_cols.cumsum(1) - 1).clamp(min=0)
    branch.rows = {"mask": new_mask, "next": positions[:, -1] + 1}
    return BranchInputs({"input_ids": new_ids, "attention_mask": new_mask, "position_ids": positions}, False)


def _cache_device(cache, fallback: torch.Tensor) -> torch.device:
    for layer in getattr(cache, "layers", ()):
        keys = getattr(layer, "keys", None)
        if torch.is_tensor(keys):
            return keys.device
    return fallback.device
