"""pai: +alpha*|logit| on image keys of the last real query row; the CFG logit step with a text-only branch."""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch

import attnkit
from attnkit import testing
from attnkit.api import RunState
from attnkit.hooks.attention import AttentionCall, LayerHook
from attnkit.hooks.spans import VisualSpans
from attnkit.interventions.base import Intervention
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


@dataclasses.dataclass
class AnswerRows(Intervention):
    """Test reference: PAI's edit on every query row at or after the last prompt row (what PAI does over a
    cached generate: the last prompt row at prefill, then each new row), for a no-cache loop."""

    name = "test-pai-answer-rows"
    alpha: float = 0.2
    prompt_len: int = 0
    visual: object = None

    def attention_layers(self, ctx):
        return range(2, ctx.adapter.num_layers)

    def on_attention(self, call):
        def edit(rows, scores):
            scores = scores.clone()
            for i in range(rows.start, rows.stop):
                if i >= self.prompt_len - 1:
                    z = scores[:, :, i - rows.start, :self.prompt_len]
                    img = self.visual[:, None, :]
                    scores[:, :, i - rows.start, :self.prompt_len] = torch.where(img, z + self.alpha * z.abs(), z)
            return scores

        call.edit_scores(edit)


@pytest.mark.parametrize("family", testing.FAMILIES)
def test_family_identity_effect_and_generate(tiny, family):
    model, processor = tiny(family)
    inputs = testing.tiny_inputs(processor, batch=2)
    valid = inputs["attention_mask"].bool()
    with torch.no_grad():
        ref = model(**inputs).logits
        with attnkit.intervene(model, "pai:alpha=0,cfg=false"):
            same = model(**inputs).logits
        with attnkit.intervene(model, "pai:cfg=false"):
            changed = model(**inputs).logits
            out = model.generate(**inputs, max_new_tokens=3, **GEN)
        visual = inputs["input_ids"] == model.config.image_token_id
        answer_rows = AnswerRows(alpha=0.2, prompt_len=inputs["input_ids"].shape[1], visual=visual)
        with attnkit.intervene(model, answer_rows):
            loop = testing.greedy_reference(model, inputs, 3, family)
    torch.testing.assert_close(same[valid], ref[valid], rtol=1e-5, atol=1e-5)
    assert (changed[valid] - ref[valid]).abs().max() > 1e-5
    before_last = valid.clone()
    before_last[:, -1] = False                                                         # only the last row changes
    torch.testing.assert_close(changed[before_last], ref[before_last], rtol=1e-5, atol=1e-5)
    assert torch.equal(out, loop)
