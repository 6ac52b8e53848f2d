"""Token pruning on Gemma 3: every pruner equals the unmodified model run on the kept tokens at their original
positions, with Gemma's own masks for that shorter sequence (same-image bidirectional blocks, sliding windows
that count the kept tokens, local and global rotary), in prefill and in cached decoding; the kept set equals
an independent top-k of the tower's eager attentions pooled as the projector pools."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

import attnkit
from attnkit import testing
from attnkit.hooks.install import Installed
from attnkit.interventions import REGISTRY
from attnkit.interventions.base import build

# every pruner, with a spec that drops tokens on the tiny Gemma 3 (16 soft tokens per image, 4 layers)
SPECS = {
    "cls-prune": "cls-prune:keep=5,score=received",
    "fastv": "fastv:k=2,keep=6",
    "vte": "vte:policy=layer,exit_layer=1",
    "visionzip": "visionzip:dominant=4,contextual=3",
    "dart": "dart:k=2,keep=8,pivots=2,text_pivots=2",
    "pyramiddrop": "pyramiddrop:ratio=0.5",
    "sparsevlm": "sparsevlm:keep=192",
}
GEN = dict(do_sample=False, suppress_tokens=testing.SPECIAL_IDS)


def test_specs_cover_every_pruner():
    assert set(SPECS) == {name for name, cls in REGISTRY.items() if getattr(cls, "drops_tokens", False)}


@functools.cache
def _model(impl: str = "sdpa"):
    """The tiny Gemma 3 with a random projector weight (the model's init zeroes it: every image row would be 0)."""
    model = testing.tiny_model("gemma3", attn_implementation=impl)
    weight = model.model.multi_modal_projector.mm_input_projection_weight
    with torch.no_grad():
        weight.copy_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture
def gemma(one_thread):
    model = _model()
    assert attnkit.handle_of(model) is None
    return model, testing.tiny_processor("gemma3")


def _logits(model, inputs, **kw):
    with torch.no_grad():
        return model(**inputs, **kw).logits


class _Spy:
    """Wraps a pruner's ``decide`` to keep each stage's replacement rows ``{position: row}`` per sample."""

    def __init__(self, pruner):
        self.rows: dict[int, list[dict[int, torch.Tensor]]] = {}
        inner = pruner.decide

        def decide(layer, hidden):
            decision = inner(layer, hidden)
            if decision is not None:
                self.rows[layer] = [{} if r is None else {int(t): v for t, v in zip(*r)}
                                    for r in (decision.rows or [None] * decision.keep.shape[0])]
            return decision

        pruner.decide = decide


def _stages(stats: dict, batch: int) -> list[tuple[int, list[list[int]]]]:
    if "stages" in stats:
        return [(s["from_layer"], s["kept_positions"]) for s in stats["stages"]]
    if "kept_positions" in stats:
        return [(stats["from_layer"], stats["kept_positions"])]
    return [(stats["removed_from_layer"], [[] for _ in range(batch)])]    # vte: every visual token leaves


def _pruned(model, inputs, name, **kw):
    """Pruned logits, the stages (layer, kept visual positions) and each stage's merged rows."""
    pruner = build(SPECS[name])
    spy = _Spy(pruner)
    with attnkit.intervene(model, pruner) as handle:
        logits = _logits(model, inputs, **kw)
        stats = handle.stats()[name]
    stages = _stages(stats, inputs["input_ids"].shape[0])
    rows = [spy.rows.get(layer, [{} for _ in stages[0][1]]) for layer, _ in stages]
    return logits, stages, rows


def _kept_rows(inputs, model, stages) -> torch.Tensor:
    """[B, L] True on the valid rows the last stage keeps."""
    keep = inputs["attention_mask"].bool().clone()
    visual = inputs["input_ids"] == model.config.image_token_id
    for b, kept in enumerate(stages[-1][1]):
        drop = visual[b].clone()
        drop[kept] = False
        keep[b] &= ~drop
    return keep


def test_the_reference_is_the_model_and_the_window_bites(gemma):
    """Unpruned, the layer-by-layer reference is the model; the tiny window is shorter than the prompt and than
    the image-plus-text span, so local layers see less than global ones."""
    model, processor = gemma
    inputs = testing.tiny_inputs(processor, batch=3)
    window = model.config.text_config.sliding_window
    assert window == testing.GEMMA3_SLIDING_WINDOW < inputs["attention_mask"].sum(1).min()
    assert "sliding_attention" in model.config.text_config.layer_types
    ref = testing.gemma3_reference_on_kept(model, inputs, [])
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(ref[valid], _logits(model, inputs)[valid], rtol=1e-4, atol=1e-5)
    wide = model.config.text_config.sliding_window
    try:
        model.config.text_config.sliding_window = 4096
        assert not torch.allclose(testing.gemma3_reference_on_kept(model, inputs, [])[valid], ref[valid])
    finally:
        model.config.text_config.sliding_window = wide


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", sorted(SPECS))
def test_every_pruner_equals_the_model_on_the_kept_tokens(gemma, name, side):
    model, processor = gemma
    inputs = testing.padded_inputs(processor, 3, side)
    pruned, stages, rows = _pruned(model, inputs, name)
    n_visual = (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist()
    assert all(len(k) < n for k, n in zip(stages[-1][1], n_visual)), "the spec must drop tokens"
    if name in ("visionzip", "sparsevlm"):
        assert any(r for stage in rows for r in stage), "merged rows expected"
    ref = testing.gemma3_reference_on_kept(model, inputs, stages, rows=rows)
    keep = _kept_rows(inputs, model, stages)
    torch.testing.assert_close(pruned[keep], ref[keep], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(pruned[keep], _logits(model, inputs)[keep], rtol=1e-3, atol=1e-3)


def test_the_window_counts_kept_tokens_not_original_positions(gemma):
    """The alternative reading (the window measured in original positions) gives other logits: the test above
    tells the two apart."""
    model, processor = gemma
    inputs = testing.tiny_inputs(processor, batch=1)
    pruned, stages, rows = _pruned(model, inputs, "cls-prune")
    keep = _kept_rows(inputs, model, stages)
    kept_cols = keep[0].nonzero().squeeze(1)
    window = model.config.text_config.sliding_window
    last = len(kept_cols) - 1
    # the last token's window over kept tokens reaches further back (in original positions) than `window`
    assert int(kept_cols[last] - kept_cols[last - window + 1]) >= window
    masked = testing.mask_keys(0, [[t for t in (inputs["input_ids"][0] == model.config.image_token_id)
                                    .nonzero().squeeze(1).tolist() if t not in stages[0][1][0]]])
    with attnkit.intervene(model, masked):     # drop = mask the keys: the window stays in original positions
        original_window = _logits(model, inputs)
    assert not torch.allclose(pruned[keep], original_window[keep], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("with_blocks", [True, False])
def test_kept_image_tokens_of_one_image_attend_bidirectionally(gemma, with_blocks):
    """A change to the LAST kept image token's row changes the FIRST kept image token's output (a later token of
    the same image), exactly as in the reference; without ``token_type_ids`` (plain causal) it does not."""
    model, processor = gemma
    inputs = dict(testing.tiny_inputs(processor, batch=1))
    if not with_blocks:
        inputs.pop("token_type_ids")
    _, stages, _ = _pruned(model, inputs, "cls-prune")
    kept = stages[0][1][0]
    first, last = kept[0], kept[-1]
    delta = torch.randn(model.config.text_config.hidden_size, generator=torch.Generator().manual_seed(1))

    def nudge(module, args, kwargs):
        embeds = kwargs["inputs_embeds"].clone()
        if embeds.shape[1] == inputs["input_ids"].shape[1]:
            embeds[0, last] += delta
        kwargs["inputs_embeds"] = embeds
        return args, kwargs

    lm = model.model.language_model
    base, _, _ = _pruned(model, inputs, "cls-prune")
    hook = lm.register_forward_pre_hook(nudge, with_kwargs=True)
    try:
        nudged, stages2, _ = _pruned(model, inputs, "cls-prune")
        with torch.no_grad():
            row = model.model.get_input_embeddings()(inputs["input_ids"])[0, last]
    finally:
        hook.remove()
    assert stages2 == stages
    feats = model.model.get_image_features(inputs["pixel_values"], return_dict=True).pooler_output[0]
    visual = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().squeeze(1).tolist()
    row = feats[visual.index(last)].detach() + delta
    ref = testing.gemma3_reference_on_kept(model, inputs, stages, rows=[[{last: row}]])
    torch.testing.assert_close(nudged[0, first], ref[0, first], rtol=1e-4, atol=1e-5)
    changed = not torch.allclose(nudged[0, first], base[0, first], rtol=1e-5, atol=1e-6)
    assert changed == with_blocks


def _eager_received(model, inputs) -> torch.Tensor:
    """[n_images, tokens]: mean attention each patch receives at the tower's last layer (eager output_attentions,
    head and query mean), averaged over each pooling unit like the projector's avg_pool."""
    eager = _model("eager")
    with torch.no_grad():
        attn = eager.model.vision_tower(inputs["pixel_values"], output_attentions=True).attentions[-1]
    received = attn.mean(1).mean(1)                                                      # [n, P]
    proj = model.model.multi_modal_projector
    side = proj.patches_per_image
    return F.avg_pool2d(received.view(-1, 1, side, side), proj.kernel_size).flatten(1)


@pytest.mark.parametrize("spec,k", [("cls-prune:keep=5,score=received", 5), ("visionzip:dominant=4,contextual=0", 4)])
def test_kept_set_is_top_k_of_the_towers_pooled_attention(gemma, spec, k):
    model, processor = gemma
    inputs = testing.tiny_inputs(processor, batch=3)
    name = spec.split(":")[0]
    with attnkit.intervene(model, spec) as handle:
        _logits(model, inputs)
        kept = handle.stats()[name]["kept_positions"]
    received = _eager_received(model, inputs)
    for b in range(3):
        visual = (inputs["input_ids"][b] == model.config.image_token_id).nonzero().squeeze(1)
        expected = visual[torch.topk(received[b], k).indices].sort().values.tolist()
        assert kept[b] == expected


def test_capture_keys_features_and_project_match_an_independent_computation(gemma):
    """keys = the last layer's k_proj of its normed input (head mean) pooled per unit; features = the tower's
    output pooled as the projector pools; project(features) = the projector's output."""
    model, processor = gemma
    inputs = testing.tiny_inputs(processor, batch=2)
    adapter = attnkit.models.get_adapter(model)
    got = []
    installed = Installed()
    adapter.install_vision_capture(installed, frozenset({"received", "keys", "features"}), got.append)
    try:
        with torch.no_grad():
            out = model.model.get_image_features(inputs["pixel_values"], return_dict=True)
    finally:
        installed.remove()
    tower = model.model.vision_tower
    with torch.no_grad():
        hidden = tower(inputs["pixel_values"], output_hidden_states=True).hidden_states
        layer = tower.encoder.layers[-1]
        keys = layer.self_attn.k_proj(layer.layer_norm1(hidden[-2]))
        heads = layer.self_attn.num_heads
        keys = keys.view(*keys.shape[:2], heads, -1).mean(2)
    proj = model.model.multi_modal_projector
    side = proj.patches_per_image

    def pool(x):
        return F.avg_pool2d(x.transpose(1, 2).reshape(x.shape[0], -1, side, side), proj.kernel_size).flatten(2) \
            .transpose(1, 2)

    images = got[0]
    assert len(images) == 2
    received = _eager_received(model, inputs)
    for i, image in enumerate(images):
        torch.testing.assert_close(image["keys"], pool(keys)[i], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(image["features"], pool(out.last_hidden_state)[i], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(adapter.project(image["features"]), out.pooler_output[i], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(image["received"], received[i], rtol=1e-4, atol=1e-6)
        assert image["group"].tolist() == [0] * model.config.mm_tokens_per_image


def _alone(inputs, b):
    keep = inputs["attention_mask"][b].bool()
    one = {k: inputs[k][b:b + 1, keep] for k in ("input_ids", "attention_mask", "token_type_ids")}
    one["pixel_values"] = inputs["pixel_values"][b:b + 1]
    return one


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", sorted(SPECS))
def test_padded_batch_equals_each_sample_alone(gemma, name, side):
    model, processor = gemma
    inputs = testing.padded_inputs(processor, 3, side)
    positions = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with attnkit.intervene(model, SPECS[name]):
        batched = _logits(model, inputs, position_ids=positions)
        for b in range(3):
            one = _alone(inputs, b)
            alone = _logits(model, one, position_ids=torch.arange(one["input_ids"].shape[1])[None])[0]
            keep = inputs["attention_mask"][b].bool()
            torch.testing.assert_close(batched[b, keep], alone, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("name", sorted(SPECS))
def test_generate_with_cache_equals_the_reference_on_kept_tokens(gemma, name, batch):
    """Cached decoding (local layers' caches hold only the last window of KEPT keys) equals the no-cache
    reference on the kept prompt plus the generated tokens, step by step."""
    model, processor = gemma
    inputs = testing.tiny_inputs(processor, batch=batch)
    steps = 6
    pruner = build(SPECS[name])
    spy = _Spy(pruner)
    with attnkit.intervene(model, pruner) as handle:
        out = model.generate(**inputs, max_new_tokens=steps, output_logits=True, return_dict_in_generate=True, **GEN)
        stats = handle.stats()[name]
    stages = _stages(stats, batch)
    rows = [spy.rows.get(layer, [{} for _ in range(batch)]) for layer, _ in stages]
    prompt = inputs["input_ids"].shape[1]
    seq = out.sequences[:, :-1]
    grown = dict(inputs, input_ids=seq,
                 attention_mask=torch.cat([inputs["attention_mask"], torch.ones_like(seq[:, prompt:])], 1),
                 token_type_ids=torch.cat([inputs["token_type_ids"], torch.zeros_like(seq[:, prompt:])], 1))
    kept_len = _kept_rows(inputs, model, stages).sum(1)
    assert int(kept_len.min()) + steps - 1 > model.config.text_config.sliding_window   # local caches truncate
    positions = (grown["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    ref = testing.gemma3_reference_on_kept(model, grown, stages, rows=rows, position_ids=positions)
    torch.testing.assert_close(torch.stack(out.logits, 1), ref[:, prompt - 1:], rtol=1e-4, atol=1e-4)


def test_pyramiddrop_ranks_by_the_next_layers_own_attention(gemma):
    """PyramidDrop's first stage (layer 1, a global layer after a local one) reads the last token's attention that
    layer 1 computes, with ITS rotary base: equal to eager ``output_attentions`` of the unmodified model."""
    model, processor = gemma
    inputs = testing.tiny_inputs(processor, batch=2)
    types = model.config.text_config.layer_types
    assert types[0] != types[1]
    pruner = build(SPECS["pyramiddrop"])
    seen: dict[int, list[torch.Tensor]] = {}
    inner = pruner.select

    def select(view):
        seen.setdefault(view.layer, []).append(view.last_attention())
        return inner(view)

    pruner.select = select
    with attnkit.intervene(model, pruner):
        _logits(model, inputs)
    eager = _model("eager")
    with torch.no_grad():
        attn = eager(**inputs, output_attentions=True).attentions[1]
    for b in range(2):
        visual = inputs["input_ids"][b] == model.config.image_token_id
        last = int(inputs["attention_mask"][b].nonzero().max())
        torch.testing.assert_close(seen[1][b], attn[b, :, last].mean(0)[visual], rtol=1e-4, atol=1e-6)


# --- vcd (its noised-image branch feeds Gemma 3's stacked per-image features) ----------------------------------
def test_vcd_logits_equal_a_hand_computation(gemma):
    """cd from two unmodified forwards: the clean inputs and the same inputs with noised pixel_values."""
    from attnkit.interventions.vcd import diffusion_noise

    model, processor = gemma
    inputs = testing.tiny_inputs(processor, batch=3)
    with torch.no_grad():
        clean = model(**inputs).logits[:, -1]
        noised = model(**dict(inputs, pixel_values=diffusion_noise(inputs["pixel_values"], 500, 0))).logits[:, -1]
        with attnkit.intervene(model, "vcd:alpha=1.0,beta=0.1"):
            got = model(**inputs).logits[:, -1]
    want = 2 * clean - noised
    want = want.masked_fill(clean < torch.log(torch.tensor(0.1)) + clean.max(-1, keepdim=True).values, float("-inf"))
    assert torch.equal(torch.isinf(got), torch.isinf(want)) and not torch.allclose(noised, clean)
    torch.testing.assert_close(got[torch.isfinite(want)], want[torch.isfinite(want)], rtol=1e-5, atol=1e-5)


def test_vcd_generate_with_cache_equals_a_no_cache_loop(gemma):
    model, processor = gemma
    inputs = testing.tiny_inputs(processor, batch=3)
    with attnkit.intervene(model, "vcd:beta=0.001"):
        out = model.generate(**inputs, max_new_tokens=4, **GEN)
        loop = testing.greedy_reference(model, inputs, 4, "gemma3")
    assert torch.equal(out, loop)
    assert not torch.equal(out, model.generate(**inputs, max_new_tokens=4, **GEN))


@pytest.mark.parametrize("name", ["cls-prune", "fastv", "visionzip"])
def test_two_images_per_sample_keep_one_block_each(gemma, name):
    """Two images in a sample: each image's kept tokens form their own bidirectional block (the reference's
    block ids come from the kept tokens' ``token_type_ids``), in prefill, at layer 0 and at layer K."""
    model, processor = gemma
    inputs = testing.tiny_inputs(processor, batch=2, n_images=2)
    assert int((inputs["input_ids"][0] == model.config.image_token_id).sum()) == 2 * model.config.mm_tokens_per_image
    pruned, stages, rows = _pruned(model, inputs, name)
    ref = testing.gemma3_reference_on_kept(model, inputs, stages, rows=rows)
    keep = _kept_rows(inputs, model, stages)
    torch.testing.assert_close(pruned[keep], ref[keep], rtol=1e-4, atol=1e-5)


def test_other_sliding_window_models_are_still_refused():
    """Only an adapter that rebuilds sliding-window masks (Gemma 3) lifts the dropper's refusal."""
    import transformers

    cfg = testing.tiny_config("qwen2_vl")
    text = cfg.text_config
    text.use_sliding_window, text.sliding_window, text.max_window_layers = True, 8, 0
    text.layer_types = ["sliding_attention", "full_attention"] * 2
    model = transformers.Qwen2VLForConditionalGeneration._from_config(cfg).eval()
    assert model.model.language_model.has_sliding_layers
    with pytest.raises(ValueError, match="not supported for sliding-window layers"):
        attnkit.wrap(model, "cls-prune:keep=5")
    assert attnkit.handle_of(model) is None


@pytest.mark.parametrize("name", ["cls-prune", "fastv", "visionzip", "pyramiddrop"])
def test_beams_and_return_sequences_equal_each_sample_alone(gemma, name):
    model, processor = gemma
    inputs = testing.tiny_inputs(processor, batch=2)
    gen = dict(GEN, max_new_tokens=3, num_beams=2, num_return_sequences=2)
    with attnkit.intervene(model, SPECS[name]):
        batched = model.generate(**inputs, **gen)
        for b in range(2):
            one = _alone(inputs, b)
            alone = model.generate(**one, **gen)
            assert torch.equal(batched[2 * b:2 * b + 2, inputs["input_ids"].shape[1]:],
                               alone[:, one["input_ids"].shape[1]:])
