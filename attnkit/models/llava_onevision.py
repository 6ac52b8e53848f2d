"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``)."""

from __future__ import annotations

import torch

from attnkit.models.base import PruningComing
from attnkit.models.llava import LlavaAdapter


class LlavaOnevisionAdapter(PruningComing, LlavaAdapter):
    """SigLIP (no [CLS], ``vision_feature_select_strategy="full"``) -> MLP projector -> Qwen2 LLM, 1-D positions.

    AnyRes-max-9 packing per image (``pack_image_features``): the base crop (no newline), then the crop grid
    stitched into one map, unpadded to the image's aspect ratio, bilinearly downsampled when it holds more
    than 9 crops' worth of features (ratio > 1.1), one ``image_newline`` per map row; a sample with several
    images (``batch_num_images > 1``) gives each image its base crop only, plus one newline. The count of
    each image is taken from the model's own ``pack_image_features`` on a 1-dimensional stand-in feature,
    so it is exactly what the model packs. Videos (``<video>``) are not visual tokens here.
    """

    families = {"LlavaOnevisionForConditionalGeneration": "llava_onevision"}

    def image_token_counts(self, args: tuple, kwargs: dict) -> list[int] | None:
        from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

        counts = super(LlavaAdapter, self).image_token_counts(args, kwargs)   # pre-encoded: their rows
        pixel_values = self.forward_arg("pixel_values", args, kwargs)
        image_sizes = self.forward_arg("image_sizes", args, kwargs)
        if counts is not None or pixel_values is None or image_sizes is None:
            return counts
        cfg = self.model.config
        per_sample = self.forward_arg("batch_num_images", args, kwargs)
        patching = [True] * len(image_sizes) if per_sample is None else [int(n) == 1 for n in per_sample
                                                                         for _ in range(int(n))]
        crops = [image_size_to_num_patches(image_size=size, grid_pinpoints=cfg.image_grid_pinpoints,
                                           patch_size=cfg.vision_config.image_size) if patch else 1
                 for size, patch in zip(image_sizes, patching)]
        side = cfg.vision_config.image_size // cfg.vision_config.patch_size
        stand_in = [torch.zeros(n, side * side, 1) for n in crops]
        aspect = self.forward_arg("vision_aspect_ratio", args, kwargs) or cfg.vision_aspect_ratio
        _, lens = self.model.model.pack_image_features(stand_in, image_sizes.cpu(), image_newline=torch.zeros(1),
                                                       vision_aspect_ratio=aspect)
        return lens.tolist()
