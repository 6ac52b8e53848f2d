"""cls-prune and fastv: equal to the unmodified model run on the kept tokens at their original positions."""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit import testing

PRUNE_FAMILIES = ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl"]
SPECIAL = testing.SPECIAL_IDS  # random models must not emit image markers (the no-cache loop re-reads them)
GEN = dict(do_sample=False, suppress_tokens=SPECIAL)


def _logits(model, inputs, **kw):
    with torch.no_grad():
        return model(**inputs, **kw).logits


def _reference_on_kept(model, inputs, kept_positions, compact=False):
    out, cols = testing.reference_on_kept(model, inputs, kept_positions, compact=compact)
    return out.logits, cols


def _visual_and_newline_counts(model, inputs) -> tuple[int, int]:
    """Visual tokens of the first image, and how many of them are LLaVA-NeXT row-newline embeddings."""
    n_visual = int((inputs["input_ids"][0] == model.config.image_token_id).sum())
    newline = getattr(model.model, "image_newline", None)
    if newline is None:
        return n_visual, 0
    with torch.no_grad():
        feats = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"],
                                               vision_feature_layer=-2, vision_feature_select_strategy="default")
    rows = feats.pooler_output[0]
    return n_visual, int((rows == newline.to(rows.dtype)).all(-1).sum())


@pytest.mark.parametrize("family", PRUNE_FAMILIES)
@pytest.mark.parametrize("spec", ["cls-prune:keep=5", "cls-prune:keep=0.5,score=random", "cls-prune:score=uniform"])
def test_cls_prune_equals_model_on_kept_tokens(tiny, family, spec):
    model, processor = tiny(family)
    inputs = testing.tiny_inputs(processor, batch=3)
    with attnkit.intervene(model, spec) as handle:
        pruned = _logits(model, inputs)
        stats = handle.stats()["cls-prune"]
    kept = stats["kept_positions"]
    n_visual, n_newline = _visual_and_newline_counts(model, inputs)
    free = n_visual - n_newline
    n_keep = {"cls-prune:keep=5": 5, "cls-prune:keep=0.5,score=random": round(free / 2),
              "cls-prune:score=uniform": round(free / 4)}[spec]
    assert stats["visual_tokens"] == [n_visual] * 3 and stats["visual_tokens_kept"] == [n_keep + n_newline] * 3
    ref, cols = _reference_on_kept(model, inputs, kept)
    valid = torch.gather(inputs["attention_mask"], 1, cols).bool()
    got = torch.gather(pruned, 1, cols[..., None].expand(-1, -1, pruned.shape[-1]))
    torch.testing.assert_close(got[valid], ref[valid], rtol=1e-4, atol=1e-5)
    unpruned = torch.gather(_logits(model, inputs), 1, cols[..., None].expand_as(got))
    assert not torch.allclose(got[valid], unpruned[valid])


def _cls_scores_from_eager_vision(model, inputs):
    """[CLS]->patch attention of the feature layer, from output_attentions of an eager vision tower."""
    with torch.no_grad():
        out = model.model.vision_tower(inputs["pixel_values"], output_attentions=True)
    return out.attentions[-2][:, :, 0, 1:].mean(1)                    # [images, patches]


def _received_scores_from_eager_attention(model, inputs):
    """Mean attention received per patch in the last vision block, pooled 2x2 (Qwen2-VL), via a capturing fn."""
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    captured = []
    last = model.model.visual.blocks[-1].attn

    def capture(module, q, k, v, attention_mask=None, scaling=None, **kw):
        if module is last:
            captured.append(torch.softmax(q @ k.transpose(2, 3) * scaling, dim=-1).mean((1, 2))[0])
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, q, k, v, attention_mask, scaling=scaling, **kw)

    AttentionInterface.register("test_capture", capture)
    model.set_attn_implementation({"vision_config": "test_capture"})
    try:
        with torch.no_grad():
            model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    finally:
        model.set_attn_implementation({"vision_config": "sdpa"})
    return [c.view(-1, 4).mean(1) for c in captured]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_kept_set_is_top_k_of_independent_scores(tiny, family):
    model, processor = tiny(family, "eager" if family == "llava" else "sdpa")
    inputs = testing.tiny_inputs(processor, batch=3)
    if family == "llava":
        scores = list(_cls_scores_from_eager_vision(model, inputs))
    else:
        scores = _received_scores_from_eager_attention(model, inputs)
    with attnkit.intervene(model, "cls-prune:keep=6") as handle:
        _logits(model, inputs)
        kept = handle.stats()["cls-prune"]["kept_positions"]
    for b in range(3):
        visual = (inputs["input_ids"][b] == model.config.image_token_id).nonzero().squeeze(1)
        expected = sorted(visual[torch.topk(scores[b], 6).indices].tolist())
        assert kept[b] == expected


@pytest.mark.parametrize("family", PRUNE_FAMILIES)
def test_cls_prune_generate_equals_no_cache_loop(tiny, family):
    model, processor = tiny(family)
    inputs = testing.tiny_inputs(processor, batch=3)
    with attnkit.intervene(model, "cls-prune:keep=4"):
        out = model.generate(**inputs, max_new_tokens=5, **GEN)
        ref = testing.greedy_reference(model, inputs, 5, family)
    assert torch.equal(out, ref)


def _dropped(inputs, image_token_id, kept):
    visual = [(inputs["input_ids"][b] == image_token_id).nonzero().squeeze(1).tolist() for b in range(len(kept))]
    return tuple(tuple(t for t in visual[b] if t not in kept[b]) for b in range(len(kept)))


@pytest.mark.parametrize("family", PRUNE_FAMILIES)
@pytest.mark.parametrize("rank", ["last", "mean"])
def test_fastv_equals_masking_reference(tiny, family, rank):
    model, processor = tiny(family)
    inputs = testing.tiny_inputs(processor, batch=3)
    with torch.no_grad():
        base = model(**inputs, output_hidden_states=True)
    with attnkit.intervene(model, f"fastv:k=2,keep=0.5,rank={rank}") as handle, torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
        stats = handle.stats()["fastv"]
    n_visual = int((inputs["input_ids"][0] == model.config.image_token_id).sum())
    assert stats["visual_tokens_kept"] == [round(n_visual / 2)] * 3
    for layer in range(3):  # embeddings and the outputs of layers 0, 1: untouched
        assert torch.equal(out.hidden_states[layer], base.hidden_states[layer])
    dropped = _dropped(inputs, model.config.image_token_id, stats["kept_positions"])
    with attnkit.intervene(model, testing.mask_keys(2, dropped)):
        ref = _logits(model, inputs)
    keep = inputs["attention_mask"].bool().clone()
    for b, cols in enumerate(dropped):
        keep[b, list(cols)] = False
    torch.testing.assert_close(out.logits[keep], ref[keep], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", PRUNE_FAMILIES)
def test_fastv_generate_equals_no_cache_masking_loop(tiny, family):
    model, processor = tiny(family)
    inputs = testing.tiny_inputs(processor, batch=3)
    with attnkit.intervene(model, "fastv:k=1,keep=6") as handle:
        out = model.generate(**inputs, max_new_tokens=5, **GEN)
        kept = handle.stats()["fastv"]["kept_positions"]
    dropped = _dropped(inputs, model.config.image_token_id, kept)
    with attnkit.intervene(model, testing.mask_keys(1, dropped)):
        ref = testing.greedy_reference(model, inputs, 5, family)
    assert torch.equal(out, ref)


def test_fastv_ranks_by_last_row_of_layer_k_minus_1(tiny):
    model, processor = tiny("llava", "eager")
    inputs = testing.tiny_inputs(processor, batch=2)
    with torch.no_grad():
        attn = model(**inputs, output_attentions=True).attentions[2]     # layer k-1 = 2
    with attnkit.intervene(model, "fastv:k=3,keep=5") as handle:
        _logits(model, inputs)
        kept = handle.stats()["fastv"]["kept_positions"]
    for b in range(2):
        visual = (inputs["input_ids"][b] == model.config.image_token_id).nonzero().squeeze(1)
        scores = attn[b].mean(0)[-1, visual]
        assert kept[b] == sorted(visual[torch.topk(scores, 5).indices].tolist())


def test_keep_all_is_identical_to_baseline(tiny):
    model, processor = tiny("qwen2_vl")
    inputs = testing.tiny_inputs(processor, batch=2)
    ref = _logits(model, inputs)
    for spec in ("cls-prune:keep=1.0", "fastv:keep=16"):
        with attnkit.intervene(model, spec):
            torch.testing.assert_close(_logits(model, inputs), ref, rtol=1e-5, atol=1e-6)


def test_compact_positions_are_consecutive(tiny):
    model, processor = tiny("llava")
    inputs = testing.tiny_inputs(processor, batch=1)
    seen = []
    with attnkit.intervene(model, "cls-prune:keep=4,positions=compact") as handle:
        h = model.model.language_model.register_forward_pre_hook(
            lambda m, a, kw: seen.append(kw["position_ids"].clone()), with_kwargs=True)
        try:
            compact = _logits(model, inputs)
            kept = handle.stats()["cls-prune"]["kept_positions"]
            model.generate(**inputs, max_new_tokens=3, **GEN)
        finally:
            h.remove()
    n = inputs["input_ids"].shape[1] - 12
    assert seen[0].tolist() == [list(range(n))]
    assert [p.tolist() for p in seen[-2:]] == [[[n]], [[n + 1]]]        # decode continues compactly
    ref, cols = _reference_on_kept(model, inputs, kept, compact=True)
    torch.testing.assert_close(compact[0, cols[0]], ref[0], rtol=1e-4, atol=1e-5)
    original, _ = _reference_on_kept(model, inputs, kept)
    assert not torch.allclose(original[0], ref[0], atol=1e-3)


def test_no_image_does_nothing_and_says_so(tiny):
    model, processor = tiny("llava")
    ids = processor.tokenizer(["USER: describe the sky ASSISTANT:"], return_tensors="pt")
    ref = _logits(model, ids)
    for spec in ("cls-prune:keep=4", "fastv:keep=4"):
        with attnkit.intervene(model, spec) as handle:
            assert torch.equal(_logits(model, ids), ref)
            assert "no image" in handle.stats()[spec.split(":")[0]]["note"]


@pytest.mark.parametrize("spec, match", [
    ("cls-prune:keep=0", r"keep=0 is out of range"),
    ("cls-prune:keep=1.5", r"keep=1.5 is out of range"),
    ("cls-prune:keep=-3", r"keep=-3 is out of range"),
    ("fastv:keep=0.0", r"keep=0.0 is out of range"),
    ("fastv:k=0", r"k=0 is out of range"),
    ("fastv:k=4", r"k=4 is out of range.*1 <= k <= 3"),
    ("cls-prune:score=best", r"score='best'.*one of"),
    ("cls-prune:score=cls", r"score='cls' is not available for qwen2_vl"),
])
def test_bad_parameters(tiny, spec, match):
    model, _ = tiny("qwen2_vl")
    with pytest.raises(ValueError, match=match):
        attnkit.wrap(model, spec)
    assert getattr(model, "_attnkit_handle", None) is None


@pytest.mark.parametrize("spec", ["cls-prune:keep=17", "fastv:keep=17"])
def test_keep_larger_than_a_fixed_resolution_image_fails_at_wrap(tiny, spec):
    model, _ = tiny("llava")
    with pytest.raises(ValueError, match="keep=17 exceeds the 16 visual tokens every image has on llava"):
        attnkit.wrap(model, spec)
    assert attnkit.handle_of(model) is None


def test_keep_larger_than_a_dynamic_image_is_a_clear_error_at_run_time(tiny):
    model, processor = tiny("qwen2_vl")
    with attnkit.intervene(model, "cls-prune:keep=100000"):
        with pytest.raises(ValueError, match="keep=100000 exceeds the 16 visual tokens of image 0 of the batch"):
            _logits(model, testing.tiny_inputs(processor))


def test_cls_prune_and_fastv_conflict(tiny):
    model, _ = tiny("llava")
    with pytest.raises(ValueError, match="cannot be combined: both drop visual tokens"):
        attnkit.wrap(model, "cls-prune", "fastv")


@pytest.mark.parametrize("family", PRUNE_FAMILIES)
def test_several_images_per_sample_and_ragged_keep(tiny, family):
    model, processor = tiny(family)
    sizes = [(32, 32), (48, 32)] if family.startswith("qwen") else None
    inputs = testing.tiny_inputs(processor, batch=2, n_images=2, image_sizes=sizes)
    with attnkit.intervene(model, "cls-prune:keep=0.3") as handle:
        pruned = _logits(model, inputs)
        stats = handle.stats()["cls-prune"]
        out = model.generate(**inputs, max_new_tokens=4, **GEN)
        ref_tokens = testing.greedy_reference(model, inputs, 4, family)
    assert torch.equal(out, ref_tokens)
    ref, cols = _reference_on_kept(model, inputs, stats["kept_positions"])
    valid = torch.gather(inputs["attention_mask"], 1, cols).bool()
    got = torch.gather(pruned, 1, cols[..., None].expand(-1, -1, pruned.shape[-1]))
    torch.testing.assert_close(got[valid], ref[valid], rtol=1e-4, atol=1e-5)


def test_budget_shared_between_groups_on_hand_made_scores():
    from attnkit.interventions.pruning import count, topk_in_groups

    scores = torch.tensor([0.9, 0.1, 0.5, 0.2, 0.3, 0.8, 0.7, 0.05, 0.6, 0.4, 0.01, 0.02])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    # 12 tokens (4 base, 8 in two grid crops), keep 6 -> base round(6 * 4/12) = 2, the grid the other 4 by top score
    assert topk_in_groups(scores, groups, 6).tolist() == [0, 2, 5, 6, 8, 9]
    assert topk_in_groups(None, groups, 6).tolist() == [0, 3, 4, 6, 9, 11]
    # per_crop: the same k = 6 / 3 = 2 in every crop (FasterVLM's LLaVA-NeXT rule)
    assert topk_in_groups(scores, groups, 6, "per_crop").tolist() == [0, 2, 5, 6, 8, 9]
    assert topk_in_groups(scores, groups, 9, "per_crop").tolist() == [0, 2, 3, 4, 5, 6, 8, 9, 11]
    assert count(0.5, 4, "keep", "x") == 2
    with pytest.raises(ValueError, match="keep=13 exceeds the 12 visual tokens of x"):
        count(13, 12, "keep", "x")


def test_per_crop_budget_keeps_the_same_k_in_five_equal_crops():
    from attnkit.interventions.pruning import split_budget, topk_in_groups

    groups = torch.arange(5).repeat_interleave(16)
    scores = torch.linspace(0, 1, 80) ** 2 * torch.tensor([1.0, 3.0, 0.2, 2.0, 1.0]).repeat_interleave(16)
    per_crop = topk_in_groups(scores, groups, 20, "per_crop")
    assert torch.bincount(groups[per_crop]).tolist() == [4, 4, 4, 4, 4]
    shared = topk_in_groups(scores, groups, 20, "shared")
    assert split_budget(20, groups, "shared") == {0: 4, 1: 16, 2: 0, 3: 0, 4: 0}
    assert torch.bincount(groups[shared], minlength=5).tolist() != [4, 4, 4, 4, 4]


@pytest.mark.parametrize("budget", ["shared", "per_crop"])
def test_next_per_crop_budget_on_the_model(tiny, budget):
    model, processor = tiny("llava_next")
    inputs = testing.tiny_inputs(processor, batch=1, image_sizes=[(64, 64)])
    captured = {}
    adapter = attnkit.models.get_adapter(model)
    from attnkit.hooks.install import Installed

    inst = Installed()
    adapter.install_vision_capture(inst, frozenset({"cls"}), lambda images: captured.update(images=images))
    try:
        _logits(model, inputs)
    finally:
        inst.remove()
    group = captured["images"][0]["group"]
    with attnkit.intervene(model, f"cls-prune:keep=10,budget={budget}") as handle:
        _logits(model, inputs)
        kept = handle.stats()["cls-prune"]["kept_positions"][0]
    visual = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().squeeze(1).tolist()
    per_group = torch.bincount(group[[visual.index(p) for p in kept]] + 1).tolist()   # [newlines, base, crop 1..]
    crops = int(group.max()) + 1
    if budget == "per_crop":
        assert per_group[1:] == [2] * crops
    else:
        assert sum(per_group[1:]) == 10
    assert per_group[0] == int((group == -1).sum())


def test_next_keeps_every_row_newline(tiny):
    model, processor = tiny("llava_next")
    inputs = testing.tiny_inputs(processor, batch=2, image_sizes=[(64, 32), (32, 64)])
    with torch.no_grad():
        feats = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"],
                                               vision_feature_layer=-2, vision_feature_select_strategy="default")
    with attnkit.intervene(model, "cls-prune:keep=3") as handle:
        _logits(model, inputs)
        kept = handle.stats()["cls-prune"]["kept_positions"]
    for b in range(2):
        rows = feats.pooler_output[b]
        is_newline = (rows == model.model.image_newline).all(-1)
        visual = (inputs["input_ids"][b] == model.config.image_token_id).nonzero().squeeze(1)
        assert is_newline.any()
        assert set(visual[is_newline].tolist()) <= set(kept[b])
        assert len(kept[b]) == 3 + int(is_newline.sum())


def test_fastv_mean_rank_uses_the_average_over_query_tokens(tiny):
    model, processor = tiny("qwen2_vl", "eager")
    inputs = testing.tiny_inputs(processor, batch=2)
    with torch.no_grad():
        attn = model(**inputs, output_attentions=True).attentions[1]     # layer k-1 = 1
    with attnkit.intervene(model, "fastv:k=2,keep=5,rank=mean") as handle:
        _logits(model, inputs)
        kept = handle.stats()["fastv"]["kept_positions"]
    valid = inputs["attention_mask"].bool()
    for b in range(2):
        visual = (inputs["input_ids"][b] == model.config.image_token_id).nonzero().squeeze(1)
        scores = attn[b].mean(0)[valid[b]].mean(0)[visual]
        assert kept[b] == sorted(visual[torch.topk(scores, 5).indices].tolist())


def test_random_score_follows_its_seed(tiny):
    model, processor = tiny("llava")
    inputs = testing.tiny_inputs(processor, batch=1)
    kept = {}
    for seed in (0, 0, 1):
        with attnkit.intervene(model, f"cls-prune:keep=4,score=random,seed={seed}") as handle:
            _logits(model, inputs)
            kept.setdefault(seed, []).append(handle.stats()["cls-prune"]["kept_positions"])
    assert kept[0][0] == kept[0][1] and kept[0][0] != kept[1][0]
