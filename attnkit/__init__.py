"""attnkit: training-free attention interventions for multimodal LLMs (wrap a loaded HF model with one call)."""

from attnkit.api import Handle, handle_of, intervene, wrap
from attnkit.interventions import CLASSES, Intervention, available, build, find_sink_dims
from attnkit.models import supported_classes

globals().update(CLASSES)   # every registered method's class: attnkit.ClsPrune, attnkit.FastV, attnkit.VAR, ...

__version__ = "0.1.0"

__all__ = ["Handle", "Intervention", "available", "build", "find_sink_dims", "handle_of", "intervene",
           "supported_classes", "wrap", *sorted(CLASSES)]
