"""The mechanism: attention dispatch, visual-token bookkeeping, install/remove."""

from attnkit.hooks.attention import AttentionCall, attention_probs
from attnkit.hooks.install import Installed
from attnkit.hooks.spans import VisualSpans

__all__ = ["AttentionCall", "Installed", "VisualSpans", "attention_probs"]
