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


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_record_with_cls_prune_covers_the_kept_tokens(tiny, family):
    """With tokens dropped before the LLM, every layer is recorded over the kept tokens: the aggregates equal
    those of the unmodified eager model run on the kept tokens alone (at their original positions)."""
    model, processor = tiny(family, "eager")
    inputs = testing.tiny_inputs(processor, batch=2)
    with attnkit.intervene(model, "record", "cls-prune:keep=5") as handle, torch.no_grad():
        model(**inputs)
        rec = handle.interventions[0]
        kept = handle.stats()["cls-prune"]["kept_positions"]
    ref, cols = testing.reference_on_kept(model, inputs, kept, output_attentions=True)
    ids = torch.gather(inputs["input_ids"], 1, cols)
    am = torch.gather(inputs["attention_mask"], 1, cols).bool()
    visual = ids == model.config.image_token_id
    for layer, probs in enumerate(ref.attentions):
        for b in range(2):
            first_visual = int(visual[b].nonzero()[0])
            text_rows = [t for t in range(ids.shape[1]) if am[b, t] and not visual[b, t] and t > first_visual]
            expected = probs[b][:, text_rows][:, :, visual[b]].sum(-1).mean(-1)
            torch.testing.assert_close(rec.visual_share[layer][b], expected, rtol=1e-5, atol=1e-6)
            assert rec.last_query[layer][b].shape == (probs.shape[1], 5)
            torch.testing.assert_close(rec.last_query[layer][b], probs[b, :, -1, visual[b]], rtol=1e-5, atol=1e-6)


def test_record_with_fastv_records_full_then_kept_layers(tiny):
    model, processor = tiny("llava", "eager")
    inputs = testing.tiny_inputs(processor, batch=2)
    with torch.no_grad():
        ref = model(**inputs, output_attentions=True).attentions
    with attnkit.intervene(model, "record", "fastv:k=2,keep=6") as handle, torch.no_grad():
        model(**inputs)
        rec = handle.interventions[0]
    visual = inputs["input_ids"] == model.config.image_token_id
    for layer in (0, 1):      # before the drop: the full prompt
        for b in range(2):
            torch.testing.assert_close(rec.last_query[layer][b], ref[layer][b, :, -1, visual[b]], rtol=1e-5, atol=1e-6)
    for layer in (2, 3):      # after it: the 6 kept visual tokens
        for b in range(2):
            assert rec.last_query[layer][b].shape[-1] == 6
            assert 0 <= float(rec.visual_share[layer][b].min()) and float(rec.visual_share[layer][b].max()) <= 1


def test_attention_maps_with_a_pruner_put_kept_tokens_where_they_are(tiny):
    """``attnkit inspect --with cls-prune``: the kept tokens' weights sit at their patches; dropped ones are NaN."""
    from attnkit.eval.report import attention_maps

    model, processor = tiny("llava")
    image = testing.tiny_image(3)
    grids, _ = attention_maps(model, processor, image, "describe this image", extra=["cls-prune:keep=5"])
    with attnkit.intervene(model, "cls-prune:keep=5") as handle, torch.no_grad():
        model(**attnkit.models.prompts.build_inputs(processor, "describe this image", image))
        kept = handle.stats()["cls-prune"]["kept_positions"][0]
    ids = attnkit.models.prompts.build_inputs(processor, "describe this image", image)["input_ids"][0]
    visual = (ids == model.config.image_token_id).nonzero().squeeze(1).tolist()
    ranks = sorted(visual.index(p) for p in kept)
    for grid in grids.values():
        flat = torch.tensor(grid).flatten()
        assert grid.shape == (4, 4)
        assert torch.isfinite(flat[ranks]).all() and int(torch.isnan(flat).sum()) == 16 - 5
