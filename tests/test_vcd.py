"""vcd: (1 + alpha) l - alpha l' with the adaptive plausibility cut, l' from a diffusion-noised image."""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit import testing
from attnkit.interventions.vcd import VCD, diffusion_noise, noise_level

GEN = dict(do_sample=False, suppress_tokens=testing.SPECIAL_IDS)
PROMPTS = ["describe this image", "what color is the large circle on the left of the picture", "how many dogs"]


def _batch(processor, which, side="left"):
    texts = [testing.tiny_prompt(processor, PROMPTS[i]) for i in which]
    before = processor.tokenizer.padding_side
    processor.tokenizer.padding_side = side
    try:
        return processor(images=[[testing.tiny_image(10 * i)] for i in which], text=texts, return_tensors="pt",
                         padding=True)
    finally:
        processor.tokenizer.padding_side = before


def _noised(inputs, step=500, seed=0):
    grid = inputs.get("image_grid_thw")
    units = None if grid is None else grid.prod(-1).tolist()
    return {**inputs, "pixel_values": diffusion_noise(inputs["pixel_values"], step, seed, units)}


def test_noise_schedule_and_distortion():
    a, b = noise_level(500)                       # VCD's schedule at T=500 and T=999 (baselines.md §5)
    assert abs(a - 0.863) < 1e-3 and abs(b - 0.505) < 1e-3
    a9, b9 = noise_level(999)
    assert abs(a9 - 0.285) < 1e-3 and abs(b9 - 0.959) < 1e-3
    torch.manual_seed(0)
    x = torch.randn(3, 3, 32, 32)
    y = diffusion_noise(x, 500, seed=7)
    eps = (y - a * x) / b
    assert abs(float(eps.mean())) < 0.05 and abs(float(eps.std()) - 1) < 0.05
    assert torch.equal(y, diffusion_noise(x, 500, seed=7))                       # deterministic
    assert torch.equal(y[1:2], diffusion_noise(x[1:2], 500, seed=7))             # per image: batch = alone
    assert not torch.equal(eps[0], eps[1])                                       # images get their own noise
    assert not torch.equal(y, diffusion_noise(x, 500, seed=8))
    flat = x.reshape(12, -1)                                                     # Qwen-style flattened patches
    z = diffusion_noise(flat, 500, seed=7, units=[4, 8])
    assert torch.equal(z[4:], diffusion_noise(flat[4:], 500, seed=7, units=[8]))


def _contrast(l, l_noised, alpha=1.0, beta=0.1):
    cd = (1 + alpha) * l - alpha * l_noised
    return cd.masked_fill(l < torch.log(torch.tensor(beta)) + l.max(-1, keepdim=True).values, float("-inf"))


def _assert_same_cut(got, want):
    assert torch.equal(torch.isinf(got), torch.isinf(want)) and bool(torch.isfinite(want).any(-1).all())
    torch.testing.assert_close(got[torch.isfinite(want)], want[torch.isfinite(want)], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", testing.ALL_FAMILIES)
def test_logits_equal_a_hand_computation(tiny, family):
    """cd from two unmodified forwards: the clean inputs and the same inputs with noised pixel_values."""
    model, processor = tiny(family)
    inputs = _batch(processor, [0, 1, 2])
    with torch.no_grad():
        clean = model(**inputs).logits[:, -1]
        noised = model(**_noised(inputs)).logits[:, -1]
        with attnkit.intervene(model, "vcd"):
            got = model(**inputs).logits[:, -1]
        with attnkit.intervene(model, "vcd:alpha=0.5,beta=0.9,noise_step=999,seed=3"):
            other = model(**inputs).logits[:, -1]
        far = model(**_noised(inputs, 999, 3)).logits[:, -1]
    _assert_same_cut(got, _contrast(clean, noised))
    _assert_same_cut(other, _contrast(clean, far, 0.5, 0.9))
    assert torch.isinf(other).any() and not torch.allclose(noised, clean)


@pytest.mark.parametrize("family", testing.ALL_FAMILIES)
def test_generate_with_cache_equals_a_no_cache_loop_and_each_sample_alone(tiny, family):
    model, processor = tiny(family)
    inputs = _batch(processor, [0, 1, 2])
    logits = dict(output_logits=True, return_dict_in_generate=True)
    with attnkit.intervene(model, "vcd:beta=0.001"):
        out = model.generate(**inputs, max_new_tokens=4, **GEN, **logits)
        loop = testing.greedy_reference(model, inputs, 4, family)
        alone = [model.generate(**_batch(processor, [b]), max_new_tokens=4, **GEN)[0, -4:] for b in range(3)]
    assert torch.equal(out.sequences, loop)
    assert torch.equal(out.sequences[:, -4:], torch.stack(alone))
    plain = model.generate(**inputs, max_new_tokens=4, **GEN, **logits)
    assert not torch.allclose(out.logits[0], plain.logits[0])   # the contrast moved the first step's logits


@pytest.mark.parametrize("images", [1, 2])
@pytest.mark.parametrize("family", testing.ALL_FAMILIES)
def test_beams_and_return_sequences(tiny, family, images):
    """The noised branch's cache follows beam reordering and its image features follow generate's expansion
    (each sample's group of images repeated): cached beams equal generate without a cache (both branches
    run in full at each step)."""
    model, processor = tiny(family)
    inputs = (_batch(processor, [0, 1]) if images == 1 else
              testing.tiny_inputs(processor, batch=2, n_images=2, image_sizes=[(32, 32), (48, 32)]))
    beams = dict(max_new_tokens=4, num_beams=3, num_return_sequences=2, **GEN)
    with attnkit.intervene(model, "vcd:beta=0.001"):
        cached = model.generate(**inputs, **beams)
        assert torch.equal(cached, model.generate(**inputs, use_cache=False, **beams))
        sampled = model.generate(**inputs, max_new_tokens=3, do_sample=True, num_return_sequences=2,
                                 suppress_tokens=testing.SPECIAL_IDS)
    assert cached.shape[0] == 4 and sampled.shape[0] == 4


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_right_padding_reads_each_sample_last_real_row(tiny, family):
    model, processor = tiny(family)
    batch = _batch(processor, [0, 1, 2], side="right")
    with attnkit.intervene(model, "vcd"), torch.no_grad():
        together = model(**batch).logits
        for b in range(3):
            alone = model(**_batch(processor, [b])).logits[0, -1]
            last = int(batch["attention_mask"][b].nonzero().max())
            _assert_same_cut(together[b, last][None], alone[None])


def test_conflicts_spec_and_tuple_outputs(tiny):
    model, processor = tiny("llava")
    with attnkit.intervene(model, "vcd"), pytest.raises(ValueError, match="return_dict=True"):
        model(**_batch(processor, [0]), return_dict=False)
    with pytest.raises(ValueError, match="vcd and fastv cannot be combined: the noised-image branch"):
        attnkit.wrap(model, "vcd", "fastv")
    with pytest.raises(ValueError, match="pai and vcd cannot be combined: both replace the logits"):
        attnkit.wrap(model, "pai", "vcd")
    attnkit.wrap(model, "pai:cfg=false", "vcd").remove()
    with pytest.raises(ValueError, match="noise_step=1000"):
        attnkit.build("vcd:noise_step=1000")
    assert attnkit.build("vcd:alpha=0.5,seed=3") == VCD(alpha=0.5, seed=3)
    assert getattr(model, "_attnkit_handle", None) is None and "get_image_features" not in model.model.__dict__
