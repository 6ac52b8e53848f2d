"""VisionZip, DART, PyramidDrop and SparseVLM: equal to the unmodified model on the kept (and merged) tokens at their
original positions; selections equal an independent computation; merging equals a hand computation."""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit import testing
from attnkit.interventions.sparsevlm import recycle
from attnkit.interventions.visionzip import contextual_tokens

FAMILIES = testing.FAMILIES


def _logits(model, inputs, **kw):
    with torch.no_grad():
        return model(**inputs, **kw).logits


_visual = testing.visual_positions


def _dropped(model, inputs, kept) -> list[list[int]]:
    return [[t for t in v if t not in k] for v, k in zip(_visual(model, inputs), kept)]


def _capture(store: dict, name: str):
    """A forward pre-hook (with kwargs) that keeps the first hidden-state input it sees under ``name``."""
    def hook(module, args, kwargs):
        store.setdefault(name, args[0] if args else kwargs.get("hidden_states", kwargs.get("inputs_embeds")))
    return hook


def _assert_equals_masking_reference(model, inputs, spec, name):
    """The pruned logits equal the unmodified model with each stage's dropped tokens masked as keys from the
    stage's layer on (nothing removed), on every kept row."""
    with attnkit.intervene(model, spec) as handle:
        pruned = _logits(model, inputs)
        stats = handle.stats()[name]
    stages = testing.drop_stages(stats, inputs["input_ids"].shape[0])
    masks = [(s["from_layer"], _dropped(model, inputs, s["kept_positions"])) for s in stages]
    testing.assert_equals_mask_keys(model, inputs, pruned, masks)
    return stats


# --- merging on hand-made tensors ------------------------------------------------------------------------------
def test_contextual_tokens_merge_target_plus_mean_of_members():
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9], [1.0, 0.05]])
    features = torch.arange(10.0).view(5, 2)
    targets, merged = contextual_tokens(keys, features, 2)
    assert targets.tolist() == [0, 2]            # step = 5 // 2 = 2: tokens 0 and 2 are the targets
    # 1 ([0, 1]) and 3 ([0.1, 0.9]) are closer to... target 0 is [1, 0], target 2 is [0.9, 0.1]:
    # cos(1, t0) = 0, cos(1, t2) = 0.11 -> t2; cos(3, t0) = 0.11, cos(3, t2) = 0.21 -> t2; cos(4, t0) > cos(4, t2) -> t0
    torch.testing.assert_close(merged[0], features[0] + features[4])
    torch.testing.assert_close(merged[1], features[2] + (features[1] + features[3]) / 2)


def test_recycle_clusters_and_means():
    x = torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [5.0, 5.0], [5.1, 5.0], [5.0, 5.2]])
    centres, rows = recycle(x, 2)
    groups = sorted(sorted(int(i) for i in range(6) if (x[i] - x[c]).norm() < 1) for c in centres)
    assert groups == [[0, 1, 2], [3, 4, 5]]
    expected = {tuple(g): x[g].mean(0) for g in ([0, 1, 2], [3, 4, 5])}
    for c, row in zip(centres.tolist(), rows):
        group = (0, 1, 2) if c < 3 else (3, 4, 5)
        torch.testing.assert_close(row, expected[group])


# --- VisionZip ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_visionzip_without_contextual_keeps_what_cls_prune_keeps(tiny, family):
    model, processor = tiny(family)
    inputs = testing.tiny_inputs(processor, batch=3)
    with attnkit.intervene(model, "visionzip:dominant=5,contextual=0"):
        zipped = _logits(model, inputs)
    with attnkit.intervene(model, "cls-prune:keep=5"):
        pruned = _logits(model, inputs)
    assert torch.equal(zipped, pruned)


@pytest.mark.parametrize("family", FAMILIES)
def test_visionzip_equals_model_on_kept_and_merged_rows(tiny, family):
    """Positions, masks and rows: the LLM under visionzip equals the unmodified model fed the same kept rows."""
    model, processor = tiny(family)
    inputs = testing.tiny_inputs(processor, batch=3)
    seen = {}
    with attnkit.intervene(model, "visionzip:dominant=4,contextual=3") as handle:
        lm = handle.adapter.language_model
        hook = lm.register_forward_pre_hook(_capture(seen, "embeds"), with_kwargs=True)
        try:
            pruned = _logits(model, inputs)
        finally:
            hook.remove()
        stats = handle.stats()["visionzip"]
        plan = handle.state.keep_plan
    newline = getattr(model.model, "image_newline", None)
    n_newline = [0 if newline is None else int((r == newline.to(r)).all(-1).sum())
                 for r in testing.image_feature_rows(model, inputs)]
    assert stats["visual_tokens_kept"] == [7 + m for m in n_newline]
    assert stats["merged_tokens"] == [3, 3, 3]
    rows = [{int(t): seen["embeds"][b, i] for i, t in enumerate(plan.index[b].tolist())
             if t in stats["kept_positions"][b]} for b in range(3)]
    ref, cols = testing.reference_on_kept(model, inputs, stats["kept_positions"], rows=rows)
    valid = torch.gather(inputs["attention_mask"], 1, cols).bool()
    got = torch.gather(pruned, 1, cols[..., None].expand(-1, -1, pruned.shape[-1]))
    torch.testing.assert_close(got[valid], ref.logits[valid], rtol=1e-4, atol=1e-5)


def test_visionzip_rows_equal_a_hand_computation_on_llava(tiny):
    """Dominant by the [CLS] row of eager output_attentions, contextual tokens merged from the tower's own hidden
    states and keys, projected: the pruned model equals the unmodified model fed those rows."""
    model, processor = tiny("llava", "eager")
    inputs = testing.tiny_inputs(processor, batch=2)
    d, c = 4, 3
    tower = model.model.vision_tower
    with torch.no_grad():
        out = tower(inputs["pixel_values"], output_hidden_states=True, output_attentions=True)
        encoder = getattr(tower, "vision_model", tower).encoder
        layer_idx = len(encoder.layers) - 2                                          # vision_feature_layer = -2
        layer = encoder.layers[layer_idx]
        score = out.attentions[layer_idx][:, :, 0, 1:].sum(1)                       # [images, 16]
        x = out.hidden_states[-2][:, 1:]
        k = layer.self_attn.k_proj(layer.layer_norm1(out.hidden_states[layer_idx]))
        k = k.view(k.shape[0], k.shape[1], layer.self_attn.num_heads, -1).mean(2)[:, 1:]
    visual = _visual(model, inputs)
    kept, rows = [], []
    for b in range(2):
        dominant = torch.topk(score[b], d).indices.sort().values.tolist()
        rest = [j for j in range(16) if j not in dominant]
        step = max(1, len(rest) // c)
        targets = [rest[i] for i in range(0, len(rest), step)][:c]
        unit = k[b] / k[b].norm(dim=-1, keepdim=True)
        merged = {t: x[b, t].clone() for t in targets}
        members = {t: [] for t in targets}
        for j in rest:
            if j not in targets:
                members[targets[int(torch.stack([unit[j] @ unit[t] for t in targets]).argmax())]].append(j)
        for t in targets:
            if members[t]:
                merged[t] = merged[t] + x[b, members[t]].mean(0)
        with torch.no_grad():
            rows.append({visual[b][t]: model.model.multi_modal_projector(merged[t]) for t in targets})
        kept.append(sorted(visual[b][j] for j in dominant + targets))
    with attnkit.intervene(model, f"visionzip:dominant={d},contextual={c}") as handle:
        pruned = _logits(model, inputs)
        assert handle.stats()["visionzip"]["kept_positions"] == kept
    ref, cols = testing.reference_on_kept(model, inputs, kept, rows=rows)
    got = torch.gather(pruned, 1, cols[..., None].expand(-1, -1, pruned.shape[-1]))
    valid = torch.gather(inputs["attention_mask"], 1, cols).bool()
    torch.testing.assert_close(got[valid], ref.logits[valid], rtol=1e-4, atol=1e-5)


# --- DART ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_dart_equals_masking_reference(tiny, family):
    model, processor = tiny(family)
    inputs = testing.tiny_inputs(processor, batch=3)
    stats = _assert_equals_masking_reference(model, inputs, "dart:k=2,keep=8,pivots=2,text_pivots=2", "dart")
    assert stats["visual_tokens_kept"] == [2 + 4 * 2] * 3      # pivots + (pivots + text_pivots) * floor(8 / 4)


def test_dart_selection_equals_an_independent_computation(tiny):
    """Pivots by the L1 norm of layer K-1's post-RoPE keys, duplicates by cosine of the final-normed states of
    layer K-1's output, recomputed here from output_hidden_states and the layer's own projections."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model, processor = tiny("llava")
    inputs = testing.tiny_inputs(processor, batch=2)
    lm = model.model.language_model
    K, pivots, text_pivots, per = 2, 2, 2, 2
    with torch.no_grad():
        hs = model(**inputs, output_hidden_states=True).hidden_states
        attn = lm.layers[K - 1].self_attn
        k = attn.k_proj(lm.layers[K - 1].input_layernorm(hs[K - 1]))
        k = k.view(k.shape[0], k.shape[1], -1, attn.head_dim).transpose(1, 2)
        positions = torch.arange(k.shape[2]).expand(k.shape[0], -1)
        cos, sin = lm.rotary_emb(hs[K - 1], positions)
        _, k = apply_rotary_pos_emb(k, k, cos, sin)
        norms = k.abs().sum(-1).sum(1)                                             # [B, L]
        h = lm.norm(hs[K])
    visual = _visual(model, inputs)
    expected = []
    for b in range(2):
        v = torch.tensor(visual[b])
        first = int(v[0])
        text = [t for t in range(int(v[-1]) + 1, k.shape[2]) if inputs["attention_mask"][b, t]]
        img_p = sorted(v[torch.topk(norms[b, v], pivots).indices].tolist())
        txt_p = sorted(torch.tensor(text)[torch.topk(norms[b, text], text_pivots).indices].tolist())
        free = [t for t in visual[b] if t not in img_p]
        kept = list(img_p)
        for p in img_p + txt_p:
            sims = torch.stack([torch.cosine_similarity(h[b, p], h[b, t], dim=0) for t in free])
            chosen = [free[i] for i in torch.topk(-sims, per).indices.tolist()]
            kept += chosen
            free = [t for t in free if t not in chosen]
        assert first <= min(kept)
        expected.append(sorted(kept))
    with attnkit.intervene(model, f"dart:k={K},keep=8,pivots={pivots},text_pivots={text_pivots}") as handle:
        _logits(model, inputs)
        assert handle.stats()["dart"]["kept_positions"] == expected


# --- PyramidDrop ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_pyramiddrop_equals_masking_reference(tiny, family):
    model, processor = tiny(family)
    inputs = testing.tiny_inputs(processor, batch=3)
    stats = _assert_equals_masking_reference(model, inputs, "pyramiddrop:ratio=0.5", "pyramiddrop")
    n = len(_visual(model, inputs)[0])
    assert [s["visual_tokens_kept"][0] for s in stats["stages"]] == [n // 2, n // 4, n // 8]


@pytest.mark.parametrize("family", FAMILIES)
def test_pyramiddrop_one_stage_keeps_what_fastv_one_layer_later_keeps(tiny, family):
    model, processor = tiny(family)
    inputs = testing.tiny_inputs(processor, batch=3)
    with attnkit.intervene(model, "pyramiddrop:layers=1,ratio=0.5") as handle:
        pdrop = _logits(model, inputs)
        kept = handle.stats()["pyramiddrop"]["kept_positions"]
    with attnkit.intervene(model, "fastv:k=2,keep=0.5") as handle:
        fastv = _logits(model, inputs)
        assert handle.stats()["fastv"]["kept_positions"] == kept
    assert not torch.allclose(pdrop, fastv)      # same ranking; PyramidDrop drops one layer earlier


def test_pyramiddrop_ranks_by_the_next_layers_attention(tiny):
    model, processor = tiny("llava", "eager")
    inputs = testing.tiny_inputs(processor, batch=2)
    with torch.no_grad():
        attentions = model(**inputs, output_attentions=True).attentions
    with attnkit.intervene(model, "pyramiddrop:layers=2,ratio=0.25") as handle:
        _logits(model, inputs)
        kept = handle.stats()["pyramiddrop"]["kept_positions"]
    for b, v in enumerate(_visual(model, inputs)):
        row = attentions[2][b, :, -1].mean(0)[v]                   # what layer 2 computes on the full prompt
        assert kept[b] == sorted(torch.tensor(v)[torch.topk(row, 4).indices].tolist())


# --- SparseVLM --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("recycle_tokens", [False, True])
def test_sparsevlm_equals_masking_reference(tiny, family, recycle_tokens):
    model, processor = tiny(family)
    inputs = testing.tiny_inputs(processor, batch=3)
    if recycle_tokens:   # merged rows change the states: check the stages' counts; rows are checked below
        with attnkit.intervene(model, "sparsevlm") as handle:
            _logits(model, inputs)
            stats = handle.stats()["sparsevlm"]
        assert all(m > 0 for m in stats["merged_tokens"])
        return
    stats = _assert_equals_masking_reference(model, inputs, "sparsevlm:recycle=false", "sparsevlm")
    n = len(_visual(model, inputs)[0])
    assert [s["visual_tokens_kept"][0] for s in stats["stages"]] == [round(b * n / 576) for b in (300, 200, 110)]


def test_sparsevlm_raters_scores_and_recycled_rows_equal_a_hand_computation(tiny):
    model, processor = tiny("llava", "eager")
    inputs = testing.tiny_inputs(processor, batch=2)
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True, output_attentions=True)
    ids = inputs["input_ids"]
    feats = testing.image_feature_rows(model, inputs)
    visual = _visual(model, inputs)
    n = len(visual[0])
    budget = round(300 * n / 576)
    expected_kept, expected_rows = [], []
    for b in range(2):
        embeds = model.get_input_embeddings()(ids[b]).detach()
        text = [t for t in range(visual[b][-1] + 1, ids.shape[1]) if inputs["attention_mask"][b, t]]
        r = torch.softmax(feats[b].float() @ embeds[text].T.float(), -1).mean(0)
        raters = [t for t, keep in zip(text, (r > r.mean()).tolist()) if keep]
        score = out.attentions[0][b][:, raters][:, :, visual[b]].mean(0).mean(0)   # layer 0 runs, then the drop
        kept = torch.topk(score, budget).indices
        dropped = [j for j in range(n) if j not in kept.tolist()]
        best = torch.tensor(dropped)[torch.topk(score[dropped], len(dropped) * 3 // 10 + 1).indices]
        centres, rows = recycle(out.hidden_states[1][b, torch.tensor(visual[b])[best]].float(), len(best) // 10 + 1)
        expected_kept.append(sorted(visual[b][j] for j in kept.tolist() + best[centres].tolist()))
        expected_rows.append({visual[b][int(best[c])]: row for c, row in zip(centres, rows)})
    entering = {}
    with attnkit.intervene(model, "sparsevlm") as handle:
        layers = handle.adapter.decoder_layers
        hook = layers[1].register_forward_pre_hook(_capture(entering, "h"), with_kwargs=True)
        try:
            _logits(model, inputs)
        finally:
            hook.remove()
        stage = handle.stats()["sparsevlm"]["stages"][0]
        plan = handle.state.keep_plans[0]
    assert stage["from_layer"] == 1 and stage["kept_positions"] == expected_kept
    for b in range(2):
        slots = {int(t): i for i, t in enumerate(plan.index[b].tolist())}
        for t, row in expected_rows[b].items():
            torch.testing.assert_close(entering["h"][b, slots[t]], row.to(entering["h"]), rtol=1e-5, atol=1e-6)


def test_budget_ratios_are_validated():
    for spec in ("visionzip:contextual=1.5", "sparsevlm:keep=1.5"):
        with pytest.raises(ValueError, match="is out of range; allowed: a count >= 1 or a ratio in"):
            attnkit.build(spec)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_contextual_tokens_on_a_gpu():
    keys, features = torch.randn(20, 8, device="cuda"), torch.randn(20, 4, device="cuda")
    targets, merged = contextual_tokens(keys, features, 3)
    ref_targets, ref = contextual_tokens(keys.cpu(), features.cpu(), 3)
    assert targets.tolist() == ref_targets.tolist()
    torch.testing.assert_close(merged.cpu(), ref)
