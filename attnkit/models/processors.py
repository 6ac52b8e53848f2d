"""Qwen-VL processors without the video part.

transformers' ``Qwen2VLProcessor`` builds a video processor, which needs torchvision; the CPU torch
build this project pins has no matching torchvision wheel. For images the video processor is never
used, so these subclasses declare only ``image_processor`` and ``tokenizer`` (``ProcessorMixin``
reads its parts from the ``__init__`` signature). With torchvision installed, the stock processor
works too and :func:`attnkit.load` uses it.
"""

from __future__ import annotations

from functools import cache

from transformers.processing_utils import ProcessorMixin


@cache
def qwen_image_processor_class(family: str) -> type:
    """``Qwen2VLProcessor`` / ``Qwen2_5_VLProcessor`` restricted to images (same call, same outputs)."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLProcessor

    base = {"qwen2_vl": Qwen2VLProcessor, "qwen2_5_vl": Qwen2_5_VLProcessor}[family]

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", "<|image_pad|>")
        self.video_token = getattr(tokenizer, "video_token", "<|video_pad|>")
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    name = base.__name__.replace("Processor", "ImageOnlyProcessor")
    return type(name, (base,), {"__init__": __init__, "video_processor": None, "__module__": __name__})
