"""pai: +alpha*|logit| on image keys of the last real query row; the CFG logit step with a text-only branch."""

from __future__ import annotations

import types

import pytest
import torch

import attnkit
from attnkit import testing
from attnkit.api import RunState
from attnkit.hooks.attention import AttentionCall, LayerHook
from attnkit.hooks.spans import VisualSpans
from attnkit.interventions.pai import PAI

SPECIAL = testing.SPECIAL_IDS  # random models must not emit image markers (the no-cache loop re-reads them)
GEN = dict(do_sample=False, suppress_tokens=SPECIAL)


def _spans():
    visual = torch.tensor([[0, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 0]], dtype=torch.bool)
    valid = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    return VisualSpans(visual=visual, image_id=torch.where(visual, 0, -1), valid=valid)


@pytest.mark.parametrize("step", [0, 1])
def test_adds_alpha_abs_logit_on_image_keys_of_last_row_only(step):
    torch.manual_seed(0)
    B, H, D, L = 2, 2, 4, 6
    q_len, kv_len = (L, L) if step == 0 else (1, L + 2)
    q, k, v = torch.randn(B, H, q_len, D), torch.randn(B, H, kv_len, D), torch.randn(B, H, kv_len, D)
    call = AttentionCall(types.SimpleNamespace(scaling=0.5), LayerHook(2, RunState(spans=_spans(), step=step), []),
                         q, k, v, None, None, {})
    seen = {}
    call.edit_scores(lambda rows, s: seen.setdefault("before", s.clone()))
    PAI(alpha=0.3).on_attention(call)
    call.edit_scores(lambda rows, s: seen.setdefault("after", s.clone()))
    call.finish()
    before, after = seen["before"], seen["after"]
    expected = before.clone()
    for b, cols in enumerate([[1, 2], [2, 3, 4]]):     # image keys of each sample (prompt positions)
        for j in cols:
            z = before[b, :, -1, j]
            expected[b, :, -1, j] = z + 0.3 * z.abs()
    assert torch.equal(after, expected)
    assert torch.equal(after[:, :, :-1], before[:, :, :-1])          # other rows untouched
    if step == 1:
        assert torch.equal(after[..., L:], before[..., L:])          # generated keys are text


def test_layers_and_spec(tiny):
    assert attnkit.build("pai:alpha=0.5,start_layer=1").spec() == "pai:alpha=0.5,start_layer=1"
    model, _ = tiny("llava")
    with attnkit.intervene(model, "pai") as handle:
        layers = handle.adapter.decoder_layers
        assert [i for i, layer in enumerate(layers) if layer.self_attn._attnkit_layer.interventions] == [2, 3]
    with pytest.raises(ValueError, match="do not fit this model's 4 layers"):
        attnkit.wrap(model, PAI(start_layer=2, end_layer=9))
    assert getattr(model, "_attnkit_handle", None) is None


@pytest.mark.parametrize("family", testing.ALL_FAMILIES)
@pytest.mark.parametrize("batch,impl", [(1, "sdpa"), (3, "sdpa"), (3, "eager")])
def test_family_identity_effect_and_generate(tiny, family, batch, impl):
    model, processor = tiny(family, impl)
    inputs = testing.tiny_inputs(processor, batch=batch)
    valid = inputs["attention_mask"].bool()
    with torch.no_grad():
        ref = model(**inputs).logits
        with attnkit.intervene(model, "pai:alpha=0,cfg=false"):
            same = model(**inputs).logits
        with attnkit.intervene(model, "pai:cfg=false"):
            changed = model(**inputs).logits
            out = model.generate(**inputs, max_new_tokens=4, **GEN)
        visual = inputs["input_ids"] == model.config.image_token_id
        answer_rows = testing.pai_answer_rows(inputs["input_ids"].shape[1], visual)
        with attnkit.intervene(model, answer_rows):
            loop = testing.greedy_reference(model, inputs, 4, family)
    torch.testing.assert_close(same[valid], ref[valid], rtol=1e-5, atol=1e-5)
    assert (changed[valid] - ref[valid]).abs().max() > 1e-5
    before_last = valid.clone()
    before_last[:, -1] = False                                                         # only the last row changes
    torch.testing.assert_close(changed[before_last], ref[before_last], rtol=1e-5, atol=1e-5)
    assert torch.equal(out, loop)


PROMPTS = ["describe this image", "what color is the large circle on the left of the picture", "how many dogs"]


def _batch(processor, which, side="left", images=True):
    """Processor outputs for PROMPTS[i] (+ image i) for i in ``which``, padded on ``side``."""
    texts = [testing.tiny_prompt(processor, PROMPTS[i], n_images=int(images)) for i in which]
    kw = dict(images=[testing.tiny_image(10 * i) for i in which]) if images else {}
    before = processor.tokenizer.padding_side
    processor.tokenizer.padding_side = side
    try:
        return processor(text=texts, return_tensors="pt", padding=True, **kw)
    finally:
        processor.tokenizer.padding_side = before


def _forward(model, inputs, family):
    kw = {} if family.startswith("qwen") else {"position_ids": (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)}
    with torch.no_grad():
        return model(**inputs, **kw).logits


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("spec", ["pai:cfg=false", "pai"])
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_padded_batch_equals_each_sample_alone(tiny, family, spec, side):
    model, processor = tiny(family)
    batch = _batch(processor, [0, 1, 2], side)
    with attnkit.intervene(model, spec):
        together = _forward(model, batch, family)
        for b in range(3):
            alone = _forward(model, _batch(processor, [b]), family)[0]
            real = batch["attention_mask"][b].bool()
            rows = slice(None) if spec.endswith("false") else slice(-1, None)   # cfg: the next-token row
            torch.testing.assert_close(together[b][real][rows], alone[rows], rtol=1e-5, atol=1e-5)


def _cfg(logits, text_only, gamma, cut=0.1):
    s, u = torch.log_softmax(logits, -1), torch.log_softmax(text_only, -1)
    out = gamma * (s - u) + u
    return out.masked_fill(s < torch.log(torch.tensor(cut)) + s.max(-1, keepdim=True).values, float("-inf"))


def _assert_same_cut(got, want):
    assert torch.equal(torch.isinf(got), torch.isinf(want)) and bool(torch.isfinite(want).any(-1).all())
    torch.testing.assert_close(got[torch.isfinite(want)], want[torch.isfinite(want)], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", testing.FAMILIES)
def test_cfg_logits_equal_a_hand_computation(tiny, family):
    """out = gamma (s - u) + u with the plausibility cut; u from an unmodified forward of the prompt without its
    image (the processor's own text-only prompt), s from the model (alpha=0) or from the attention step alone."""
    model, processor = tiny(family)
    inputs = _batch(processor, [0, 1, 2])
    text = _batch(processor, [0, 1, 2], images=False)
    with torch.no_grad():
        full = model(**inputs).logits[:, -1]
        positions = (text["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        text_only = model(**text, position_ids=positions).logits[:, -1]
        with attnkit.intervene(model, "pai:alpha=0,gamma=2,plausibility=0.9"):
            guided = model(**inputs).logits[:, -1]
        with attnkit.intervene(model, "pai:cfg=false"):
            attended = model(**inputs).logits[:, -1]
        with attnkit.intervene(model, "pai") as handle:
            paper = model(**inputs).logits[:, -1]
            assert handle.stats()["pai"] == {"amplified_calls": 2, "cfg": True}   # 2 layers, main branch only
    _assert_same_cut(guided, _cfg(full, text_only, 2.0, 0.9))
    _assert_same_cut(paper, _cfg(attended, text_only, 1.1))
    assert torch.isinf(guided).any()                      # the cut acts (random tiny models: flat logits)


@pytest.mark.parametrize("family", testing.FAMILIES)
def test_cfg_generate_with_cache_equals_a_no_cache_loop_and_each_sample_alone(tiny, family):
    model, processor = tiny(family)
    inputs = _batch(processor, [0, 1, 2])
    with attnkit.intervene(model, "pai:alpha=0,gamma=2,plausibility=0.001"):
        out = model.generate(**inputs, max_new_tokens=4, **GEN)
        loop = testing.greedy_reference(model, inputs, 4, family)
        alone = [model.generate(**_batch(processor, [b]), max_new_tokens=4, **GEN)[0, -4:] for b in range(3)]
    assert torch.equal(out, loop)
    assert torch.equal(out[:, -4:], torch.stack(alone))
    assert not torch.equal(out, model.generate(**inputs, max_new_tokens=4, **GEN))


@pytest.mark.parametrize("family", testing.FAMILIES)
def test_beams_and_return_sequences(tiny, family):
    """Beam search reorders the text-only branch's cache like the model's: cached generate equals generate
    without a cache (each step a full forward of both branches). The attention step alone (no branch): cached
    beams equal no-cache beams under the pai_answer_rows reference."""
    model, processor = tiny(family)
    inputs = _batch(processor, [0, 1])
    beams = dict(max_new_tokens=4, num_beams=3, num_return_sequences=2, **GEN)
    with attnkit.intervene(model, "pai:alpha=0,gamma=2,plausibility=0.001"):
        cached = model.generate(**inputs, **beams)
        assert torch.equal(cached, model.generate(**inputs, use_cache=False, **beams))
    with attnkit.intervene(model, "pai:cfg=false"):
        cached = model.generate(**inputs, **beams)
    visual = (inputs["input_ids"] == model.config.image_token_id).repeat_interleave(3, 0)
    with attnkit.intervene(model, testing.pai_answer_rows(inputs["input_ids"].shape[1], visual)):
        assert torch.equal(cached, model.generate(**inputs, use_cache=False, **beams))
    assert cached.shape[0] == 4


def test_cfg_refuses_token_dropping_and_identity_params(tiny):
    model, _ = tiny("llava")
    with pytest.raises(ValueError, match="pai and fastv cannot be combined: the text-only branch"):
        attnkit.wrap(model, "pai", "fastv")
    attnkit.wrap(model, "pai:cfg=false", "fastv").remove()
    with pytest.raises(ValueError, match="gamma=0.5"):
        attnkit.build("pai:gamma=0.5")
    s = torch.randn(2, 7)
    assert torch.equal(PAI(gamma=1.0).guide(s, torch.randn(2, 7)), torch.log_softmax(s, -1))  # released: uncut
