"""Qwen3-VL (``Qwen3VLForConditionalGeneration``)."""

from __future__ import annotations

from attnkit.models.base import PruningComing
from attnkit.models.qwen_vl import QwenVLAdapter


class Qwen3VLAdapter(PruningComing, QwenVLAdapter):
    """Qwen2-VL's layout (no-[CLS] ViT, 2x2 merger, ``<|vision_start|> <|image_pad|> * (t*h*w/4) <|vision_end|>``
    per image, counts from ``image_grid_thw``) with interleaved 3-D mrope and DeepStack.

    DeepStack: the outputs of the vision blocks ``deepstack_visual_indexes`` go through their own mergers and
    are added to the LLM's hidden states at the visual positions after decoder layers 0 ... n-1
    (``Qwen3VLTextModel._deepstack_process``, in the text model's loop, outside the layers). Without
    token dropping this needs nothing: every intervention sees the hidden states, masks and positions the
    model makes. Token pruning (which must drop each token's DeepStack rows with it) is not written yet.
    """

    noised_images_unsupported = ("Qwen3-VL's image features carry DeepStack rows that the noised "
                                 "re-encoding does not replace yet")

    families = {"Qwen3VLForConditionalGeneration": "qwen3_vl"}

    @property
    def deepstack_layers(self) -> list[int]:
        """Decoder layers after which DeepStack features are added (one per vision feature level)."""
        return list(range(len(self.model.config.vision_config.deepstack_visual_indexes)))
