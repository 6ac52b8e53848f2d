"""Chat prompts: one (image, question) through a processor's chat template, for any supported family."""

from __future__ import annotations

from pathlib import Path


def open_image(path):
    """An RGB PIL image from a path (None stays None); raises what PIL raises for unreadable files."""
    from PIL import Image

    if path is None:
        return None
    with Image.open(path) as im:
        return im.convert("RGB")


def build_inputs(processor, question: str, image) -> dict:
    """The chat-templated prompt of one (image, question) through the processor, batch 1."""
    if isinstance(image, (str, Path)):
        image = open_image(image)
    content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": question}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    if image is None:
        return processor(text=[prompt], return_tensors="pt")
    return processor(images=[image], text=[prompt], return_tensors="pt")
