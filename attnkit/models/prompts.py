"""Chat prompts: (image, question) pairs through a processor's chat template, for any supported family."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path


def open_image(path):
    """An RGB PIL image from a path (None stays None); raises what PIL raises for unreadable files."""
    from PIL import Image

    if path is None:
        return None
    with Image.open(path) as im:
        return im.convert("RGB")


def chat_prompt(processor, question: str, with_image: bool) -> str:
    """The chat-templated prompt text of one user turn (an image placeholder first if ``with_image``)."""
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


@contextlib.contextmanager
def padding_side(processor, side: str) -> Iterator[None]:
    """The processor's tokenizer pads on ``side`` inside the block; its own setting is restored after."""
    tok = getattr(processor, "tokenizer", processor)
    before = getattr(tok, "padding_side", None)
    tok.padding_side = side
    try:
        yield
    finally:
        tok.padding_side = before


def build_inputs(processor, question: str | Sequence[str], image) -> dict:
    """The chat-templated prompt of one (image, question) through the processor, batch 1; or, with a list of
    questions and a list of images (same length; an image may be None only if all are), one left-padded
    batch (the tokenizer's padding side is set to left for the call and restored)."""
    if isinstance(question, str):
        questions, images = [question], [image]
    else:
        questions, images = list(question), list(image)
        if len(questions) != len(images):
            raise ValueError(f"{len(questions)} questions but {len(images)} images; give one image per question")
    images = [open_image(im) if isinstance(im, (str, Path)) else im for im in images]
    with_image = [im is not None for im in images]
    if any(with_image) and not all(with_image):
        raise ValueError("a batch mixes samples with and without an image; batch them apart")
    prompts = [chat_prompt(processor, q, w) for q, w in zip(questions, with_image, strict=True)]
    kwargs = {"padding": True} if len(prompts) > 1 else {}
    with padding_side(processor, "left"):
        if not all(with_image):
            return processor(text=prompts, return_tensors="pt", **kwargs)
        return processor(images=images, text=prompts, return_tensors="pt", **kwargs)
