"""attnkit: training-free attention interventions for multimodal LLMs (wrap a loaded HF model with one call)."""

from attnkit.api import Handle, handle_of, intervene, wrap
from attnkit.interventions import Intervention, Record, available, build
from attnkit.models import supported_classes

__version__ = "0.1.0"

__all__ = ["Handle", "Intervention", "Record", "available", "build", "handle_of", "intervene",
           "supported_classes", "wrap"]
