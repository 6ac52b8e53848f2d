"""Qwen2-VL (``Qwen2VLForConditionalGeneration``) and Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``)."""

from __future__ import annotations

import torch

from attnkit.models.base import ModelAdapter


class QwenVLAdapter(ModelAdapter):
    """Native-resolution ViT (no [CLS]) -> 2x2 patch merger -> Qwen2 LLM with 3-D (t, h, w) mrope positions.

    Each image is ``<|vision_start|> <|image_pad|> * (t*h*w/4) <|vision_end|>``, so its tokens form
    one run; a sample may hold several images.
    """

    families = {"Qwen2VLForConditionalGeneration": "qwen2_vl", "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl"}

    @property
    def vision_tower(self) -> torch.nn.Module:
        return self.model.model.visual

    @property
    def projector(self) -> torch.nn.Module:
        return self.model.model.visual.merger

    @property
    def merge_size(self) -> int:
        return self.model.config.vision_config.spatial_merge_size

    def image_token_counts(self, args: tuple, kwargs: dict) -> list[int] | None:
        counts = super().image_token_counts(args, kwargs)
        grid = self.forward_arg("image_grid_thw", args, kwargs)
        if counts is not None or grid is None:
            return counts
        return (grid.prod(-1) // self.merge_size**2).tolist()
