"""vcd on Qwen3-VL: the noised branch is the model fed the noised image, DeepStack rows included."""

from __future__ import annotations

import torch

import attnkit
from attnkit import testing
from attnkit.interventions.vcd import diffusion_noise

FAMILY = "qwen3_vl"
GEN = dict(do_sample=False, suppress_tokens=testing.SPECIAL_IDS)


def _noised(inputs, step=500, seed=0):
    units = inputs["image_grid_thw"].prod(-1).tolist()
    return {**inputs, "pixel_values": diffusion_noise(inputs["pixel_values"], step, seed, units)}


def test_noised_branch_equals_the_model_on_the_noised_image(tiny):
    """cd from two unmodified forwards (the clean inputs; the noised pixels, whose encoding gives the noised
    DeepStack rows): equal; the noised main rows with the CLEAN DeepStack rows give a different l'."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

    model, processor = tiny(FAMILY)
    inputs = testing.tiny_inputs(processor, batch=3)
    alpha, beta = 1.0, 0.1
    with torch.no_grad():
        clean = model(**inputs).logits[:, -1]
        noised = model(**_noised(inputs)).logits[:, -1]
        grid = inputs["image_grid_thw"]
        enc_clean = model.model.get_image_features(inputs["pixel_values"], grid, return_dict=True)
        enc_noised = model.model.get_image_features(_noised(inputs)["pixel_values"], grid, return_dict=True)
        mixed = BaseModelOutputWithDeepstackFeatures(pooler_output=enc_noised.pooler_output,
                                                     deepstack_features=enc_clean.deepstack_features)
        text = {k: v for k, v in inputs.items() if k not in ("pixel_values",)}
        half = model(**text, mm_encoder_outputs={"image": mixed}).logits[:, -1]
        with attnkit.intervene(model, "vcd"):
            got = model(**inputs).logits[:, -1]
    want = (1 + alpha) * clean - alpha * noised
    want = want.masked_fill(clean < torch.log(torch.tensor(beta)) + clean.max(-1, keepdim=True).values, float("-inf"))
    finite = torch.isfinite(want)
    assert torch.equal(torch.isinf(got), ~finite) and bool(finite.any(-1).all())
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(half, noised, rtol=1e-4, atol=1e-4)


def test_generate_with_cache_equals_the_no_cache_loop_with_beams(tiny):
    model, processor = tiny(FAMILY)
    inputs = testing.tiny_inputs(processor, batch=2)
    with attnkit.intervene(model, "vcd:beta=0.001"):
        out = model.generate(**inputs, max_new_tokens=4, **GEN)
        assert torch.equal(out, testing.greedy_reference(model, inputs, 4, FAMILY))
        beams = dict(max_new_tokens=3, num_beams=2, num_return_sequences=2, **GEN)
        assert torch.equal(model.generate(**inputs, **beams), model.generate(**inputs, use_cache=False, **beams))
    assert not torch.equal(out, model.generate(**inputs, max_new_tokens=4, **GEN))
