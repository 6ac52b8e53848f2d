"""VisualSpans lives with the adapters (``attnkit.models.spans``); re-exported here for the mechanism."""

from attnkit.models.spans import VisualSpans

__all__ = ["VisualSpans"]
