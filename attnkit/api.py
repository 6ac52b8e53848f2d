"""wrap / intervene: install interventions on a loaded model, and take them off again."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from transformers.generation.configuration_utils import ALL_STATIC_CACHE_IMPLEMENTATIONS

from attnkit.hooks.handle import HANDLE_ATTR, Handle, RunState, WrapContext
from attnkit.interventions.base import Intervention, build
from attnkit.models.base import get_adapter

__all__ = ["HANDLE_ATTR", "Handle", "RunState", "WrapContext", "handle_of", "intervene", "wrap"]


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


def handle_of(model: torch.nn.Module) -> Handle | None:
    """The handle wrapping ``model``, if any."""
    return getattr(model, HANDLE_ATTR, None)
