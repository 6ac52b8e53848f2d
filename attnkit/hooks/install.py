"""Install/remove registry: everything attnkit changes on a model is recorded here and undone by ``remove()``."""

from __future__ import annotations

from collections.abc import Callable

import torch


class Installed:
    """Records forward hooks, module attributes and config switches, and undoes them in reverse order."""

    def __init__(self):
        self._undo: list[Callable[[], None]] = []

    def forward_hook(self, module: torch.nn.Module, fn: Callable, **kw) -> None:
        self._undo.append(module.register_forward_hook(fn, **kw).remove)

    def forward_pre_hook(self, module: torch.nn.Module, fn: Callable, **kw) -> None:
        self._undo.append(module.register_forward_pre_hook(fn, **kw).remove)

    def set_attr(self, obj, name: str, value) -> None:
        """Set ``obj.name``; on removal restore the old value, or delete it if there was none."""
        missing = object()
        old = obj.__dict__.get(name, missing)
        setattr(obj, name, value)

        def undo():
            if old is missing:
                delattr(obj, name)
            else:
                setattr(obj, name, old)

        self._undo.append(undo)

    def on_remove(self, fn: Callable[[], None]) -> None:
        self._undo.append(fn)

    def remove(self) -> None:
        """Undo everything, newest first; keep going if one undo fails and raise the first error at the end."""
        error = None
        while self._undo:
            try:
                self._undo.pop()()
            except Exception as e:  # noqa: BLE001 - finish undoing, then report
                error = error or e
        if error is not None:
            raise error
