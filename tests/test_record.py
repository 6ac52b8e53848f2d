"""The recorder's aggregates equal those computed from ``output_attentions=True`` under eager attention."""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit import testing


@pytest.mark.parametrize("family", testing.FAMILIES)
def test_record_matches_output_attentions(tiny, family):
    model, processor = tiny(family, "eager")
    inputs = testing.tiny_inputs(processor, batch=3)
    with torch.no_grad():
        ref = model(**inputs, output_attentions=True).attentions      # per layer [B, H, L, L]
    ids, am = inputs["input_ids"], inputs["attention_mask"].bool()
    visual = ids == model.config.image_token_id
    with attnkit.intervene(model, "record") as handle, torch.no_grad():
        model(**inputs)
        rec = handle.interventions[0]
    assert sorted(rec.visual_share) == list(range(len(ref)))
    for layer, probs in enumerate(ref):
        for b in range(ids.shape[0]):
            first_visual = int(visual[b].nonzero()[0])
            text_rows = [t for t in range(ids.shape[1]) if am[b, t] and not visual[b, t] and t > first_visual]
            expected = probs[b][:, text_rows][:, :, visual[b]].sum(-1).mean(-1)          # [H]
            torch.testing.assert_close(rec.visual_share[layer][b], expected, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(rec.last_query[layer][b], probs[b, :, -1, visual[b]], rtol=1e-5, atol=1e-6)


def test_record_chunked_rows_match_single_chunk(tiny, monkeypatch):
    model, processor = tiny("qwen2_vl")
    inputs = testing.tiny_inputs(processor, batch=2)
    with attnkit.intervene(model, "record:layers=1+2") as h, torch.no_grad():
        model(**inputs)
        whole = {k: v.clone() for k, v in h.interventions[0].visual_share.items()}
    import attnkit.hooks.attention as attention

    monkeypatch.setattr(attention, "ROW_CHUNK", 7)
    monkeypatch.setattr(attention.AttentionCall.iter_probs, "__defaults__", (7,))
    with attnkit.intervene(model, "record:layers=1+2") as h, torch.no_grad():
        model(**inputs)
        chunked = h.interventions[0].visual_share
    assert sorted(chunked) == [1, 2]
    for k in whole:
        torch.testing.assert_close(chunked[k], whole[k], rtol=1e-5, atol=1e-7)


def test_record_without_image_says_so(tiny):
    model, processor = tiny("llava")
    ids = processor.tokenizer(["USER: describe the sky ASSISTANT:"], return_tensors="pt")
    with attnkit.intervene(model, "record") as h, torch.no_grad():
        model(**ids)
        st = h.stats()
    assert st["visual_tokens"] == [0]
    assert st["record"]["layers"] == [] and "nothing recorded" in st["record"]["note"]
