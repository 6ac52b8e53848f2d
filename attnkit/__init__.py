"""attnkit: training-free attention interventions for multimodal LLMs (wrap a loaded HF model with one call)."""

from attnkit.api import Handle, handle_of, intervene, wrap
from attnkit.interventions import (
    MMA,
    PAI,
    VAR,
    VCD,
    VHR,
    ClsPrune,
    FastV,
    Intervention,
    Record,
    VisualTokenExit,
    available,
    build,
    find_sink_dims,
)
from attnkit.models import supported_classes

__version__ = "0.1.0"

__all__ = ["ClsPrune", "FastV", "Handle", "Intervention", "MMA", "PAI", "Record", "VAR", "VCD", "VHR",
           "VisualTokenExit", "available", "build", "find_sink_dims", "handle_of", "intervene", "supported_classes",
           "wrap"]
