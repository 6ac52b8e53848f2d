"""One test over the whole registry (as kvpress tests every press): every method × all eight families × batch 1/3.

For each registered method an example spec valid on the tiny models: wrap, forward, ``generate()`` equals its
reference (the no-cache loop; for methods that fix their choice at prefill, prefill + one cached chunk),
``remove()`` leaves bit-identical logits; padding on either side and expanded batches (beams,
``num_return_sequences``) equal each sample run alone. Where the README's matrix says a method is refused on
a family, the test checks the refusal at ``wrap()``. A newly registered method fails here until it has an
example.
"""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit import testing
from attnkit.interventions import REGISTRY

# name -> (example spec on the tiny models, reference): "loop" = the no-cache loop, "chunk" = prefill + chunk
EXAMPLES = {
    "cls-prune": ("cls-prune:keep=5", "chunk"),
    "fastv": ("fastv:k=2,keep=6", "chunk"),
    "vte": ("vte:policy=layer,exit_layer=1", "chunk"),
    "visionzip": ("visionzip:dominant=4,contextual=3", "chunk"),
    "dart": ("dart:k=2,keep=8,pivots=2,text_pivots=2", "chunk"),
    "pyramiddrop": ("pyramiddrop:ratio=0.5", "chunk"),
    "sparsevlm": ("sparsevlm:keep=192", "chunk"),
    "var": ("var:sink_dims=0+1,tau=1.0", "loop"),
    "vhr": ("vhr:alpha=2.0", "chunk"),
    "pai": ("pai:alpha=0.5", "loop"),
    "vcd": ("vcd", "loop"),
    "mma": ("mma", "chunk"),
    "record": ("record", "loop"),
}
GEN = dict(do_sample=False, suppress_tokens=testing.SPECIAL_IDS)


def test_every_registered_method_has_an_example():
    assert set(EXAMPLES) == set(REGISTRY), "add an example spec for each registered method"


def _logits(model, inputs, **kw):
    with torch.no_grad():
        return model(**inputs, **kw).logits


def _refusal(model, name: str) -> str | None:
    """The README matrix's refusals: pruners on the families whose vision capture is not written yet, and vcd
    where the noised re-encoding is not handled."""
    adapter = attnkit.models.get_adapter(model)
    if getattr(REGISTRY[name], "drops_tokens", False) and not adapter.supports_token_dropping:
        return "not yet supported on"
    if name == "vcd" and adapter.noised_images_unsupported:
        return "vcd is not supported on"
    return None


@pytest.mark.parametrize("family", testing.ALL_FAMILIES)
@pytest.mark.parametrize("name", sorted(EXAMPLES))
@pytest.mark.parametrize("batch", [1, 3])
def test_method_wraps_generates_and_removes(tiny, one_thread, family, name, batch):
    spec, reference = EXAMPLES[name]
    model, processor = tiny(family)
    inputs = testing.tiny_inputs(processor, batch=batch)
    before = _logits(model, inputs)
    refused = _refusal(model, name)
    if refused:
        with pytest.raises(ValueError, match=refused):
            attnkit.wrap(model, spec)
        assert attnkit.handle_of(model) is None and torch.equal(_logits(model, inputs), before)
        return
    with attnkit.intervene(model, spec) as handle:
        logits = _logits(model, inputs)
        assert torch.isfinite(logits[inputs["attention_mask"].bool()]).all()
        out = model.generate(**inputs, max_new_tokens=4, output_logits=True, return_dict_in_generate=True, **GEN)
        assert handle.stats()["decode_steps"] == 3
        if reference == "loop":
            assert torch.equal(out.sequences, testing.greedy_reference(model, inputs, 4, family))
        else:
            ref = testing.prefill_chunk_logits(model, inputs, out.sequences, family)
            torch.testing.assert_close(torch.stack(out.logits, 1), ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(_logits(model, inputs), before)


def _one(inputs, b):
    """Sample ``b`` of a padded batch, unpadded, with its own image inputs."""
    one = {k: v[b:b + 1] for k, v in inputs.items() if k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    keep = one["attention_mask"][0].bool()
    one = {k: v[:, keep] for k, v in one.items()}
    images = {k: v for k, v in inputs.items() if k not in one and k != "position_ids"}
    if "image_grid_thw" in images:
        per = images["image_grid_thw"].prod(-1).tolist()
        start = sum(per[:b])
        one.update(pixel_values=images["pixel_values"][start:start + per[b]],
                   image_grid_thw=images["image_grid_thw"][b:b + 1])
    else:
        one.update({k: v[b:b + 1] for k, v in images.items()})
    return one


def _alone(model, inputs, b, positions):
    one = _one(inputs, b)
    kw = {"position_ids": torch.arange(one["input_ids"].shape[1])[None]} if positions else {}
    return _logits(model, one, **kw)[0]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_padded_batch_equals_each_sample_alone(tiny, one_thread, family, side, name):
    spec, _ = EXAMPLES[name]
    model, processor = tiny(family)
    inputs = testing.padded_inputs(processor, 3, side)
    positions = not family.startswith("qwen")
    kw = {"position_ids": (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)} if positions else {}
    with attnkit.intervene(model, spec):
        batched = _logits(model, inputs, **kw)
        for b in range(3):
            keep = inputs["attention_mask"][b].bool()
            torch.testing.assert_close(batched[b, keep], _alone(model, inputs, b, positions), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_beams_and_return_sequences_equal_each_sample_alone(tiny, one_thread, family, name):
    spec, _ = EXAMPLES[name]
    model, processor = tiny(family)
    inputs = testing.tiny_inputs(processor, batch=2)
    gen = dict(GEN, max_new_tokens=3, num_beams=2, num_return_sequences=2)
    with attnkit.intervene(model, spec):
        batched = model.generate(**inputs, **gen)
        for b in range(2):
            one = _one(inputs, b)
            alone = model.generate(**one, **gen)
            new = batched[2 * b:2 * b + 2, inputs["input_ids"].shape[1]:]
            assert torch.equal(new, alone[:, one["input_ids"].shape[1]:])
