"""Processors without the video part (Qwen-VL, Qwen3-VL, LLaVA-OneVision, InternVL).

transformers' ``Qwen2VLProcessor`` (and its kin) builds a video processor, which needs torchvision; the CPU torch
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


IMAGE_ONLY_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision", "internvl")


@cache
def image_only_processor_class(family: str) -> type:
    """The stock processor of ``family`` without its video processor (same call, same outputs for images).

    Qwen2-VL / Qwen2.5-VL: :func:`qwen_image_processor_class`. Qwen3-VL, LLaVA-OneVision and InternVL: the
    subclass declares only ``image_processor`` and ``tokenizer`` and passes ``video_processor=None`` to the
    stock ``__init__`` (their ``__init__`` bodies only read the tokenizer's marker tokens).
    """
    if family in ("qwen2_vl", "qwen2_5_vl"):
        return qwen_image_processor_class(family)
    from transformers import InternVLProcessor, LlavaOnevisionProcessor, Qwen3VLProcessor

    bases = {"qwen3_vl": Qwen3VLProcessor, "llava_onevision": LlavaOnevisionProcessor, "internvl": InternVLProcessor}
    if family not in bases:
        raise ValueError(f"no image-only processor for {family!r}; available for qwen2_vl, qwen2_5_vl, "
                         f"{', '.join(bases)}")
    base = bases[family]

    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        base.__init__(self, image_processor, tokenizer, None, **kwargs)

    name = base.__name__.replace("Processor", "ImageOnlyProcessor")
    return type(name, (base,), {"__init__": __init__, "video_processor": None, "__module__": __name__})
