"""The attention dispatcher: edits on touched layers, untouched layers unchanged, conflicts refused."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import attnkit
from attnkit import testing
from attnkit.hooks.attention import additive_mask, attention_probs
from attnkit.interventions.base import Intervention


@dataclasses.dataclass
class ProbIdentity(Intervention):
    name = "test-prob-identity"
    layers: tuple[int, ...] = (1, 2)

    def attention_layers(self, ctx):
        return self.layers

    def on_attention(self, call):
        call.edit_probs(lambda rows, p: p)


@dataclasses.dataclass
class HeadScale(Intervention):
    name = "test-head-scale"
    layer: int = 2
    head: int = 1
    factor: float = 3.0

    def attention_layers(self, ctx):
        return [self.layer]

    def on_attention(self, call):
        def scale(out):
            out = out.clone()
            out[:, :, self.head] *= self.factor
            return out

        call.edit_output(scale)


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("family", testing.FAMILIES)
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_identity_prob_edit_matches_base(tiny, family, impl):
    model, processor = tiny(family, impl)
    inputs = testing.tiny_inputs(processor, batch=3)
    ref = _logits(model, inputs)
    with attnkit.intervene(model, ProbIdentity()):
        out = _logits(model, inputs)
        gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    valid = inputs["attention_mask"].bool()  # padding rows are garbage in every implementation, differently
    torch.testing.assert_close(out[valid], ref[valid], rtol=1e-5, atol=1e-5)
    assert torch.equal(gen, model.generate(**inputs, max_new_tokens=4, do_sample=False))


def test_identity_prob_edit_chunked(tiny, monkeypatch):
    import attnkit.hooks.attention as attention

    model, processor = tiny("llava", "eager")
    inputs = testing.tiny_inputs(processor, batch=2)
    ref = _logits(model, inputs)
    monkeypatch.setattr(attention, "ROW_CHUNK", 5)
    with attnkit.intervene(model, ProbIdentity(layers=(0, 1, 2, 3))):
        torch.testing.assert_close(_logits(model, inputs), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_output_edit_equals_scaling_o_proj_input(tiny, family):
    model, processor = tiny(family)
    inputs = testing.tiny_inputs(processor, batch=2)
    head_dim = model.config.get_text_config().hidden_size // model.config.get_text_config().num_attention_heads

    def pre(module, args):
        x = args[0].clone()
        x[..., head_dim:2 * head_dim] *= 3.0
        return (x,)

    h = model.model.language_model.layers[2].self_attn.o_proj.register_forward_pre_hook(pre)
    ref = _logits(model, inputs)
    h.remove()
    with attnkit.intervene(model, HeadScale()):
        out = _logits(model, inputs)
    assert not torch.allclose(out, _logits(model, inputs))
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_row_limited_edits_keep_the_base_implementation_elsewhere(monkeypatch):
    import types

    import attnkit.hooks.attention as attention
    from attnkit.api import RunState
    from attnkit.hooks.attention import AttentionCall, LayerHook, base_attention

    monkeypatch.setattr(attention, "ROW_CHUNK", 2)   # the edited block spans chunks
    torch.manual_seed(0)
    B, H, L, D = 2, 4, 9, 8
    module = types.SimpleNamespace(scaling=D ** -0.5, is_causal=True, num_key_value_groups=2, training=False)
    q, k, v = torch.randn(B, H, L, D), torch.randn(B, 2, L, D), torch.randn(B, 2, L, D)
    mask = torch.ones(L, L).tril().bool()[None, None].expand(B, 1, L, L)
    sdpa = base_attention("sdpa", module)
    base = sdpa(module, q, k, v, mask)[0]
    seen = []

    def bump(rows, scores):                   # +1 on key 0 in rows 3 and 4; it may see other rows too
        seen.append((rows.start, rows.stop))
        scores = scores.clone()
        for i in range(max(3, rows.start), min(5, rows.stop)):
            scores[:, :, i - rows.start, 0] += 1.0
        return scores

    call = AttentionCall(module, LayerHook(0, RunState(), []), q, k, v, mask, sdpa, {})
    call.edit_scores(bump, rows=slice(3, 5))
    call.edit_probs(lambda rows, probs: probs, rows=slice(6, 7))
    out, _ = call.finish()
    assert seen == [(3, 5), (5, 7)]          # the union 3 ... 6, in chunks of 2
    untouched = [0, 1, 2, 7, 8]
    assert torch.equal(out[:, untouched], base[:, untouched])  # the model's own rows, bit for bit
    scores = attention.attention_scores(q, k, mask, module.scaling)
    scores[:, :, 3:5, 0] += 1.0
    want = (torch.softmax(scores, -1) @ attention.repeat_kv(v, 2)).transpose(1, 2)
    torch.testing.assert_close(out[:, 3:7], want[:, 3:7], rtol=1e-5, atol=1e-6)


def test_attention_probs_formula_on_hand_made_tensors():
    q = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])            # [1, 1, 2, 2]
    k = torch.tensor([[[[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]]])  # [1, 1, 3, 2]
    p = attention_probs(q, k, None, scaling=1.0)              # causal, queries are the last 2 of 3
    row0 = torch.softmax(torch.tensor([1.0, 0.0]), 0)
    row1 = torch.softmax(torch.tensor([0.0, 2.0, 1.0]), 0)
    torch.testing.assert_close(p[0, 0, 0], torch.cat([row0, torch.zeros(1)]))
    torch.testing.assert_close(p[0, 0, 1], row1)
    pad = torch.tensor([[0, 1, 1]])                            # flash-style 2-D mask: key 0 is padding
    p = attention_probs(q, k, pad, scaling=1.0)
    torch.testing.assert_close(p[0, 0, 1], torch.cat([torch.zeros(1), torch.softmax(torch.tensor([2.0, 1.0]), 0)]))
    bool4d = torch.tensor([[[[True, False, False], [True, True, False]]]])
    m = additive_mask(bool4d, 2, 3, slice(0, 2), 1, q.device)
    assert m[0, 0, 1, 2] == torch.finfo(torch.float32).min and m[0, 0, 1, 1] == 0


def test_conflicting_interventions_fail_at_wrap(tiny):
    @dataclasses.dataclass
    class Jealous(Intervention):
        name = "test-jealous"

        def conflicts_with(self, other):
            return "it wants the heads alone" if isinstance(other, HeadScale) else None

    model, _ = tiny("llava")
    with pytest.raises(ValueError, match="test-head-scale and test-jealous cannot be combined: it wants"):
        attnkit.wrap(model, HeadScale(), Jealous())
    assert getattr(model, "_attnkit_handle", None) is None
    attnkit.wrap(model, Jealous(), ProbIdentity()).remove()
