"""The methods: one file each, a config dataclass plus what it does at each hook point.

Every module of this package is imported here, so a method registers itself (``@register``) by
existing: adding a method is adding its file.
"""

import importlib
import pkgutil

from attnkit.interventions.base import REGISTRY, Intervention, available, build, param, register

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")

from attnkit.interventions.sinks import find_sink_dims  # noqa: E402

#: the registered classes by class name (``attnkit.ClsPrune``, ``attnkit.VAR``, ...)
CLASSES = {cls.__name__: cls for cls in REGISTRY.values()}
globals().update(CLASSES)

__all__ = ["CLASSES", "Intervention", "REGISTRY", "available", "build", "find_sink_dims", "param", "register",
           *sorted(CLASSES)]
