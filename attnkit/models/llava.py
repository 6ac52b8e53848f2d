"""LLaVA-1.5 (``LlavaForConditionalGeneration``) and LLaVA-NeXT (``LlavaNextForConditionalGeneration``)."""

from __future__ import annotations

import torch

from attnkit.models.base import ModelAdapter


class LlavaAdapter(ModelAdapter):
    """CLIP vision tower -> MLP projector -> Llama/Vicuna/Mistral LLM.

    LLaVA-1.5 gives every image the same number of tokens (the vision tower's patches), so adjacent
    images are told apart by count; LLaVA-NeXT's AnyRes gives each image its own count (base crop +
    unpadded grid + one newline token per grid row), so its images are told apart as separate runs of
    ``<image>`` tokens (the chat templates always put text between two images).
    """

    families = {"LlavaForConditionalGeneration": "llava", "LlavaNextForConditionalGeneration": "llava_next"}

    @property
    def vision_tower(self) -> torch.nn.Module:
        return self.model.model.vision_tower

    @property
    def projector(self) -> torch.nn.Module:
        return self.model.model.multi_modal_projector

    @property
    def tokens_per_image(self) -> int | None:
        if self.family != "llava":
            return None
        vc = self.model.config.vision_config
        n = (vc.image_size // vc.patch_size) ** 2
        return n + (1 if self.model.config.vision_feature_select_strategy == "full" else 0)
