"""LLaVA-1.5 (``LlavaForConditionalGeneration``) and LLaVA-NeXT (``LlavaNextForConditionalGeneration``)."""

from __future__ import annotations

import functools
import types

import torch

from attnkit.models.base import ModelAdapter


class LlavaAdapter(ModelAdapter):
    """CLIP vision tower -> MLP projector -> Llama/Vicuna/Mistral LLM.

    LLaVA-1.5 gives every image the vision tower's patch count (576 for CLIP-L/336). LLaVA-NeXT's
    AnyRes gives each image base crop + unpadded grid + one newline token per grid row, a count
    that depends on the image size; it is computed as the processor computes it.
    """

    families = {"LlavaForConditionalGeneration": "llava", "LlavaNextForConditionalGeneration": "llava_next"}

    @property
    def vision_tower(self) -> torch.nn.Module:
        return self.model.model.vision_tower

    @property
    def projector(self) -> torch.nn.Module:
        return self.model.model.multi_modal_projector

    @property
    def patches_per_crop(self) -> int:
        vc = self.model.config.vision_config
        full = self.model.config.vision_feature_select_strategy == "full"
        return (vc.image_size // vc.patch_size) ** 2 + int(full)

    def image_token_counts(self, args: tuple, kwargs: dict) -> list[int] | None:
        counts = super().image_token_counts(args, kwargs)
        pixel_values = self.forward_arg("pixel_values", args, kwargs)
        if counts is not None or pixel_values is None:
            return counts
        if self.family == "llava":
            return [self.patches_per_crop] * pixel_values.shape[0]
        image_sizes = self.forward_arg("image_sizes", args, kwargs)
        return [self._next_tokens(int(h), int(w)) for h, w in image_sizes.tolist()]

    def _next_tokens(self, height: int, width: int) -> int:
        from transformers import LlavaNextProcessor

        cfg = self.model.config
        size, patch = cfg.vision_config.image_size, cfg.vision_config.patch_size
        ns = types.SimpleNamespace(image_processor=types.SimpleNamespace(image_grid_pinpoints=cfg.image_grid_pinpoints),
                                   patch_size=patch, num_additional_image_tokens=0)
        ns._get_unpadded_features = functools.partial(LlavaNextProcessor._get_unpadded_features, ns)
        n = LlavaNextProcessor._get_number_of_features(ns, height, width, size, size)
        return n + int(cfg.vision_feature_select_strategy == "full")
