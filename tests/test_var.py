"""var: the redistribution equation on hand-made tensors, sinks, find_sink_dims, every family end to end."""

from __future__ import annotations

import types

import pytest
import torch

import attnkit
from attnkit import testing
from attnkit.api import RunState
from attnkit.hooks.attention import AttentionCall, LayerHook, attention_probs, base_attention
from attnkit.hooks.spans import VisualSpans
from attnkit.interventions.sinks import SINK_DIMS, known_sink_dims, sink_value
from attnkit.interventions.var import VAR, redistribute

SPECIAL = testing.SPECIAL_IDS  # random models must not emit image markers (the no-cache loop re-reads them)
GEN = dict(do_sample=False, suppress_tokens=SPECIAL)
TINY = dict(sink_dims=(0, 1), tau=2.0)  # random tiny models have no massive activations: a low tau makes sinks

# keys: 0 BOS (text sink), 1 text, 2 visual sink, 3 visual, 4 visual, 5 text
VISUAL = torch.tensor([[False, False, True, True, True, False]])
SINK = torch.tensor([[True, False, True, False, False, False]])


def test_redistribution_equals_the_paper_equation():
    probs = torch.tensor([[[
        [0.30, 0.10, 0.20, 0.15, 0.15, 0.10],   # image-centric: visual 0.5 >= 0.2, non-sink share 0.6 >= 0.5
        [0.20, 0.10, 0.40, 0.10, 0.10, 0.10],   # non-sink share 0.2 / 0.6 = 0.33 < rho
        [0.50, 0.35, 0.05, 0.05, 0.00, 0.05],   # visual 0.10 < 0.2 (prefilter)
        [0.30, 0.10, 0.20, 0.15, 0.15, 0.10],   # same as row 0 but not an editable row (e.g. an image query)
    ]]])
    edit_rows = torch.tensor([[True, True, True, False]])
    out, selected = redistribute(probs, SINK, VISUAL, edit_rows, p=0.6, rho=0.5, min_visual=0.2)
    # row 0 by hand: sinks keep 40%; Omega = 0.6 * (0.30 + 0.20) = 0.30 goes to keys 3, 4 by 0.15 : 0.15
    expected_row0 = torch.tensor([0.12, 0.10, 0.08, 0.30, 0.30, 0.10])
    torch.testing.assert_close(out[0, 0, 0], expected_row0)
    torch.testing.assert_close(out[0, 0, 1:], probs[0, 0, 1:])
    assert selected.tolist() == [[[True, False, False, False]]]
    torch.testing.assert_close(out.sum(-1), torch.ones(1, 1, 4))


def test_redistribution_proportional_and_unequal():
    probs = torch.tensor([[[[0.10, 0.05, 0.25, 0.40, 0.10, 0.10]]]])
    out, _ = redistribute(probs, SINK, VISUAL, torch.tensor([[True]]), p=0.5, rho=0.5, min_visual=0.2)
    # Omega = 0.5 * 0.35 = 0.175, split 0.40 : 0.10 over the non-sink visual keys -> +0.14, +0.035
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([0.05, 0.05, 0.125, 0.54, 0.135, 0.10]))
    out, _ = redistribute(probs, SINK, VISUAL, torch.tensor([[True]]), p=0.0, rho=0.5, min_visual=0.2)
    torch.testing.assert_close(out, probs)


def test_rows_without_visible_image_keys_are_left_alone():
    probs = torch.tensor([[[[0.7, 0.3, 0.0, 0.0, 0.0, 0.0]]]])   # a row that sees no image key
    out, selected = redistribute(probs, SINK, VISUAL, torch.tensor([[True]]), p=0.6, rho=0.0, min_visual=0.0)
    assert not selected.any()
    torch.testing.assert_close(out, probs)
    torch.testing.assert_close(out.sum(-1), torch.ones(1, 1, 1))


def _reference(probs, sink, visual, edit, p, rho, floor):
    """The equation, one (head, row) at a time, written independently of attnkit."""
    out = probs.clone()
    B, H, Q, K = probs.shape
    for b in range(B):
        for h in range(H):
            for i in range(Q):
                if not edit[b, i]:
                    continue
                a = probs[b, h, i].tolist()
                vis = sum(a[j] for j in range(K) if visual[b, j])
                rest = sum(a[j] for j in range(K) if visual[b, j] and not sink[b, j])
                if vis < floor or rest <= 0 or rest / vis < rho:
                    continue
                omega = p * sum(a[j] for j in range(K) if sink[b, j])
                for j in range(K):
                    if sink[b, j]:
                        out[b, h, i, j] = (1 - p) * a[j]
                    elif visual[b, j]:
                        out[b, h, i, j] = a[j] + omega * a[j] / rest
    return out


def test_dispatcher_applies_var_to_text_rows_in_prefill_and_decode():
    torch.manual_seed(0)
    B, H, D, L = 2, 4, 8, 7
    visual = torch.tensor([[0, 0, 1, 1, 1, 0, 0], [0, 1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    valid = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)   # left padding
    spans = VisualSpans(visual=visual, image_id=torch.where(visual, 0, -1), valid=valid)
    sink = torch.tensor([[1, 0, 1, 0, 0, 0, 0], [0, 1, 0, 0, 0, 1, 0]], dtype=torch.bool)   # visual + text sinks
    var = VAR(p=0.6, rho=0.5, min_visual_attention=0.1)
    var._sinks = {3: sink}
    module = types.SimpleNamespace(scaling=D ** -0.5, is_causal=True, num_key_value_groups=2, training=False)
    pad = torch.zeros(B, 1, L, L, dtype=torch.bool) | valid[:, None, None, :]
    causal = torch.ones(L, L).tril().bool()[None, None] & pad
    for step, q_len, kv_len in [(0, L, L), (1, 1, L + 1)]:
        state = RunState(spans=spans, step=step)
        q, k, v = torch.randn(B, H, q_len, D), torch.randn(B, 2, kv_len, D), torch.randn(B, 2, kv_len, D)
        if step == 0:
            mask = causal
        else:
            mask = torch.cat([valid, torch.ones(B, 1, dtype=torch.bool)], 1)[:, None, None, :]
        # prefill: the model's own sdpa for the rows var leaves alone, eager for the text rows it edits
        call = AttentionCall(module, LayerHook(3, state, [var]), q, k, v, mask, base_attention("sdpa", module), {})
        var.on_attention(call)
        out, _ = call.finish()
        probs = attention_probs(q, k, mask, module.scaling)
        kv_visual = torch.nn.functional.pad(visual, (0, kv_len - L))
        kv_sink = torch.nn.functional.pad(sink, (0, kv_len - L))
        if step == 0:   # text after the sample's first image; never image queries or queries before the image
            edit = torch.tensor([[0, 0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 1, 1, 1]], dtype=torch.bool)
        else:
            edit = torch.ones(B, 1, dtype=torch.bool)
        expected = _reference(probs, kv_sink, kv_visual, edit, 0.6, 0.5, 0.1)
        assert not torch.allclose(expected, probs)
        vfull = k.new_zeros(B, H, kv_len, D)
        vfull[:] = v.repeat_interleave(2, dim=1)
        want = (expected @ vfull).transpose(1, 2)
        if step == 0:   # fully masked (padding) query rows: whatever the base implementation makes of them
            out, want = out[valid], want[valid]
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


def test_sink_table_and_key():
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=4096, num_hidden_layers=32, intermediate_size=11008)
    assert known_sink_dims(cfg) == (1415, 2533)
    assert known_sink_dims(LlamaConfig(hidden_size=5120, num_hidden_layers=40, intermediate_size=13824)) == (2100, 4743)
    assert known_sink_dims(LlamaConfig(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336)) is None
    assert ("qwen2_vl_text", 3584, 28, 18944) in SINK_DIMS
    x = torch.tensor([[3.0, 0.0, -4.0, 0.0]])   # RMS = 2.5
    torch.testing.assert_close(sink_value(x, (2,)), torch.tensor([1.6]), atol=1e-5, rtol=1e-5)


def test_spec_and_errors(tiny):
    assert attnkit.build("var:sink_dims=458+2570,p=0.4").sink_dims == (458, 2570)
    with pytest.raises(ValueError, match="p=1.5 is out of range"):
        VAR(p=1.5)
    assert attnkit.build("var:sink_dims=auto").sink_dims == "auto"
    with pytest.raises(ValueError, match="sink_dims='most' is not allowed; use dimensions .* or sink_dims=auto"):
        attnkit.build("var:sink_dims=most")
    model, _ = tiny("llava")
    with pytest.raises(ValueError, match="sink_dims \\[999\\] out of range"):
        attnkit.wrap(model, VAR(sink_dims=(999,)))
    assert getattr(model, "_attnkit_handle", None) is None


def test_find_sink_dims_finds_planted_dims(tiny):
    model, processor = tiny("qwen2_vl")
    planted = (5, 41)
    inputs = [testing.tiny_inputs(processor, batch=2, seed=s) for s in range(2)]
    visual = {}

    def plant(module, args, output):   # massive values in the planted dims on some visual tokens, from layer 2 on
        hidden = output[0] if isinstance(output, tuple) else output
        ids = visual["ids"]
        rows = (ids == model.config.image_token_id) & (torch.arange(ids.shape[1]) % 3 == 0)
        hidden[..., list(planted)] += rows[..., None] * 60.0
        return output

    def remember(module, args, kwargs):
        visual["ids"] = kwargs["input_ids"]

    h1 = model.model.language_model.layers[1].register_forward_hook(plant)
    h2 = model.register_forward_pre_hook(remember, with_kwargs=True)
    try:
        found = attnkit.find_sink_dims(model, inputs, tau=4.0)
        with pytest.raises(ValueError, match="no hidden dimension reaches"):
            attnkit.find_sink_dims(model, inputs, tau=1000.0)
    finally:
        h1.remove()
        h2.remove()
    assert found == planted


@pytest.mark.parametrize("family", testing.FAMILIES)
def test_family_identity_effect_and_generate(tiny, family):
    model, processor = tiny(family)
    inputs = testing.tiny_inputs(processor, batch=2)
    valid = inputs["attention_mask"].bool()
    with torch.no_grad():
        ref = model(**inputs).logits
        with attnkit.intervene(model, VAR(p=0.0, **TINY)):
            same = model(**inputs).logits
        with attnkit.intervene(model, VAR(**TINY)) as handle:
            changed = model(**inputs).logits
            stats = handle.stats()["var"]
            # text sinks off: generated tokens can never be sinks, so a no-cache loop sees the same sinks
            handle.interventions[0].text_sinks = False
            out = model.generate(**inputs, max_new_tokens=3, **GEN)
            loop = testing.greedy_reference(model, inputs, 3, family)
    torch.testing.assert_close(same[valid], ref[valid], rtol=1e-5, atol=1e-5)
    assert (changed[valid] - ref[valid]).abs().max() > 1e-3
    assert sum(stats["layers"][2]["visual_sinks"]) > 0 and stats["layers"][2]["image_centric_share"] > 0
    assert torch.equal(out, loop)
    assert getattr(model, "_attnkit_handle", None) is None


def test_combines_with_pai_in_the_same_layer(tiny):
    model, processor = tiny("llava")
    inputs = testing.tiny_inputs(processor, batch=2)
    with torch.no_grad():
        with attnkit.intervene(model, VAR(**TINY)):
            var_only = model(**inputs).logits
        with attnkit.intervene(model, VAR(**TINY), "pai:alpha=0.5"):
            both = model(**inputs).logits
    assert (both - var_only).abs().max() > 1e-4


def test_follows_the_kept_tokens_of_a_dropper(tiny):
    """With cls-prune, layers see only the kept tokens: var maps sinks and visual keys through the dropper's plan
    (published as ``state.keep_plan``)."""
    model, processor = tiny("qwen2_vl")
    inputs = testing.tiny_inputs(processor, batch=2)
    with torch.no_grad():
        with attnkit.intervene(model, "cls-prune:keep=6"):
            pruned = model(**inputs).logits
        with attnkit.intervene(model, "cls-prune:keep=6", VAR(**TINY)) as handle:
            both = model(**inputs).logits
            layer2 = handle.stats()["var"]["layers"][2]
            kept = handle.stats()["cls-prune"]["visual_tokens_kept"]
            out = model.generate(**inputs, max_new_tokens=2, **GEN)
    assert "skipped" not in layer2 and all(v <= k for v, k in zip(layer2["visual_sinks"], kept))
    assert (both - pruned).abs().max() > 1e-4 and out.shape[1] == inputs["input_ids"].shape[1] + 2


def _plant(model, dim: int, value: float = 60.0):
    """A massive activation in hidden dimension ``dim`` on every third visual token, from layer 2's input on (the
    output of layer 1, as in real LLMs where massive activations appear after the first layers)."""
    ids = {}

    def remember(module, args, kwargs):
        ids["input_ids"] = kwargs["input_ids"]

    def plant(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        x = ids["input_ids"]
        rows = (x == model.config.image_token_id) & (torch.arange(x.shape[1]) % 3 == 0)
        hidden[..., dim] += rows * value
        return output

    return [model.register_forward_pre_hook(remember, with_kwargs=True),
            model.model.language_model.layers[1].register_forward_hook(plant)]


@pytest.mark.parametrize("family", ["qwen2_vl", "internvl"])
def test_auto_sink_dims_find_a_planted_dimension_and_equal_given_dims(tiny, family):
    model, processor = tiny(family)
    inputs = testing.tiny_inputs(processor, batch=2)
    other = testing.tiny_inputs(processor, batch=2, seed=1)
    hooks = _plant(model, 41)
    try:
        with torch.no_grad():
            ref = model(**inputs).logits
            with attnkit.intervene(model, VAR(sink_dims="auto", tau=5.0)) as handle:
                model(**processor(text=["describe this image"], return_tensors="pt"))   # no image: not decided
                pending = handle.stats()["var"]["sink_dims"]
                auto = model(**inputs).logits
                stats = handle.stats()["var"]
                auto_other = model(**other).logits          # dims stay fixed after the first prefill
            with attnkit.intervene(model, VAR(sink_dims=(41,), tau=5.0)) as handle:
                given = model(**inputs).logits
                given_other = model(**other).logits
                given_stats = handle.stats()["var"]
    finally:
        for h in hooks:
            h.remove()
    assert pending is None and stats["sink_dims"] == [41] and "found at layer 2" in stats["sink_dims_auto"]
    assert stats["layers"][2]["visual_sinks"] == given_stats["layers"][2]["visual_sinks"] != [0, 0]
    assert torch.equal(auto, given) and torch.equal(auto_other, given_other)
    assert (auto - ref).abs().max() > 1e-4


@pytest.mark.parametrize("family", ["llava", "gemma3"])
def test_auto_is_the_default_off_the_table_and_edits_nothing_without_massive_activations(tiny, family):
    model, processor = tiny(family)
    inputs = testing.tiny_inputs(processor, batch=2)
    assert known_sink_dims(model.config.get_text_config()) is None
    with torch.no_grad():
        ref = model(**inputs).logits
        with attnkit.intervene(model, "var") as handle:
            before = handle.stats()["var"]
            out = model(**inputs).logits
            stats = handle.stats()["var"]
    assert before["sink_dims"] is None and "not found yet" in before["sink_dims_auto"]
    assert stats["sink_dims"] == [] and "nothing is edited" in stats["sink_dims_auto"]
    assert "tau=20.0" in stats["sink_dims_auto"] and all(s == [0, 0] for s in
                                                         (e["sinks"] for e in stats["layers"].values()))
    assert torch.equal(out, ref)
