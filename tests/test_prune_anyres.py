"""Every pruner on LLaVA-OneVision (SigLIP, AnyRes-max packing with its bilinear downsample, row newlines) and InternVL
([CLS], pixel-shuffle merge units, tiles + thumbnail): equal to the unmodified model on the kept (and merged) tokens at
their original positions; kept sets equal an independent top-k from the tower's eager attentions, packed / pooled here
as the model packs its features; per-tile budgets; padded batches and expanded batches equal each sample alone."""

from __future__ import annotations

import math

import pytest
import torch

import attnkit
from attnkit import testing
from attnkit.hooks.install import Installed

ANYRES = ("llava_onevision", "internvl")
GEN = dict(do_sample=False, suppress_tokens=testing.SPECIAL_IDS)
# big enough to exercise the packing: OneVision 128x96 -> a 3x4 grid of crops (12 > 9: downsampled); InternVL 64x64
# -> 4 tiles + the thumbnail
BIG = {"llava_onevision": (128, 96), "internvl": (64, 64)}
# stage-0 specs -> content tokens kept per image of BIG (OneVision's 10 row newlines come on top)
STAGE0 = {"cls-prune:keep=6": 6, "cls-prune:keep=12,budget=per_crop": {"llava_onevision": 13, "internvl": 10},
          "cls-prune:keep=0.25,score=uniform": {"llava_onevision": 36, "internvl": 20},
          "visionzip:dominant=4,contextual=3": 7}
INSIDE = ["fastv:k=2,keep=6", "dart:k=2,keep=8,pivots=2,text_pivots=2", "pyramiddrop:ratio=0.5",
          "sparsevlm:recycle=false", "vte:policy=layer,exit_layer=1"]


def _logits(model, inputs, **kw):
    with torch.no_grad():
        return model(**inputs, **kw).logits


_visual = testing.visual_positions


def _big_inputs(processor, family, batch=3, **kw):
    return testing.tiny_inputs(processor, batch=batch, image_sizes=[BIG[family]], **kw)


def _capture(model, inputs, wants):
    """The adapter's vision capture for one forward (one dict per image)."""
    adapter = attnkit.models.get_adapter(model)
    got, inst = {}, Installed()
    adapter.install_vision_capture(inst, frozenset(wants), lambda images: got.update(images=images))
    try:
        _logits(model, inputs)
    finally:
        inst.remove()
    return got["images"]


# --- independent scores: the tower's eager attentions, packed / pooled here ---------------------------------------
def _onevision_tokens(model, inputs, b):
    """Sample b's image (one per sample, 128x96: a 3x4 crop grid, no unpadding) as the LLM sees it: per token its
    received score, its crop group (the crop with the largest bilinear weight) and whether it is a row newline;
    from ``output_attentions`` of the eager tower and F.interpolate, without the model's packing code."""
    cfg = model.config
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size           # 4 patches per crop side
    rows_, cols_ = 3, 4
    crops = 1 + rows_ * cols_
    with torch.no_grad():
        att = model.model.vision_tower(inputs["pixel_values"][b, :crops], output_attentions=True).attentions[-1]
    received = att.mean(1).mean(1)                                                 # [crops, 16]: heads, queries
    onehot = torch.eye(crops)[:, None, :].expand(-1, side * side, -1)              # [crops, 16, crops]
    per_patch = torch.cat([received[..., None], onehot], -1)                       # [crops, 16, 1 + crops]

    def grid(x):  # crops 1.. in row-major order -> one map [C, rows*side, cols*side]
        return x[1:].view(rows_, cols_, side, side, -1).permute(4, 0, 2, 1, 3).reshape(-1, rows_ * side, cols_ * side)

    m = grid(per_patch)
    h, w = m.shape[1:]
    ratio = math.sqrt(h * w / (9 * side**2))
    assert ratio > 1.1, "the test image must trigger AnyRes-max's downsample"
    m = torch.nn.functional.interpolate(m[None], [int(h // ratio), int(w // ratio)], mode="bilinear")[0]
    hh, ww = m.shape[1:]
    assert hh * ww < h * w
    score = [per_patch[0, :, 0]]
    group = [torch.zeros(side * side, dtype=torch.long)]
    newline = [torch.zeros(side * side, dtype=torch.bool)]
    for r in range(hh):
        score += [m[0, r], torch.zeros(1)]
        group += [m[1:, r].argmax(0), torch.tensor([-1])]
        newline += [torch.zeros(ww, dtype=torch.bool), torch.ones(1, dtype=torch.bool)]
    return torch.cat(score), torch.cat(group), torch.cat(newline)


def _internvl_tokens(model, inputs, b, score="cls"):
    """Sample b's image as the LLM sees it: per token the [CLS] (or received) attention averaged over its 2x2
    pixel-shuffle unit (token (i, j) <- patches (2i+di, 2j+dj)), and its tile group (thumbnail, the last tile: 0)."""
    n_visual = [len(v) for v in _visual(model, inputs)]
    per_tile = model.config.image_seq_length
    start = sum(n_visual[:b]) // per_tile
    tiles = n_visual[b] // per_tile
    with torch.no_grad():
        att = model.model.vision_tower(inputs["pixel_values"][start:start + tiles], output_attentions=True).attentions
    att = att[-1].mean(1)                                                           # [tiles, 65, 65]
    s = att[:, 0, 1:] if score == "cls" else att.mean(1)[:, 1:]                     # [tiles, 64]
    side = int(s.shape[1] ** 0.5)
    pooled = s.view(tiles, side // 2, 2, side // 2, 2).mean((2, 4)).reshape(tiles, -1)
    group = torch.arange(1, tiles + 1) if tiles > 1 else torch.zeros(1, dtype=torch.long)
    if tiles > 1:
        group[-1] = 0
    return pooled.reshape(-1), group.repeat_interleave(per_tile), torch.zeros(tiles * per_tile, dtype=torch.bool)


def _expected_kept(score, group, newline, k, budget):
    content = (~newline).nonzero().squeeze(1)
    s, g = score[content], group[content]
    chosen = []
    if budget == "shared":     # base (group 0) and the rest in proportion to their tokens, as NeXT
        base, rest = (g == 0).nonzero().squeeze(1), (g != 0).nonzero().squeeze(1)
        k_base = round(k * len(base) / len(content)) if len(rest) else k
        chosen = [base[torch.topk(s[base], k_base).indices], rest[torch.topk(s[rest], k - k_base).indices]]
    else:                      # the same k in every group
        each = round(k / len(g.unique()))
        for gid in g.unique():
            members = (g == gid).nonzero().squeeze(1)
            chosen.append(members[torch.topk(s[members], min(each, len(members))).indices])
    return sorted(content[torch.cat(chosen)].tolist() + newline.nonzero().squeeze(1).tolist())


@pytest.mark.parametrize("family", ANYRES)
@pytest.mark.parametrize("budget", ["shared", "per_crop"])
def test_kept_set_is_top_k_of_the_towers_attentions(tiny, family, budget):
    model, processor = tiny(family, "eager")
    inputs = _big_inputs(processor, family, batch=2)
    k = 13
    with attnkit.intervene(model, f"cls-prune:keep={k},budget={budget}") as handle:
        _logits(model, inputs)
        kept = handle.stats()["cls-prune"]["kept_positions"]
    for b, visual in enumerate(_visual(model, inputs)):
        tokens = _onevision_tokens if family == "llava_onevision" else _internvl_tokens
        score, group, newline = tokens(model, inputs, b)
        assert len(score) == len(visual)
        if family == "internvl":
            assert len(group.unique()) == 5                                         # 4 tiles + thumbnail
        expected = _expected_kept(score, group, newline, k, budget)
        assert kept[b] == [visual[i] for i in expected]


def test_internvl_received_score_is_top_k_of_the_towers_attentions(tiny):
    model, processor = tiny("internvl", "eager")
    inputs = _big_inputs(processor, "internvl", batch=1)
    with attnkit.intervene(model, "cls-prune:keep=9,score=received") as handle:
        _logits(model, inputs)
        kept = handle.stats()["cls-prune"]["kept_positions"][0]
    score, group, newline = _internvl_tokens(model, inputs, 0, score="received")
    visual = _visual(model, inputs)[0]
    assert kept == [visual[i] for i in _expected_kept(score, group, newline, 9, "shared")]


def test_per_crop_keeps_the_same_k_in_every_tile_and_crop(tiny):
    for family in ANYRES:
        model, processor = tiny(family)
        inputs = _big_inputs(processor, family, batch=1)
        group = _capture(model, inputs, {"cls" if family == "internvl" else "received"})[0]["group"]
        with attnkit.intervene(model, "cls-prune:keep=26,budget=per_crop") as handle:
            _logits(model, inputs)
            kept = handle.stats()["cls-prune"]["kept_positions"][0]
        visual = _visual(model, inputs)[0]
        per_group = torch.bincount(group[[visual.index(p) for p in kept]] + 1).tolist()   # [newlines, 0, 1, ...]
        groups = int(group.max()) + 1
        each = round(26 / groups)
        sizes = torch.bincount(group[group >= 0]).tolist()
        assert per_group[1:] == [min(each, n) for n in sizes]
        assert per_group[0] == int((group == -1).sum())
        assert groups == (13 if family == "llava_onevision" else 5)


def test_onevision_refuses_the_cls_score_with_the_reason(tiny):
    model, _ = tiny("llava_onevision")
    with pytest.raises(ValueError, match="SigLIP tower has no \\[CLS\\] token; use score='received'"):
        attnkit.wrap(model, "cls-prune:score=cls")
    assert attnkit.handle_of(model) is None


def test_capture_rows_are_what_the_model_feeds(tiny):
    """``features`` projected are the LLM rows (InternVL: every token; OneVision: the base crop and, for an image
    that is not downsampled, every grid token); newlines sit where the model put ``image_newline``."""
    for family, size in [("internvl", (64, 32)), ("llava_onevision", (64, 64)), ("llava_onevision", (128, 96))]:
        model, processor = tiny(family)
        inputs = testing.tiny_inputs(processor, batch=2, image_sizes=[size])
        images = _capture(model, inputs, {"keys", "features"})
        adapter = attnkit.models.get_adapter(model)
        for im, rows in zip(images, testing.visual_rows_per_sample(model, inputs)):
            content = im["group"] >= 0
            exact = content if size != (128, 96) else im["group"] == 0
            if family == "llava_onevision":
                newline = (rows == model.model.image_newline.to(rows)).all(-1)
                assert torch.equal(newline, ~content)
            torch.testing.assert_close(adapter.project(im["features"][exact]), rows[exact], rtol=1e-5, atol=1e-5)


# --- every pruner: the unmodified model on the kept tokens ---------------------------------------------------------
def _masking_reference(model, inputs, spec, name):
    """Pruned logits == the unmodified model with each stage's dropped tokens masked as keys from the stage's layer
    on (nothing removed), on every kept row."""
    with attnkit.intervene(model, spec) as handle:
        pruned = _logits(model, inputs)
        stats = handle.stats()[name]
    visual = _visual(model, inputs)
    masks = [(s["from_layer"], [[t for t in v if t not in kept] for v, kept in zip(visual, s["kept_positions"])])
             for s in testing.drop_stages(stats, len(visual))]
    testing.assert_equals_mask_keys(model, inputs, pruned, masks)


def _stage0_reference(model, inputs, spec, name):
    """Pruned logits == the unmodified model fed only the kept tokens' rows (merged ones as the pruner made them)."""
    seen = {}

    def keep_embeds(module, args, kwargs):
        seen.setdefault("embeds", kwargs["inputs_embeds"])

    with attnkit.intervene(model, spec) as handle:
        hook = handle.adapter.language_model.register_forward_pre_hook(keep_embeds, with_kwargs=True)
        try:
            pruned = _logits(model, inputs)
        finally:
            hook.remove()
        stats = handle.stats()[name]
        plan = handle.state.keep_plan
    kept = stats["kept_positions"]
    rows = None
    if stats.get("merged_tokens"):
        assert all(m > 0 for m in stats["merged_tokens"])
        rows = [{int(t): seen["embeds"][b, i] for i, t in enumerate(plan.index[b].tolist()) if t in kept[b]}
                for b in range(len(kept))]
    ref, cols = testing.reference_on_kept_rows(model, inputs, kept, rows=rows)
    valid = torch.gather(inputs["attention_mask"], 1, cols).bool()
    got = torch.gather(pruned, 1, cols[..., None].expand(-1, -1, pruned.shape[-1]))
    torch.testing.assert_close(got[valid], ref.logits[valid], rtol=1e-4, atol=1e-5)
    unpruned = torch.gather(_logits(model, inputs), 1, cols[..., None].expand_as(got))
    assert not torch.allclose(got[valid], unpruned[valid])
    return stats


@pytest.mark.parametrize("family", ANYRES)
@pytest.mark.parametrize("spec", [*STAGE0, *INSIDE])
def test_every_pruner_equals_the_model_on_the_kept_tokens(tiny, one_thread, family, spec):
    model, processor = tiny(family)
    inputs = _big_inputs(processor, family)
    name = spec.split(":")[0]
    if spec in STAGE0:
        stats = _stage0_reference(model, inputs, spec, name)
        n_newline = 0
        if family == "llava_onevision":        # newlines are always kept, on top of the budget
            n_newline = int(sum(1 for r in testing.visual_rows_per_sample(model, inputs)[0]
                                if torch.equal(r, model.model.image_newline.to(r))))
            assert n_newline == 10
        budget = STAGE0[spec] if isinstance(STAGE0[spec], int) else STAGE0[spec][family]
        assert stats["visual_tokens_kept"] == [budget + n_newline] * 3
    else:
        _masking_reference(model, inputs, spec, name)


def test_onevision_several_images_per_sample_get_base_crops_only(tiny):
    model, processor = tiny("llava_onevision")
    inputs = testing.tiny_inputs(processor, batch=2, n_images=2, image_sizes=[(128, 96), (64, 32)], nested=True)
    assert inputs["batch_num_images"].tolist() == [2, 2]
    images = _capture(model, inputs, {"received"})
    assert [torch.bincount(im["group"] + 1).tolist() for im in images] == [[1, 16]] * 4
    with attnkit.intervene(model, "cls-prune:keep=5") as handle:
        pruned = _logits(model, inputs)
        stats = handle.stats()["cls-prune"]
        out = model.generate(**inputs, max_new_tokens=4, **GEN)
        assert torch.equal(out, testing.greedy_reference(model, inputs, 4, "llava_onevision"))
    assert stats["visual_tokens_kept"] == [2 * (5 + 1)] * 2
    ref, cols = testing.reference_on_kept_rows(model, inputs, stats["kept_positions"])
    got = torch.gather(pruned, 1, cols[..., None].expand(-1, -1, pruned.shape[-1]))
    valid = torch.gather(inputs["attention_mask"], 1, cols).bool()
    torch.testing.assert_close(got[valid], ref.logits[valid], rtol=1e-4, atol=1e-5)


# --- batches ------------------------------------------------------------------------------------------------------
SIZES = {"llava_onevision": [(128, 96), (64, 32), (32, 32)], "internvl": [(64, 64), (64, 32), (32, 32)]}


def _one(inputs, b, family):
    """Sample ``b`` of a padded batch, unpadded, with its own image inputs (InternVL: its tiles)."""
    keep = inputs["attention_mask"][b].bool()
    one = {k: inputs[k][b:b + 1, keep] for k in ("input_ids", "attention_mask")}
    if family == "internvl":
        config = testing.tiny_config("internvl")          # tiles from the prompt's image tokens
        n = [int(v) // config.image_seq_length for v in (inputs["input_ids"] == config.image_token_id).sum(1)]
        start = sum(n[:b])
        one["pixel_values"] = inputs["pixel_values"][start:start + n[b]]
    else:
        one.update({k: inputs[k][b:b + 1] for k in ("pixel_values", "image_sizes")})
    return one


@pytest.mark.parametrize("family", ANYRES)
@pytest.mark.parametrize("spec", [*STAGE0, *INSIDE, "sparsevlm"])
def test_padded_batch_equals_each_sample_alone(tiny, one_thread, family, spec):
    model, processor = tiny(family)
    inputs = testing.tiny_inputs(processor, batch=3, image_sizes=SIZES[family])
    assert (inputs["attention_mask"] == 0).any()
    positions = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with attnkit.intervene(model, spec):
        batched = _logits(model, inputs, position_ids=positions)
        for b in range(3):
            one = _one(inputs, b, family)
            alone = _logits(model, one, position_ids=torch.arange(one["input_ids"].shape[1])[None])[0]
            keep = inputs["attention_mask"][b].bool()
            torch.testing.assert_close(batched[b, keep], alone, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ANYRES)
def test_generate_and_beams_with_tiles_equal_the_references(tiny, one_thread, family):
    """generate() encodes the images before its prefill forward (InternVL's tiles are matched to images there): the
    cached generate equals the no-cache loop, and beams / num_return_sequences equal each sample alone."""
    model, processor = tiny(family)
    inputs = testing.tiny_inputs(processor, batch=2, image_sizes=SIZES[family][:2])
    gen = dict(GEN, max_new_tokens=3, num_beams=2, num_return_sequences=2)
    with attnkit.intervene(model, "cls-prune:keep=0.3"):
        out = model.generate(**inputs, max_new_tokens=4, **GEN)
        assert torch.equal(out, testing.greedy_reference(model, inputs, 4, family))
        batched = model.generate(**inputs, **gen)
        for b in range(2):
            one = _one(inputs, b, family)
            alone = model.generate(**one, **gen)
            new = batched[2 * b:2 * b + 2, inputs["input_ids"].shape[1]:]
            assert torch.equal(new, alone[:, one["input_ids"].shape[1]:])


def test_next_crop_groups_are_per_image(tiny):
    """LLaVA-NeXT's packing (shared with OneVision): every image's groups start at its own base crop (0), so the
    shared budget splits base / grid for the second image of a batch too."""
    model, processor = tiny("llava_next")
    inputs = testing.tiny_inputs(processor, batch=2, image_sizes=[(64, 64)])
    images = _capture(model, inputs, {"cls"})
    for im in images:
        assert sorted(im["group"].unique().tolist()) == [-1, 0, 1, 2, 3, 4]
