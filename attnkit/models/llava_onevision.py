"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``)."""

from __future__ import annotations

import torch

from attnkit.models.llava import LlavaAdapter


class LlavaOnevisionAdapter(LlavaAdapter):
    """SigLIP (no [CLS], ``vision_feature_select_strategy="full"``) -> MLP projector -> Qwen2 LLM, 1-D positions.

    AnyRes-max-9 packing per image (``pack_image_features``): the base crop (no newline), then the crop grid
    stitched into one map, unpadded to the image's aspect ratio, bilinearly downsampled when it holds more
    than 9 crops' worth of features (ratio > 1.1), one ``image_newline`` per map row; a sample with several
    images (``batch_num_images > 1``) gives each image its base crop only, plus one newline. The count of
    each image is taken from the model's own ``pack_image_features`` on a 1-dimensional stand-in feature,
    so it is exactly what the model packs. Videos (``<video>``) are not visual tokens here.

    Pruning (vision capture, :meth:`install_vision_capture`): the score is ``received`` (SigLIP has no [CLS]),
    and every per-patch quantity rides through the model's own packing like LLaVA-NeXT's, so a downsampled
    token gets the same bilinear mix of its patches' scores, keys and projector inputs as its features get
    (interpolation is linear: its score is the interpolated score map). Budgets per image as for NeXT: the
    base crop (group 0) and the grid share the budget in proportion to their tokens; ``budget=per_crop`` keeps
    the same k in each group; newlines (group -1) are always kept.
    """

    families = {"LlavaOnevisionForConditionalGeneration": "llava_onevision"}
    vision_scores = ("received",)

    def check_vision_wants(self, wants: frozenset[str]) -> None:
        if "cls" in wants:
            raise ValueError("score='cls' is not available for llava_onevision: its SigLIP tower has no [CLS] token; "
                             "use score='received' (mean attention each patch receives, the documented substitute)")
        super().check_vision_wants(wants)

    def install_vision_capture(self, installed, wants: frozenset[str], sink) -> None:
        """At the encoder layer whose output feeds the projector (``vision_feature_layer``), per crop: ``received``
        = the mean attention each patch receives from the crop's patches (head mean; SigLIP has no [CLS], the
        substitute the FasterVLM/VisPruner author recommends), ``keys`` (head mean) and ``features`` (the layer's
        output rows, what the projector maps); then packed as the model packs its features.

        A grid downsampled by AnyRes-max (more than 9 crops' worth) mixes up to 4 patches per token by bilinear
        weights w (align_corners=False, as the model): its ``received``/``keys``/``features`` are Σ w·(the
        patches' values), the same interpolation applied to those maps. Note :meth:`project` of such a
        ``features`` row is the projector of the mixed row, while the model mixes projected rows (the projector is
        not linear): merged rows (visionzip) are projected from mixed rows, as for every other token. Its group
        is the crop with the largest weight (the first on ties).
        """
        super().install_vision_capture(installed, wants, sink)

    def _crops_per_image(self, image_sizes, kwargs: dict) -> list[int]:
        from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

        cfg = self.model.config
        per_sample = kwargs.get("batch_num_images")
        patching = [True] * len(image_sizes) if per_sample is None else [int(n) == 1 for n in per_sample
                                                                         for _ in range(int(n))]
        return [image_size_to_num_patches(image_size=size, grid_pinpoints=cfg.image_grid_pinpoints,
                                          patch_size=cfg.vision_config.image_size) if patch else 1
                for size, patch in zip(image_sizes, patching)]

    def _pack_channels(self, per_image: list[torch.Tensor], image_sizes, newline: torch.Tensor,
                       kwargs: dict) -> list[torch.Tensor]:
        aspect = kwargs.get("vision_aspect_ratio") or self.model.config.vision_aspect_ratio
        packed, _ = self.model.model.pack_image_features(per_image, image_sizes, image_newline=newline,
                                                         vision_aspect_ratio=aspect)
        return list(packed)

    def image_token_counts(self, args: tuple, kwargs: dict) -> list[int] | None:
        counts = super(LlavaAdapter, self).image_token_counts(args, kwargs)   # pre-encoded: their rows
        pixel_values = self.forward_arg("pixel_values", args, kwargs)
        image_sizes = self.forward_arg("image_sizes", args, kwargs)
        if counts is not None or pixel_values is None or image_sizes is None:
            return counts
        cfg = self.model.config
        crops = self._crops_per_image(image_sizes, {"batch_num_images": self.forward_arg("batch_num_images", args,
                                                                                          kwargs)})
        side = cfg.vision_config.image_size // cfg.vision_config.patch_size
        stand_in = [torch.zeros(n, side * side, 1) for n in crops]
        aspect = self.forward_arg("vision_aspect_ratio", args, kwargs) or cfg.vision_aspect_ratio
        _, lens = self.model.model.pack_image_features(stand_in, image_sizes.cpu(), image_newline=torch.zeros(1),
                                                       vision_aspect_ratio=aspect)
        return lens.tolist()
