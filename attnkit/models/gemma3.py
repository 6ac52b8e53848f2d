"""Gemma 3 (``Gemma3ForConditionalGeneration``)."""

from __future__ import annotations

from attnkit.models.base import ModelAdapter, PruningComing


class Gemma3Adapter(PruningComing, ModelAdapter):
    """SigLIP (no [CLS]) -> 4x4 average pooling to ``mm_tokens_per_image`` (256) soft tokens -> RMSNorm + linear
    projection -> Gemma 3 LLM.

    Each image is ``<start_of_image> <image_soft_token> * 256 <end_of_image>``. In the LLM the image tokens
    attend to each other bidirectionally: ``token_type_ids == 1`` runs become ``block_sequence_ids`` and the
    model builds, once per forward in ``Gemma3Model.forward``, a mask dict: ``full_attention`` = causal OR
    same-image block, ``sliding_attention`` = (causal OR same-image block) AND sliding window. Layers
    alternate local (sliding window) and global attention. Prefill only: ``generate()`` passes
    ``token_type_ids`` at the first step, decode steps get plain causal (and sliding) masks. A local
    layer's cache keeps only the last ``sliding_window - 1`` keys in decode; interventions that index key
    columns map them through that window (:class:`attnkit.interventions.pai.PromptLayout`).
    Text embeddings are scaled by sqrt(hidden) inside the embedding; image features are not.
    """

    noised_images_unsupported = ("Gemma 3 returns per-image feature lists that the noised "
                                 "re-encoding does not handle yet")

    families = {"Gemma3ForConditionalGeneration": "gemma3"}

    @property
    def layer_types(self) -> list[str]:
        return list(self.text_config.layer_types)

    @property
    def sliding_window(self) -> int:
        return self.text_config.sliding_window

    def image_token_counts(self, args: tuple, kwargs: dict) -> list[int] | None:
        counts = super().image_token_counts(args, kwargs)
        pixel_values = self.forward_arg("pixel_values", args, kwargs)
        if counts is not None or pixel_values is None:
            return counts
        return [self.model.config.mm_tokens_per_image] * pixel_values.shape[0]
