"""VisualSpans: per-sample visual positions and image membership, checked against the vision features."""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit import testing
from attnkit.hooks.spans import VisualSpans
from attnkit.models import get_adapter


def _features_per_image(model, inputs) -> list[int]:
    """Rows the model itself produces per image (independent of attnkit's token counting)."""
    kw = {k: v for k, v in inputs.items() if k in ("pixel_values", "image_sizes", "image_grid_thw")}
    with torch.no_grad():
        feats = model.model.get_image_features(**kw, return_dict=True).pooler_output
    return [f.shape[0] for f in feats]


@pytest.mark.parametrize("family", testing.FAMILIES)
@pytest.mark.parametrize("n_images", [1, 2])
def test_spans_match_features_per_image(tiny, family, n_images):
    if family == "llava_next" and n_images == 2:
        sizes = [(32, 32), (64, 32), (32, 64)]
    else:
        sizes = [(32, 32), (48, 32), (32, 64)] if family.startswith("qwen") else None
    model, processor = tiny(family)
    inputs = testing.tiny_inputs(processor, batch=3, n_images=n_images, image_sizes=sizes)
    adapter = get_adapter(model)
    spans = adapter.visual_spans(inputs["input_ids"], inputs["attention_mask"], adapter.image_token_counts((), inputs))
    per_image = _features_per_image(model, inputs)
    got = [len(p) for b in range(3) for p in spans.images(b)]
    assert got == per_image
    assert spans.counts() == [sum(per_image[b * n_images:(b + 1) * n_images]) for b in range(3)]
    for b in range(3):
        pos = spans.positions(b)
        assert bool(inputs["attention_mask"][b, pos].all())              # never on padding
        assert bool((inputs["input_ids"][b, pos] == model.config.image_token_id).all())
        images = spans.images(b)
        assert all(images[i].max() < images[i + 1].min() for i in range(len(images) - 1))


def test_left_padding_shifts_positions(tiny):
    model, processor = tiny("llava")
    inputs = testing.tiny_inputs(processor, batch=3)
    adapter = get_adapter(model)
    spans = adapter.visual_spans(inputs["input_ids"], inputs["attention_mask"], adapter.image_token_counts((), inputs))
    pads = (inputs["attention_mask"] == 0).sum(1)
    starts = [int(spans.positions(b)[0]) for b in range(3)]
    assert len(set(starts)) > 1
    assert [s - int(p) for s, p in zip(starts, pads)] == [starts[0] - int(pads[0])] * 3


def test_back_to_back_images_are_split_by_counts():
    ids = torch.tensor([[5, 7, 7, 7, 7, 7, 7, 5, 7, 7, 7],
                        [0, 0, 0, 0, 0, 5, 5, 7, 7, 5, 5]])
    spans = VisualSpans.from_input_ids(ids, 7, image_token_counts=[2, 4, 3, 2])
    assert spans.image_id.tolist() == [[-1, 0, 0, 1, 1, 1, 1, -1, 2, 2, 2],
                                       [-1] * 7 + [0, 0, -1, -1]]
    runs = VisualSpans.from_input_ids(ids, 7)
    assert runs.image_id.tolist()[0] == [-1, 0, 0, 0, 0, 0, 0, -1, 1, 1, 1]
    assert spans.text_after_image().tolist()[0] == [False] * 7 + [True] + [False] * 3
    assert spans.counts() == [9, 2]


def test_handle_spans_follow_generate(tiny):
    model, processor = tiny("qwen2_5_vl")
    inputs = testing.tiny_inputs(processor, batch=2)
    with attnkit.intervene(model) as h:
        model.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert h.state.spans.length == inputs["input_ids"].shape[1]
        assert h.stats()["visual_tokens"] == [16, 16]


def _new_family_features_per_image(model, processor, inputs, family, images) -> list[int]:
    """Visual tokens the model itself gives each image. InternVL's features are per tile (the model is not told
    which tiles belong to which image): tiles per image from the image processor, times tokens per tile."""
    if family == "internvl":
        tiles = processor.image_processor(images=images, return_tensors="pt")["num_patches"]
        return [int(n) * model.config.image_seq_length for n in tiles]
    if family == "llava_onevision":   # a sample's several images: one crop each (batch_num_images)
        kw = {k: inputs[k] for k in ("pixel_values", "image_sizes", "batch_num_images")}
        with torch.no_grad():
            return [f.shape[0] for f in model.model.get_image_features(**kw, return_dict=True).pooler_output]
    return _features_per_image(model, inputs)


# nested: images as one list per sample, which only LLaVA-OneVision reads differently (one crop per image)
@pytest.mark.parametrize("family,nested", [(f, False) for f in testing.NEW_FAMILIES] + [("llava_onevision", True)])
@pytest.mark.parametrize("n_images", [1, 2])
def test_new_family_spans_match_the_model_per_image(tiny, family, n_images, nested):
    sizes = [(32, 32), (64, 32), (32, 64), (128, 96)]
    model, processor = tiny(family)
    inputs = testing.tiny_inputs(processor, batch=3, n_images=n_images, image_sizes=sizes, nested=nested or None)
    images = [testing.tiny_image(b * 10 + i, *sizes[(b * n_images + i) % len(sizes)])
              for b in range(3) for i in range(n_images)]
    adapter = get_adapter(model)
    spans = adapter.visual_spans(inputs["input_ids"], inputs["attention_mask"], adapter.image_token_counts((), inputs))
    per_image = _new_family_features_per_image(model, processor, inputs, family, images)
    assert [len(p) for b in range(3) for p in spans.images(b)] == per_image
    assert len(set(per_image)) > 1 or family == "gemma3" or nested    # ragged counts are exercised
    for b in range(3):
        pos = spans.positions(b)
        assert bool(inputs["attention_mask"][b, pos].all())
        assert bool((inputs["input_ids"][b, pos] == model.config.image_token_id).all())


def _kwargs_of_text_model(model, inputs) -> dict:
    seen = {}
    h = model.model.language_model.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        h.remove()
    return seen


def test_qwen3_vl_deepstack_rows_sit_on_the_spans(tiny):
    """DeepStack adds its features at ``visual_pos_masks`` in the first LLM layers: exactly the spans' positions,
    one row per visual token (with back-to-back images and left padding)."""
    model, processor = tiny("qwen3_vl")
    inputs = testing.tiny_inputs(processor, batch=3, n_images=2, image_sizes=[(32, 32), (48, 32), (32, 64)])
    adapter = get_adapter(model)
    spans = adapter.visual_spans(inputs["input_ids"], inputs["attention_mask"], adapter.image_token_counts((), inputs))
    kw = _kwargs_of_text_model(model, inputs)
    assert torch.equal(kw["visual_pos_masks"], spans.visual)
    assert len(kw["deepstack_visual_embeds"]) == len(adapter.deepstack_layers) == 2
    assert all(d.shape[0] == sum(spans.counts()) for d in kw["deepstack_visual_embeds"])


def test_gemma3_image_blocks_are_the_spans_images(tiny):
    """Gemma 3's bidirectional blocks come from ``token_type_ids``: each block is one image of the spans."""
    model, processor = tiny("gemma3")
    inputs = testing.tiny_inputs(processor, batch=2, n_images=2)
    adapter = get_adapter(model)
    spans = adapter.visual_spans(inputs["input_ids"], inputs["attention_mask"], adapter.image_token_counts((), inputs))
    assert torch.equal(inputs["token_type_ids"].bool(), spans.visual)
    assert [len(p) for b in range(2) for p in spans.images(b)] == [model.config.mm_tokens_per_image] * 4
