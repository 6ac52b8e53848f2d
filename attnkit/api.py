"""wrap / intervene: install interventions on a loaded model, and take them off again."""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import StaticCache, StaticLayer
from transformers.generation.configuration_utils import ALL_STATIC_CACHE_IMPLEMENTATIONS

from attnkit.hooks.attention import ATTR, LayerHook, dispatch_name
from attnkit.hooks.install import Installed
from attnkit.hooks.spans import VisualSpans
from attnkit.interventions.base import Intervention, build
from attnkit.models.base import ModelAdapter, get_adapter

HANDLE_ATTR = "_attnkit_handle"


@dataclass
class RunState:
    """What one forward or ``generate()`` has seen so far; rebuilt at each prefill."""

    spans: VisualSpans | None = None
    step: int = -1             # 0 = prefill, n = n-th decode step, -1 = nothing run yet
    keep_plan: Any = None      # the token dropper's KeepPlan: which prompt positions layers >= its from_layer see
    forward_calls: int = 0
    prefill_ms: float | None = None
    _t0: float = field(default=0.0, repr=False)


@dataclass
class WrapContext:
    """What an intervention gets at ``attach()``: the model, its adapter, the run state and the install registry."""

    model: torch.nn.Module
    adapter: ModelAdapter
    state: RunState
    installed: Installed


class Handle:
    """A wrapped model. ``stats()`` reports the last forward/generate; ``remove()`` restores the model exactly."""

    def __init__(self, model: torch.nn.Module, interventions: list[Intervention], adapter: ModelAdapter | None = None):
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

        per_layer: dict[int, list[Intervention]] = {i: [] for i in range(adapter.num_layers)}
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
            state.step, state.forward_calls, state.prefill_ms, state.keep_plan = 0, 0, None, None
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
        }
        for iv in self.interventions:
            out[iv.name] = iv.stats()
        return out

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


def wrap(model: torch.nn.Module, *interventions: Intervention | str) -> Handle:
    """Install ``interventions`` (objects or spec strings like ``"fastv:k=2,keep=0.5"``) on ``model``.

    Interventions need a growing (dynamic) KV cache: a static-cache ``generation_config`` is refused here and a
    ``StaticCache`` at the prefill forward (a wrap with no intervention accepts both). ``copy.deepcopy`` of a
    wrapped model returns an UNWRAPPED copy (the model as before ``wrap()``); the original stays wrapped.
    """
    if getattr(model, HANDLE_ATTR, None) is not None:
        raise RuntimeError(f"this {type(model).__name__} is already wrapped by attnkit "
                           f"({getattr(model, HANDLE_ATTR)!r}); call handle.remove() first")
    adapter = get_adapter(model)  # unsupported models fail before any spec is parsed
    built = [build(spec) for spec in interventions]
    impl = getattr(getattr(model, "generation_config", None), "cache_implementation", None)
    if built and impl in ALL_STATIC_CACHE_IMPLEMENTATIONS:
        raise ValueError(f"generation_config.cache_implementation={impl!r} is a fixed-size cache; attnkit "
                         f"interventions need a growing one: set it to None or 'dynamic' before wrap()")
    names = [iv.name for iv in built]
    for name in set(names):
        if names.count(name) > 1:
            raise ValueError(f"intervention {name!r} given {names.count(name)} times; give it once")
    for i, a in enumerate(built):
        for b in built[i + 1:]:
            reason = a.conflicts_with(b) or b.conflicts_with(a)
            if reason:
                raise ValueError(f"{a.name} and {b.name} cannot be combined: {reason}")
    return Handle(model, built, adapter)


@contextlib.contextmanager
def intervene(model: torch.nn.Module, *interventions: Intervention | str) -> Iterator[Handle]:
    """``wrap()`` for a ``with`` block; the model is restored on exit, also when the block raised."""
    handle = wrap(model, *interventions)
    try:
        yield handle
    finally:
        handle.remove()


def _fixed_size(cache) -> bool:
    layers = getattr(cache, "layers", ())
    return isinstance(cache, StaticCache) or any(isinstance(layer, StaticLayer) for layer in layers)


def handle_of(model: torch.nn.Module) -> Handle | None:
    """The handle wrapping ``model``, if any."""
    return getattr(model, HANDLE_ATTR, None)
