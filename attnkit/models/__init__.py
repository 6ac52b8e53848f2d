"""Model adapters: one per family; everything model-specific lives here."""

from attnkit.models.base import ModelAdapter, get_adapter, supported_classes

__all__ = ["ModelAdapter", "get_adapter", "supported_classes"]
