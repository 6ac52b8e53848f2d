"""The handle: installs built interventions on a model, keeps the run state, and undoes everything.

This is the mechanism under :func:`attnkit.wrap` (which parses spec strings and checks combinations);
it only calls the interventions' callbacks, so lower layers (e.g. an intervention's ``calibrate()``)
can install interventions with :func:`installed` without importing the public API.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import StaticCache, StaticLayer

from attnkit.hooks.attention import ATTR, LayerHook, dispatch_name
from attnkit.hooks.install import Installed
from attnkit.models.base import ModelAdapter, get_adapter
from attnkit.models.spans import VisualSpans

HANDLE_ATTR = "_attnkit_handle"


@dataclass
class RunState:
    """What one forward or ``generate()`` has seen so far; rebuilt at each prefill."""

    spans: VisualSpans | None = None
    step: int = -1             # 0 = prefill, n = n-th decode step, -1 = nothing run yet
    keep_plans: list = field(default_factory=list)   # the token dropper's KeepPlans, by increasing from_layer
    forward_calls: int = 0
    prefill_ms: float | None = None
    _t0: float = field(default=0.0, repr=False)

    @property
    def keep_plan(self):
        """The last plan in force (None: nothing dropped); see :meth:`plan_at` for a given layer."""
        return self.keep_plans[-1] if self.keep_plans else None

    def plan_at(self, layer_idx: int):
        """The KeepPlan whose layout decoder layer ``layer_idx`` sees (None: the full prompt)."""
        found = None
        for plan in self.keep_plans:
            if plan.from_layer <= layer_idx:
                found = plan
        return found


@dataclass
class WrapContext:
    """What an intervention gets at ``attach()``: the model, its adapter, the run state and the install registry."""

    model: torch.nn.Module
    adapter: ModelAdapter
    state: RunState
    installed: Installed


class Handle:
    """A wrapped model. ``stats()`` reports the last forward/generate; ``remove()`` restores the model exactly."""

    def __init__(self, model: torch.nn.Module, interventions: list, adapter: ModelAdapter | None = None):
        self.model = model
        self.interventions = interventions
        self.adapter = adapter or get_adapter(model)
        self.state = RunState()
        self._installed = Installed()
        self._removed = False
        try:
            self._install()
        except BaseException:
            self._installed.remove()
            raise

    def _install(self) -> None:
        model, adapter, inst = self.model, self.adapter, self._installed
        inst.set_attr(model, HANDLE_ATTR, self)
        inst.set_attr(model, "__deepcopy__", self._copy_unwrapped)  # copy.deepcopy looks it up on the instance
        ctx = WrapContext(model, adapter, self.state, inst)

        previous = adapter.text_config._attn_implementation
        model.set_attn_implementation({"text_config": dispatch_name(previous)})
        inst.on_remove(lambda: model.set_attn_implementation({"text_config": previous}))

        per_layer: dict[int, list] = {i: [] for i in range(adapter.num_layers)}
        for iv in self.interventions:
            iv.attach(ctx)
            for i in iv.attention_layers(ctx):
                if i not in per_layer:
                    raise ValueError(f"{iv.name}: layer {i} does not exist; this model has layers "
                                     f"0..{adapter.num_layers - 1}")
                per_layer[i].append(iv)
        for i, layer in enumerate(adapter.decoder_layers):
            inst.set_attr(layer.self_attn, ATTR, LayerHook(i, self.state, per_layer[i]))

        inst.forward_pre_hook(model, self._before_forward, with_kwargs=True, prepend=True)
        inst.forward_hook(model, self._after_forward, always_call=True)

    def _before_forward(self, module, args, kwargs):
        state = self.state
        cache = self.adapter.forward_arg("past_key_values", args, kwargs)
        prefill = cache is None or cache.get_seq_length() == 0
        if prefill:
            if self.interventions and _fixed_size(cache):
                raise ValueError(f"past_key_values is a {type(cache).__name__} (fixed size); attnkit interventions "
                                 f"need a growing cache: use DynamicCache, generate's default cache, or no cache")
            input_ids = self.adapter.forward_arg("input_ids", args, kwargs)
            mask = self.adapter.forward_arg("attention_mask", args, kwargs)
            mask = mask if torch.is_tensor(mask) else None   # generate's static-cache path passes a dict of masks
            counts = self.adapter.image_token_counts(args, kwargs)
            state.spans = None if input_ids is None else self.adapter.visual_spans(input_ids, mask, counts)
            state.step, state.forward_calls, state.prefill_ms, state.keep_plans = 0, 0, None, []
            for iv in self.interventions:
                iv.reset()
        else:
            state.step += 1
        state.forward_calls += 1
        state._t0 = time.perf_counter()

    def _after_forward(self, module, args, output):
        if self.state.step == 0 and self.state.prefill_ms is None:
            self.state.prefill_ms = (time.perf_counter() - self.state._t0) * 1e3

    def _copy_unwrapped(self, memo: dict) -> torch.nn.Module:
        """``copy.deepcopy(model)``: a copy of the model as it was before ``wrap()``; the original stays wrapped
        (its changes are undone for the copy and installed again)."""
        self._installed.remove()
        try:
            return copy.deepcopy(self.model, memo)
        finally:
            self._installed = Installed()
            try:
                self._install()
            except BaseException:
                self._installed.remove()
                self._removed = True
                raise

    def stats(self) -> dict[str, Any]:
        """What the interventions did in the last forward / ``generate()``."""
        spans = self.state.spans
        out: dict[str, Any] = {
            "family": self.adapter.family,
            "forward_calls": self.state.forward_calls,
            "decode_steps": max(self.state.step, 0),
            "prefill_ms": self.state.prefill_ms,
            "visual_tokens": spans.counts() if spans is not None else None,
            "layer_tokens": self.layer_tokens(),
        }
        for iv in self.interventions:
            out[iv.name] = iv.stats()
        return out

    def layer_tokens(self) -> list[list[int]] | None:
        """Per sample, the real (non-padding) prompt tokens each decoder layer processed at the last prefill:
        ``[b][l]`` = the sample's prompt tokens minus the visual tokens dropped by the keep plan in force at layer
        ``l`` (:meth:`RunState.plan_at`). Masked-but-present tokens (a batch's early ``vte`` exits before the
        common removal) count: the layer computes them. None before any prefill with ``input_ids``."""
        spans = self.state.spans
        if spans is None:
            return None
        per_layer = []
        for layer in range(self.adapter.num_layers):
            plan = self.state.plan_at(layer)
            valid = spans.valid
            if plan is not None:
                valid = valid.gather(1, plan.index.to(valid.device)) & plan.slot_valid.to(valid.device)
            per_layer.append(valid.sum(1))
        return torch.stack(per_layer, 1).tolist()

    def remove(self) -> None:
        """Undo every change; the model's outputs are bit-identical to before ``wrap()``."""
        if self._removed:
            return
        self._removed = True
        self._installed.remove()

    def __repr__(self) -> str:
        specs = ", ".join(iv.spec() for iv in self.interventions) or "no intervention"
        state = "removed" if self._removed else "active"
        return f"<attnkit.Handle {type(self.model).__name__} [{specs}] {state}>"


def _fixed_size(cache) -> bool:
    layers = getattr(cache, "layers", ())
    return isinstance(cache, StaticCache) or any(isinstance(layer, StaticLayer) for layer in layers)


@contextlib.contextmanager
def installed(model: torch.nn.Module, *interventions) -> Iterator[Handle]:
    """Install already-built interventions for a ``with`` block (no spec parsing, no combination checks)."""
    if getattr(model, HANDLE_ATTR, None) is not None:
        raise RuntimeError(f"this {type(model).__name__} is already wrapped by attnkit; call handle.remove() first")
    handle = Handle(model, list(interventions))
    try:
        yield handle
    finally:
        handle.remove()
