"""Every pruner on Qwen3-VL: equal to the unmodified model run on the kept tokens at their original 3-D positions with
exactly the kept tokens' DeepStack rows; dropped tokens' DeepStack rows provably unused; merged tokens' DeepStack rows
merged like their rows; the kept set equals an independent top-k from the tower's attentions; a padded batch equals
each sample alone."""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit import testing

FAMILY = "qwen3_vl"
# the pruners whose stages are all inside the LLM (K > 0), without merged rows: the masking reference applies
INSIDE = ["fastv:k=1,keep=6", "fastv:k=2,keep=6", "vte:policy=layer,exit_layer=0", "vte:policy=layer,exit_layer=1",
          "dart:k=2,keep=8,pivots=2,text_pivots=2", "dart:k=1,keep=6,pivots=2,text_pivots=2", "pyramiddrop:ratio=0.5",
          "pyramiddrop:layers=1+2,ratio=0.5", "sparsevlm:recycle=false"]
EVERY = ["cls-prune:keep=5,score=received", "visionzip:dominant=4,contextual=3", "sparsevlm:keep=192", *INSIDE]


def _logits(model, inputs, **kw):
    with torch.no_grad():
        return model(**inputs, **kw).logits


_visual = testing.visual_positions


def _dropped(visual, kept) -> list[list[int]]:
    return [[t for t in v if t not in k] for v, k in zip(visual, kept)]


def _gathered(logits, cols):
    return torch.gather(logits, 1, cols[..., None].expand(-1, -1, logits.shape[-1]))


def _tower(model, inputs) -> dict:
    """From the tower's own forward (eager-equivalent attention recomputed in a registered attention function):
    per image, the mean attention each patch receives at the last block pooled over the 2x2 merge unit
    (``received`` [16]), that block's keys before the rotary embedding (head mean, pooled, [16, d]) and the merger's
    input units ([16, 4, D])."""
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    visual = model.model.visual
    last = visual.blocks[-1].attn
    out: dict = {"received": []}

    def attention(module, q, k, v, attention_mask=None, scaling=None, **kw):
        if module is last:
            out["received"].append(torch.softmax(q @ k.transpose(2, 3) * scaling, dim=-1).mean((1, 2))[0])
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, q, k, v, attention_mask, scaling=scaling, **kw)

    def keep_qkv(module, args, qkv):
        out["keys"] = qkv.reshape(qkv.shape[0], 3, last.num_heads, -1)[:, 1].mean(1)

    def keep_merger_input(module, args):
        out["units"] = args[0].view(-1, 4, args[0].shape[-1])

    AttentionInterface.register("test_qwen3_capture", attention)
    model.set_attn_implementation({"vision_config": "test_qwen3_capture"})
    hooks = [last.qkv.register_forward_hook(keep_qkv), visual.merger.register_forward_pre_hook(keep_merger_input)]
    try:
        with torch.no_grad():
            model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    finally:
        model.set_attn_implementation({"vision_config": "sdpa"})
        for h in hooks:
            h.remove()
    n = len(out["received"])
    return {"received": [r.view(-1, 4).mean(1) for r in out["received"]],
            "keys": list(out["keys"].view(-1, 4, out["keys"].shape[-1]).mean(1).split(len(out["units"]) // n)),
            "units": list(out["units"].split(len(out["units"]) // n))}


# --- the vision capture -----------------------------------------------------------------------------------------
def test_kept_set_is_top_k_of_independent_received_scores(tiny):
    model, processor = tiny(FAMILY)
    inputs = testing.tiny_inputs(processor, batch=3)
    scores = _tower(model, inputs)["received"]
    with attnkit.intervene(model, "cls-prune:keep=6,score=received") as handle:
        _logits(model, inputs)
        kept = handle.stats()["cls-prune"]["kept_positions"]
    for b, v in enumerate(_visual(model, inputs)):
        assert kept[b] == sorted(torch.tensor(v)[torch.topk(scores[b], 6).indices].tolist())


def test_cls_score_is_refused_with_the_substitute_named(tiny):
    model, _ = tiny(FAMILY)
    with pytest.raises(ValueError, match=r"score='cls' is not available for qwen3_vl; use one of \('received',\)"):
        attnkit.wrap(model, "cls-prune:score=cls")
    assert attnkit.handle_of(model) is None


# --- equal to the model on the kept tokens ------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["cls-prune:keep=5,score=received", "cls-prune:keep=0.5,score=random"])
def test_stage_zero_drop_equals_model_fed_the_kept_tokens_and_their_deepstack_rows(tiny, spec):
    model, processor = tiny(FAMILY)
    inputs = testing.tiny_inputs(processor, batch=3)
    with attnkit.intervene(model, spec) as handle:
        pruned = _logits(model, inputs)
        kept = handle.stats()["cls-prune"]["kept_positions"]
    assert [len(k) for k in kept] == [5 if "keep=5" in spec else 8] * 3
    ref, cols = testing.reference_on_kept_deepstack(model, inputs, kept)
    valid = torch.gather(inputs["attention_mask"], 1, cols).bool()
    got = _gathered(pruned, cols)
    torch.testing.assert_close(got[valid], ref.logits[valid], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got[valid], _gathered(_logits(model, inputs), cols)[valid])


def test_several_images_of_different_sizes_per_sample(tiny):
    """Two images per sample (16, 24 or 32 tokens), left-padded: the budget per image, and still the model fed the
    kept tokens with exactly their DeepStack rows."""
    model, processor = tiny(FAMILY)
    inputs = testing.tiny_inputs(processor, batch=3, n_images=2, image_sizes=[(32, 32), (48, 32), (32, 64)])
    with attnkit.intervene(model, "cls-prune:keep=0.5,score=received") as handle:
        pruned = _logits(model, inputs)
        stats = handle.stats()["cls-prune"]
    counts = (inputs["image_grid_thw"].prod(-1) // 4).view(3, 2)
    assert stats["visual_tokens_kept"] == [round(int(a) / 2) + round(int(b) / 2) for a, b in counts.tolist()]
    assert len(set(stats["visual_tokens"])) > 1
    for b in range(3):          # samples keep different counts: one reference each (padding removed)
        pad = int((inputs["attention_mask"][b] == 0).sum())
        one = _one(inputs, b)
        ref, cols = testing.reference_on_kept_deepstack(model, one, [[t - pad for t in stats["kept_positions"][b]]])
        torch.testing.assert_close(pruned[b, cols[0] + pad], ref.logits[0], rtol=1e-4, atol=1e-5)


def test_visionzip_equals_an_independent_merge_of_rows_and_deepstack_rows(tiny):
    """Dominant by the independent received scores; contextual targets and members from the tower's pooled keys;
    the main row = the merger on ``unit_t + mean_{j→t} unit_j``; each DeepStack level's row = ``ds_t + mean ds_j``."""
    model, processor = tiny(FAMILY)
    inputs = testing.tiny_inputs(processor, batch=3)
    d, c = 4, 3
    tower = _tower(model, inputs)
    levels = testing.deepstack_feature_rows(model, inputs)
    visual = _visual(model, inputs)
    kept, rows, deepstack = [], [], [[] for _ in levels]
    for b in range(3):
        dominant = torch.topk(tower["received"][b], d).indices.sort().values.tolist()
        rest = [j for j in range(16) if j not in dominant]
        step = max(1, len(rest) // c)
        targets = [rest[i] for i in range(0, len(rest), step)][:c]
        unit = tower["keys"][b] / tower["keys"][b].norm(dim=-1, keepdim=True)
        members = {t: [] for t in targets}
        for j in rest:
            if j not in targets:
                members[targets[int(torch.stack([unit[j] @ unit[t] for t in targets]).argmax())]].append(j)

        def merge(x, members=members):
            return {t: x[t] + (x[m].mean(0) if m else 0) for t, m in members.items()}

        with torch.no_grad():
            rows.append({visual[b][t]: model.model.visual.merger(u)[0]
                         for t, u in merge(tower["units"][b]).items()})
        for level, level_rows in enumerate(levels):
            deepstack[level].append({visual[b][t]: r for t, r in merge(level_rows[b]).items()})
        kept.append(sorted(visual[b][j] for j in dominant + targets))
    with attnkit.intervene(model, f"visionzip:dominant={d},contextual={c}") as handle:
        pruned = _logits(model, inputs)
        assert handle.stats()["visionzip"]["kept_positions"] == kept
    ref, cols = testing.reference_on_kept_deepstack(model, inputs, kept, rows=rows, deepstack=deepstack)
    valid = torch.gather(inputs["attention_mask"], 1, cols).bool()
    torch.testing.assert_close(_gathered(pruned, cols)[valid], ref.logits[valid], rtol=1e-4, atol=1e-5)
    # the merged tokens' own DeepStack rows instead of the merged ones: a different model
    own, _ = testing.reference_on_kept_deepstack(model, inputs, kept, rows=rows)
    assert not torch.allclose(_gathered(pruned, cols)[valid], own.logits[valid], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("spec", INSIDE)
def test_inside_stages_equal_the_masking_reference(tiny, spec):
    """Stages at K > 0: equal to the unmodified model (all its DeepStack adds) with each stage's dropped tokens
    masked as keys from the stage's layer on, on every kept row."""
    model, processor = tiny(FAMILY)
    inputs = testing.tiny_inputs(processor, batch=3)
    name = spec.split(":")[0]
    with attnkit.intervene(model, spec) as handle:
        pruned = _logits(model, inputs)
        stats = handle.stats()[name]
    visual = _visual(model, inputs)
    masks = [(s["from_layer"], _dropped(visual, s["kept_positions"])) for s in testing.drop_stages(stats, len(visual))]
    assert all(layer > 0 for layer, _ in masks) and any(any(d) for _, d in masks)
    testing.assert_equals_mask_keys(model, inputs, pruned, masks)


def test_sparsevlm_recycled_tokens_merge_their_deepstack_rows(tiny):
    """SparseVLM's stage at layer 1 (between DeepStack levels 0 and 1): a recycled token's row is the cluster mean
    of the residual stream ENTERING layer 1 (level 0 added), and its level-1 DeepStack row is the same mean of
    its members' level-1 rows; with the masking reference, replaced rows and replaced DeepStack rows, equal."""
    model, processor = tiny(FAMILY)
    inputs = testing.tiny_inputs(processor, batch=3)
    layers = model.model.language_model.layers
    entering: dict = {}

    def capture(k):
        def hook(module, args, kwargs):
            entering.setdefault(k, (args[0] if args else kwargs["hidden_states"]).detach().clone())
        return hook

    with torch.no_grad():                               # the unmodified residual stream entering layer 1
        h = layers[1].register_forward_pre_hook(capture("full"), with_kwargs=True)
        try:
            _logits(model, inputs)
        finally:
            h.remove()
    with attnkit.intervene(model, "sparsevlm") as handle:
        hooks = [layers[k].register_forward_pre_hook(capture(k), with_kwargs=True) for k in (1, 2, 3)]
        try:
            pruned = _logits(model, inputs)
        finally:
            for h in hooks:
                h.remove()
        stats = handle.stats()["sparsevlm"]
        plans = list(handle.state.keep_plans)
    assert [p.from_layer for p in plans] == [1, 2, 3] and all(m > 0 for m in stats["merged_tokens"])
    levels = testing.deepstack_feature_rows(model, inputs)
    visual = _visual(model, inputs)
    rows_at: dict = {}
    deepstack: dict = {}
    for plan in plans:
        K = plan.from_layer
        slots = [{int(t): i for i, t in enumerate(plan.index[b].tolist())} for b in range(3)]
        rows_at[K] = [{} for _ in range(3)]
        for b, blocks in enumerate(plan.sources):
            for merged, members, weights in blocks:
                assert torch.allclose(weights.sum(1), torch.ones(len(merged)))
                for i, t in enumerate(merged.tolist()):
                    rows_at[K][b][t] = entering[K][b, slots[b][t]]
                    if K == 1:   # the first stage: the members' states are the unmodified model's
                        w = weights[i]
                        expected = w @ entering["full"][b, members].float()
                        torch.testing.assert_close(rows_at[K][b][t].float(), expected, rtol=1e-5, atol=1e-5)
                for level in range(K, len(levels)):      # levels added after the stage: merged alike
                    own = deepstack.setdefault(level, [{} for _ in range(3)])[b]
                    src = torch.stack([own.get(m, levels[level][b][visual[b].index(m)])
                                       for m in members.tolist()]).float()
                    for t, r in zip(merged.tolist(), weights @ src):
                        own[t] = r
    assert deepstack and any(deepstack[1])
    masks = [(p.from_layer, _dropped(visual, [[t for t in p.index[b][p.slot_valid[b]].tolist() if t in visual[b]]
                                              for b in range(3)])) for p in plans]
    replaced = []
    for K, rows in rows_at.items():
        replaced.append(testing.replace_rows(K, rows))
        replaced[-1].name = f"reference-replace-rows-{K}"       # one per stage
    refs = [testing.mask_keys(*masks[0], more=masks[1:]), testing.replace_deepstack(deepstack), *replaced]
    with attnkit.intervene(model, *refs):
        ref = _logits(model, inputs)
    keep = inputs["attention_mask"].bool().clone()
    for b, cols in enumerate(masks[-1][1]):
        keep[b, cols] = False
    torch.testing.assert_close(pruned[keep], ref[keep], rtol=1e-4, atol=1e-5)
    with attnkit.intervene(model, *refs[:1], *refs[2:]):   # without the merged DeepStack rows: different
        unmerged = _logits(model, inputs)
    assert not torch.allclose(pruned[keep], unmerged[keep], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layer", [1, 2])
def test_pyramiddrop_ranks_by_the_next_layers_attention_deepstack_included(tiny, layer):
    """A stage at layer K decides on the residual stream entering layer K, i.e. after DeepStack level K-1 was added:
    PyramidDrop's ranking equals the last token's attention in layer K of the unmodified model (eager)."""
    model, processor = tiny(FAMILY, "eager")
    inputs = testing.tiny_inputs(processor, batch=3)
    with torch.no_grad():
        attentions = model(**inputs, output_attentions=True).attentions
    with attnkit.intervene(model, f"pyramiddrop:layers={layer},ratio=0.25") as handle:
        _logits(model, inputs)
        stats = handle.stats()["pyramiddrop"]
    assert stats["from_layer"] == layer
    for b, v in enumerate(_visual(model, inputs)):
        row = attentions[layer][b, :, -1].mean(0)[v]
        assert stats["kept_positions"][b] == sorted(torch.tensor(v)[torch.topk(row, 4).indices].tolist())


# --- dropped tokens' DeepStack rows are not used ------------------------------------------------------------------
def _perturbed(model, inputs, spec, targets: dict[int, list[list[int]]]):
    """Logits under ``spec`` with DeepStack level l's rows of the visual indices ``targets[l][b]`` replaced by noise
    (at the deepstack mergers' outputs), and the run's final kept positions."""
    visual = model.model.visual
    counts = [len(v) for v in _visual(model, inputs)]
    starts = [sum(counts[:b]) for b in range(len(counts))]
    hooks = []
    for level, per_sample in targets.items():
        def noise(module, args, out, per_sample=per_sample):
            out = out.clone()
            for b, idx in enumerate(per_sample):
                gen = torch.Generator().manual_seed(b)
                for i in idx:
                    out[starts[b] + i] = 10 * torch.randn(out.shape[-1], generator=gen)
            return out
        hooks.append(visual.deepstack_merger_list[level].register_forward_hook(noise))
    try:
        with attnkit.intervene(model, spec) as handle:
            logits = _logits(model, inputs)
            stats = handle.stats()[spec.split(":")[0]]
    finally:
        for h in hooks:
            h.remove()
    return logits, stats


@pytest.mark.parametrize("spec, first_unused", [("cls-prune:keep=5,score=received", 0), ("fastv:k=1,keep=6", 0),
                                                ("fastv:k=2,keep=6", 1)])
def test_dropped_tokens_deepstack_rows_are_not_used(tiny, spec, first_unused):
    """Noise on a dropped token's DeepStack rows of the levels added at or after its drop: bit-identical logits;
    the same noise on one kept token's row changes them (a drop at layer K runs layers 0..K-1 on every token, so
    the rows of levels < K-1 are used, and the last level before the drop is added before it)."""
    model, processor = tiny(FAMILY)
    inputs = testing.tiny_inputs(processor, batch=3)
    n_levels = len(model.config.vision_config.deepstack_visual_indexes)
    clean, stats = _perturbed(model, inputs, spec, {})
    visual, kept = _visual(model, inputs), stats["kept_positions"]
    dropped = [[i for i, t in enumerate(v) if t not in k] for v, k in zip(visual, kept)]
    later = {level: dropped for level in range(first_unused, n_levels)}
    noisy, stats2 = _perturbed(model, inputs, spec, later)
    assert stats2["kept_positions"] == kept and torch.equal(noisy, clean)
    one_kept = [[v.index(k[0])] for v, k in zip(visual, kept)]
    changed, _ = _perturbed(model, inputs, spec, {n_levels - 1: one_kept})
    valid = inputs["attention_mask"].bool()
    assert not torch.allclose(changed[valid], clean[valid])
    if first_unused > 0:       # and the earlier levels of the dropped tokens are used
        used, _ = _perturbed(model, inputs, spec, {0: dropped})
        assert not torch.allclose(used[valid], clean[valid])


def test_positions_are_the_original_interleaved_3d_ones(tiny):
    model, processor = tiny(FAMILY)
    inputs = testing.tiny_inputs(processor, batch=3)
    seen = {}

    def keep(module, args, kwargs):
        seen.setdefault("pos", kwargs["position_ids"])

    with attnkit.intervene(model, "cls-prune:keep=5") as handle:
        h = model.model.language_model.register_forward_pre_hook(keep, with_kwargs=True)
        try:
            _logits(model, inputs)
        finally:
            h.remove()
        plan = handle.state.keep_plans[0]
    full = testing.original_positions(model, inputs)
    assert full.shape[0] == 3 and seen["pos"].shape[0] == 3
    assert torch.equal(seen["pos"], torch.gather(full, -1, plan.index.expand(3, -1, -1)))


# --- batches and generation ------------------------------------------------------------------------------------------
def _one(inputs, b):
    one = {k: v[b:b + 1] for k, v in inputs.items() if k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    keep = one["attention_mask"][0].bool()
    one = {k: v[:, keep] for k, v in one.items()}
    grid = inputs["image_grid_thw"]
    k = len(grid) // inputs["input_ids"].shape[0]                   # images per sample
    per = grid.prod(-1).tolist()
    start = sum(per[:b * k])
    one.update(pixel_values=inputs["pixel_values"][start:start + sum(per[b * k:(b + 1) * k])],
               image_grid_thw=grid[b * k:(b + 1) * k])
    return one


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("spec", EVERY)
def test_padded_batch_equals_each_sample_alone(tiny, one_thread, side, spec):
    model, processor = tiny(FAMILY)
    inputs = testing.padded_inputs(processor, 3, side)
    with attnkit.intervene(model, spec):
        batched = _logits(model, inputs)
        for b in range(3):
            keep = inputs["attention_mask"][b].bool()
            torch.testing.assert_close(batched[b, keep], _logits(model, _one(inputs, b))[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("spec", ["visionzip:dominant=4,contextual=3", "sparsevlm:keep=192", "fastv:k=1,keep=0.5"])
def test_several_images_per_sample_batch_equals_each_sample_alone(tiny, one_thread, spec):
    model, processor = tiny(FAMILY)
    inputs = testing.tiny_inputs(processor, batch=3, n_images=2, image_sizes=[(32, 32), (48, 32), (32, 64)])
    with attnkit.intervene(model, spec):
        batched = _logits(model, inputs)
        for b in range(3):
            keep = inputs["attention_mask"][b].bool()
            torch.testing.assert_close(batched[b, keep], _logits(model, _one(inputs, b))[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("spec", ["cls-prune:keep=4", "visionzip:dominant=4,contextual=3"])
def test_generate_equals_no_cache_loop(tiny, one_thread, spec):
    """Stage-0 choices depend on the image alone: the no-cache loop re-deciding at every step is the reference."""
    model, processor = tiny(FAMILY)
    inputs = testing.tiny_inputs(processor, batch=3)
    with attnkit.intervene(model, spec):
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, suppress_tokens=testing.SPECIAL_IDS)
        ref = testing.greedy_reference(model, inputs, 4, FAMILY)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("spec", ["fastv:k=1,keep=6", "sparsevlm:keep=192", "pyramiddrop:ratio=0.5"])
def test_generate_equals_prefill_and_one_cached_chunk(tiny, one_thread, spec):
    """Choices made inside the LLM at prefill: the reference is that prefill plus the generated tokens as one chunk."""
    model, processor = tiny(FAMILY)
    inputs = testing.tiny_inputs(processor, batch=3)
    with attnkit.intervene(model, spec):
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, suppress_tokens=testing.SPECIAL_IDS,
                             output_logits=True, return_dict_in_generate=True)
        ref = testing.prefill_chunk_logits(model, inputs, out.sequences, FAMILY)
    torch.testing.assert_close(torch.stack(out.logits, 1), ref, rtol=1e-4, atol=1e-4)


def test_remove_restores_the_deepstack_process(tiny):
    model, processor = tiny(FAMILY)
    inputs = testing.tiny_inputs(processor, batch=2)
    before = _logits(model, inputs)
    lm = model.model.language_model
    with attnkit.intervene(model, "fastv:k=1,keep=6"):
        assert "_deepstack_process" in lm.__dict__
    assert "_deepstack_process" not in lm.__dict__ and torch.equal(_logits(model, inputs), before)
