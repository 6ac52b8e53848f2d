"""attnkit in one screen: load a model, wrap it, generate, read the stats, remove (bit-identical again).

    python examples/quickstart.py                          # the embedded demo model (or a tiny random one)
    python examples/quickstart.py /models/llava-1.5-7b-hf cat.jpg "record:layers=0+8+16"
"""

from __future__ import annotations

import sys

import torch
from PIL import Image

import attnkit
from attnkit import testing
from attnkit.eval.loading import load_model_and_processor


def load(path: str | None):
    if path:
        return load_model_and_processor(path)
    from attnkit.synth.demo import demo_model_path

    if (demo_model_path() / "config.json").is_file():
        return load_model_and_processor(demo_model_path())
    print("(no demo model in this install: using a tiny random LLaVA from attnkit.testing)")
    return testing.tiny_model_and_processor("llava")


def main(argv: list[str]) -> None:
    model, processor = load(argv[0] if argv else None)
    image = Image.open(argv[1]).convert("RGB") if len(argv) > 1 else testing.tiny_image(0, 96, 96)
    spec = argv[2] if len(argv) > 2 else "record"
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is there a dog in the image?"}]}]
    prompt = processor.apply_chat_template(chat, add_generation_prompt=True)
    inputs = processor(images=[image], text=[prompt], return_tensors="pt").to(model.device)

    with torch.inference_mode():
        before = model(**inputs).logits

    handle = attnkit.wrap(model, spec)                       # or: with attnkit.intervene(model, spec): ...
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    answer = processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    print(f"{handle!r}\nanswer: {answer.strip()!r}")
    stats = handle.stats()
    print({k: v for k, v in stats.items() if k not in {iv.name for iv in handle.interventions}})
    for iv in handle.interventions:
        summary = {k: (v if not isinstance(v, dict) else f"<{len(v)} entries>") for k, v in stats[iv.name].items()}
        print(f"{iv.name}: {summary}")
    handle.remove()

    with torch.inference_mode():
        after = model(**inputs).logits
    print("bit-identical after remove():", torch.equal(before, after))


if __name__ == "__main__":
    main(sys.argv[1:])
