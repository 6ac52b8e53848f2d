"""InternVL, HF-native (``InternVLForConditionalGeneration``: InternVL 2.5 / 3 checkpoints in transformers format)."""

from __future__ import annotations

from attnkit.models.base import ModelAdapter, PruningComing


class InternVLAdapter(PruningComing, ModelAdapter):
    """InternViT (with [CLS]) -> pixel shuffle (2x2 patches -> one token, ``downsample_ratio`` 0.5) -> MLP
    projector -> Qwen2 / Llama LLM with 1-D positions.

    An image is split by the processor into 1 ... ``max_patches`` tiles of ``image_size`` pixels, plus a
    thumbnail (last) when there is more than one; each tile gives ``image_seq_length`` tokens. The prompt
    holds ``<img> <IMG_CONTEXT> * (tokens x tiles) </img>`` per image, so each image is one run of visual
    tokens. The model is not told how many tiles each image has (``pixel_values`` stacks all tiles), so the
    images are told apart by their runs, not by counts.
    """

    noised_images_unsupported = ("InternVL returns per-tile feature lists that the noised "
                                 "re-encoding does not handle yet")

    families = {"InternVLForConditionalGeneration": "internvl"}

    @property
    def tokens_per_tile(self) -> int:
        return self.model.config.image_seq_length

    def image_token_counts(self, args: tuple, kwargs: dict) -> list[int] | None:
        # per-image counts are not in the inputs (generate's pre-encoded features are per TILE); the
        # <img> ... </img> delimiters make each image its own run
        return None
