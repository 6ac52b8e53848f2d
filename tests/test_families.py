"""The four newer families (Qwen3-VL, LLaVA-OneVision, InternVL, Gemma 3): adapters, no-op and removal
bit-identical, every non-pruning method end to end (generate with cache == the no-cache reference), the
pruners refused at wrap() with the reason, Gemma 3's masks (bidirectional image blocks, sliding windows)
kept by the methods that edit them, and Qwen3.5 refused."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import attnkit
from attnkit import testing
from attnkit.hooks.attention import ATTR
from attnkit.interventions.base import Intervention
from attnkit.interventions.mma import MMA
from attnkit.interventions.sinks import sink_ratio
from attnkit.interventions.var import VAR
from attnkit.models import get_adapter

NEW = testing.NEW_FAMILIES
GEN = dict(do_sample=False, suppress_tokens=testing.SPECIAL_IDS)
CLASSES = {"qwen3_vl": "Qwen3VLForConditionalGeneration", "llava_onevision": "LlavaOnevisionForConditionalGeneration",
           "internvl": "InternVLForConditionalGeneration", "gemma3": "Gemma3ForConditionalGeneration"}
MARKER = {"gemma3": ("<start_of_turn>", "assistant")}   # the others use the Qwen-style template


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _assert_clean(model, impl="sdpa"):
    assert model.config.get_text_config()._attn_implementation == impl
    assert getattr(model, "_attnkit_handle", None) is None
    assert not any(hasattr(m, ATTR) for m in model.modules())
    assert not model._forward_hooks and not model._forward_pre_hooks


@pytest.mark.parametrize("family", NEW)
def test_adapter_parts(tiny, family):
    model, _ = tiny(family)
    adapter = get_adapter(model)
    assert type(model).__name__ == CLASSES[family] and adapter.family == family
    assert CLASSES[family] in attnkit.models.supported_classes()
    assert len(adapter.decoder_layers) == adapter.num_layers == 4
    assert adapter.decoder_layers[0] is model.model.language_model.layers[0]
    assert adapter.text_config.hidden_size == 64 and adapter.num_heads == 4 and adapter.num_kv_heads == 2
    assert adapter.image_token_id == model.config.image_token_id
    assert any(p is q for p in adapter.vision_tower.parameters() for q in model.parameters())
    assert any(p is q for p in adapter.projector.parameters() for q in model.parameters())
    assert adapter.supports_token_dropping   # pruning on each: tests/test_prune_<family>.py, test_registry.py


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("family", NEW)
@pytest.mark.parametrize("batch", [1, 3])
def test_wrap_noop_and_remove_are_bit_identical(tiny, family, impl, batch):
    model, processor = tiny(family, impl)
    inputs = testing.tiny_inputs(processor, batch=batch)
    if batch > 1:
        assert (inputs["attention_mask"] == 0).any(), "batch should be left-padded"
    ref = _logits(model, inputs)
    ref_gen = model.generate(**inputs, max_new_tokens=3, **GEN)
    handle = attnkit.wrap(model)
    assert model.config.get_text_config()._attn_implementation == f"attnkit_{impl}"
    assert torch.equal(_logits(model, inputs), ref)
    assert torch.equal(model.generate(**inputs, max_new_tokens=3, **GEN), ref_gen)
    handle.remove()
    _assert_clean(model, impl)
    assert torch.equal(_logits(model, inputs), ref)


@pytest.mark.parametrize("spec", ["cls-prune:keep=6", "fastv:k=2,keep=0.5", "vte:policy=layer,exit_layer=1"])
def test_an_adapter_without_token_dropping_refuses_pruners_with_the_reason(tiny, monkeypatch, spec):
    """The capability a future family's adapter sets while its vision capture is not written."""
    model, _ = tiny("qwen3_vl")
    monkeypatch.setattr(type(get_adapter(model)), "supports_token_dropping", False)
    with pytest.raises(ValueError, match="not yet supported on qwen3_vl"):
        attnkit.wrap(model, spec)
    _assert_clean(model)


def test_qwen3_5_is_refused(tiny):
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                head_dim=16, vocab_size=64, linear_num_key_heads=2, linear_num_value_heads=2,
                linear_key_head_dim=8, linear_value_head_dim=8, layer_types=["linear_attention", "full_attention"])
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=4, out_hidden_size=32,
                  num_position_embeddings=16)
    model = Qwen3_5ForConditionalGeneration._from_config(Qwen3_5Config(text_config=text, vision_config=vision))
    with pytest.raises(TypeError, match="Qwen3_5ForConditionalGeneration: Qwen3.5 is not supported yet.*linear"):
        attnkit.wrap(model, "pai")
    assert getattr(model, "_attnkit_handle", None) is None


# --- every non-pruning method, end to end ---------------------------------------------------------------
@pytest.mark.parametrize("family", NEW)
@pytest.mark.parametrize("batch", [1, 3])
def test_record_generate_equals_unwrapped(tiny, family, batch):
    model, processor = tiny(family)
    inputs = testing.tiny_inputs(processor, batch=batch)
    ref = model.generate(**inputs, max_new_tokens=4, **GEN)
    with attnkit.intervene(model, "record") as handle:
        out = model.generate(**inputs, max_new_tokens=4, **GEN)
        stats = handle.stats()
    assert torch.equal(out, ref)
    assert stats["record"]["layers"] == [0, 1, 2, 3] and stats["visual_tokens"] == inputs["input_ids"].eq(
        model.config.image_token_id).sum(1).tolist()


@pytest.mark.parametrize("family", NEW)
def test_record_matches_output_attentions(tiny, family):
    model, processor = tiny(family, "eager")
    inputs = testing.tiny_inputs(processor, batch=3)
    with torch.no_grad():
        ref = model(**inputs, output_attentions=True).attentions
    visual = inputs["input_ids"] == model.config.image_token_id
    am = inputs["attention_mask"].bool()
    with attnkit.intervene(model, "record") as handle, torch.no_grad():
        model(**inputs)
        rec = handle.interventions[0]
    for layer, probs in enumerate(ref):
        for b in range(3):
            first = int(visual[b].nonzero()[0])
            rows = [t for t in range(visual.shape[1]) if am[b, t] and not visual[b, t] and t > first]
            expected = probs[b][:, rows][:, :, visual[b]].sum(-1).mean(-1)
            torch.testing.assert_close(rec.visual_share[layer][b], expected, rtol=1e-5, atol=1e-6)


def _visual_sinks_setting(model, inputs, layer: int = 2) -> dict:
    """Random weights have no massive activations: the lowest ``tau`` (and the two dimensions where most visual
    tokens entering ``layer`` reach it) at which some, but at most a third, of the visual tokens are sinks."""
    seen = {}
    h = model.model.language_model.layers[layer].register_forward_pre_hook(
        lambda m, args, kwargs: seen.update(x=args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        h.remove()
    ratio = sink_ratio(seen["x"])[inputs["input_ids"] == model.config.image_token_id]      # [visual, D]
    for tau in [2 + 0.05 * i for i in range(40)]:
        dims = (ratio >= tau).sum(0).topk(2).indices
        sinks = int((ratio[:, dims] >= tau).any(1).sum())
        if 0 < sinks <= ratio.shape[0] / 3:
            return dict(sink_dims=tuple(sorted(dims.tolist())), tau=tau)
    raise AssertionError("no setting makes a few visual sinks")


@pytest.mark.parametrize("family", NEW)
@pytest.mark.parametrize("batch,impl", [(1, "sdpa"), (3, "sdpa"), (3, "eager")])
def test_var_identity_effect_and_generate(tiny, family, batch, impl):
    model, processor = tiny(family, impl)
    inputs = testing.tiny_inputs(processor, batch=batch)
    valid = inputs["attention_mask"].bool()
    tiny_var = dict(_visual_sinks_setting(model, inputs), min_visual_attention=0.05)
    with torch.no_grad():
        ref = model(**inputs).logits
        with attnkit.intervene(model, VAR(p=0.0, **tiny_var)):
            same = model(**inputs).logits
        with attnkit.intervene(model, VAR(**tiny_var)) as handle:
            changed = model(**inputs).logits
            stats = handle.stats()["var"]
            # text sinks off: generated tokens can never be sinks, so a no-cache loop sees the same sinks
            handle.interventions[0].text_sinks = False
            out = model.generate(**inputs, max_new_tokens=4, **GEN)
            loop = testing.greedy_reference(model, inputs, 4, family)
    torch.testing.assert_close(same[valid], ref[valid], rtol=1e-5, atol=1e-5)
    assert (changed[valid] - ref[valid]).abs().max() > 1e-4
    assert sum(stats["layers"][2]["visual_sinks"]) > 0 and stats["layers"][2]["image_centric_share"] > 0
    assert torch.equal(out, loop)


@pytest.mark.parametrize("family", NEW)
@pytest.mark.parametrize("batch", [1, 3])
def test_mma_effect_and_generate(tiny, family, batch):
    model, processor = tiny(family)
    inputs = testing.tiny_inputs(processor, batch=batch)
    valid = inputs["attention_mask"].bool()
    tok = processor.tokenizer
    marker = tuple(tok.convert_tokens_to_ids(t) for t in MARKER.get(family, ("<|im_start|>", "assistant")))
    with torch.no_grad():
        ref = model(**inputs).logits
        with attnkit.intervene(model, MMA(marker_ids=marker)) as handle:
            changed = model(**inputs).logits
            assert handle.stats()["mma"]["masks_changed"] > 0
            out = model.generate(**inputs, max_new_tokens=3, **GEN)
            loop = testing.greedy_reference(model, inputs, 3, family)
    assert (changed[valid] - ref[valid]).abs().max() > 1e-3
    assert torch.equal(out, loop)


# --- Gemma 3: bidirectional image blocks and sliding windows ---------------------------------------------
def _gemma_reference_masks(inputs, window: int, unlocked=None) -> dict[str, torch.Tensor]:
    """Gemma 3's prefill masks [B, L, L] (True = may attend) written from its definition: full layers
    ``causal OR same image``, sliding layers ``(causal OR same image) AND kv > q - window``; padding keys
    masked; ``unlocked`` [B, L, L] ORs in an intervention's extra entries (e.g. mma's image -> later text)."""
    types, valid = inputs["token_type_ids"], inputs["attention_mask"].bool()
    B, L = types.shape
    image = types == 1
    start = image & ~torch.nn.functional.pad(image, (1, 0))[:, :-1]
    block = torch.where(image, start.long().cumsum(1), 0)                          # 1, 2, ... per image, 0 = text
    q, kv = torch.arange(L)[:, None], torch.arange(L)[None, :]
    causal = (kv <= q)[None]
    same = (block[:, :, None] == block[:, None, :]) & (block[:, :, None] > 0)
    full = causal | same
    if unlocked is not None:
        full = full | unlocked
    keys = valid[:, None, :]
    return {"full_attention": full & keys, "sliding_attention": full & (kv > q - window)[None] & keys}


def _masks_per_layer(model, inputs, *interventions) -> list[torch.Tensor]:
    """The prefill mask each decoder layer's attention receives, as [B, L, L] bool."""
    masks = []

    def grab(module, args, kwargs):
        m = kwargs["attention_mask"]
        masks.append(m[:, 0] if m.dtype == torch.bool else m[:, 0] > torch.finfo(m.dtype).min / 2)

    hooks = [layer.self_attn.register_forward_pre_hook(grab, with_kwargs=True)
             for layer in model.model.language_model.layers]
    try:
        with attnkit.intervene(model, *interventions), torch.no_grad():
            model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    return masks


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_gemma3_mma_keeps_image_blocks_and_sliding_windows(tiny, impl):
    model, processor = tiny("gemma3", impl)
    inputs = testing.tiny_inputs(processor, batch=3, n_images=2)
    window = model.config.text_config.sliding_window
    assert inputs["input_ids"].shape[1] > window + 8, "the tiny prompt must be longer than the sliding window"
    types = model.config.text_config.layer_types
    valid = inputs["attention_mask"].bool()
    image = inputs["token_type_ids"] == 1
    L = image.shape[1]
    marker = tuple(processor.tokenizer.convert_tokens_to_ids(t) for t in MARKER["gemma3"])
    # mma's block, by hand: an image token may also see the valid text after its sample's first image, up to
    # and including the marker, that comes after it
    seen = image.long().cumsum(1) > 0
    txt = seen & ~image & valid
    ids = inputs["input_ids"]
    for b in range(3):
        hit = [t for t in range(L - 1) if (ids[b, t], ids[b, t + 1]) == marker and t > int(image[b].nonzero().max())]
        txt[b, hit[0] + 2:] = False
    q, kv = torch.arange(L)[:, None], torch.arange(L)[None, :]
    unlocked = image[:, :, None] & txt[:, None, :] & (kv > q)[None]
    for extra, interventions in ((None, ()), (unlocked, (MMA(marker_ids=marker),))):
        got = _masks_per_layer(model, inputs, *interventions)
        want = _gemma_reference_masks(inputs, window, extra)
        for layer, mask in enumerate(got):
            w = want[types[layer]]
            assert torch.equal(mask[valid], w[valid]), (layer, types[layer], interventions)
    sliding, full = want["sliding_attention"], want["full_attention"]
    assert (full & ~sliding).any()                                # the window bites
    assert (image[:, :, None] & image[:, None, :] & (kv > q)[None] & sliding).any()   # image blocks look ahead
    assert (unlocked & sliding).any()                             # and mma's entries survive the window


@dataclasses.dataclass
class Capture(Intervention):
    """Records what the model's own code hands the attention function of ``layer`` (reads, edits nothing)."""

    name = "test-capture"
    layer: int = 2

    def __post_init__(self):
        super().__post_init__()
        self.calls: list[dict] = []

    def attention_layers(self, ctx):
        return [self.layer]

    def on_attention(self, call):
        self.calls.append(dict(q=call.query, k=call.key, v=call.value, mask=call.mask, step=call.state.step,
                               scaling=call.scaling))


def _reference_output(module, c: dict, edit_probs=None, edit_scores=None) -> torch.Tensor:
    """softmax(q kᵀ · scaling + the model's own mask), with the edits, times v, through ``o_proj``."""
    rep = c["q"].shape[1] // c["k"].shape[1]
    k, v = c["k"].repeat_interleave(rep, 1), c["v"].repeat_interleave(rep, 1)
    scores = (c["q"] @ k.transpose(-1, -2) * c["scaling"]).float()
    mask = c["mask"]
    if mask is not None:
        mask = mask[..., :k.shape[2]]
        neg = torch.finfo(torch.float32).min
        scores = scores + (torch.where(mask, 0.0, neg) if mask.dtype == torch.bool else mask.float())
    if edit_scores is not None:
        scores = edit_scores(scores)
    probs = torch.softmax(scores, -1)
    if edit_probs is not None:
        probs = edit_probs(probs)
    out = (probs @ v.float()).transpose(1, 2).reshape(*c["q"].shape[:1], c["q"].shape[2], -1)
    return module.o_proj(out)


def _run_on_sliding_layer(model, inputs, method, new_tokens=3):
    """Generate with ``method`` and a capture on sliding layer 2: the calls and the layer's attention outputs."""
    layer = 2
    assert model.config.text_config.layer_types[layer] == "sliding_attention"
    attn = model.model.language_model.layers[layer].self_attn
    outputs = []
    h = attn.register_forward_hook(lambda m, a, out: outputs.append(out[0]))
    capture = Capture(layer=layer)
    try:
        with attnkit.intervene(model, capture, method) as handle, torch.no_grad():
            model.generate(**inputs, max_new_tokens=new_tokens, **GEN)
            state = handle.state
    finally:
        h.remove()
    return attn, capture.calls, outputs, state


def _key_columns(call: dict, prompt_len: int) -> torch.Tensor:
    """Absolute positions of a call's key columns: the last kv of prompt + step tokens."""
    total = prompt_len + call["step"] if call["step"] > 0 else call["k"].shape[2]
    return torch.arange(total - call["k"].shape[2], total)


def _over_keys(mask: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """A [B, P] prompt mask at key columns ``cols`` (False past the prompt)."""
    padded = torch.nn.functional.pad(mask, (0, int(cols.max()) + 1 - mask.shape[1]))
    return padded[:, cols]


def test_gemma3_pai_on_a_sliding_layer_equals_the_reference_from_the_model_masks(tiny):
    model, processor = tiny("gemma3", "eager")
    inputs = testing.tiny_inputs(processor, batch=1)
    alpha, L = 0.5, inputs["input_ids"].shape[1]
    attn, calls, outputs, _ = _run_on_sliding_layer(model, inputs, f"pai:alpha={alpha},cfg=false")
    image = inputs["input_ids"] == model.config.image_token_id
    window_with_image = 0
    for c, out in zip(calls, outputs):
        cols = _key_columns(c, L)
        img = _over_keys(image, cols)[:, None, None, :]
        window_with_image += int(c["step"] > 0 and c["k"].shape[2] < L and bool(img.any()))

        def amplify(scores, img=img):
            z = scores[:, :, -1:]
            scores = scores.clone()
            scores[:, :, -1:] = torch.where(img, z + alpha * z.abs(), z)
            return scores

        torch.testing.assert_close(out, _reference_output(attn, c, edit_scores=amplify), rtol=1e-5, atol=1e-6)
    assert window_with_image >= 1, "a decode step should see image keys through a truncated sliding cache"


def test_gemma3_var_on_a_sliding_layer_equals_the_reference_from_the_model_masks(tiny):
    model, processor = tiny("gemma3", "eager")
    inputs = testing.tiny_inputs(processor, batch=1)
    L = inputs["input_ids"].shape[1]
    p, rho, floor = 0.6, 0.5, 0.05
    var = VAR(p=p, rho=rho, min_visual_attention=floor, sink_dims=(0, 1, 2, 3, 4, 5, 6, 7), tau=1.5)
    attn, calls, outputs, state = _run_on_sliding_layer(model, inputs, var)
    sink, image = var._sinks[2], state.spans.visual
    assert bool((sink & image).any())
    text_after = state.spans.text_after_image()
    counted = []
    for c, out in zip(calls, outputs):
        cols = _key_columns(c, L)
        S, V = _over_keys(sink, cols)[:, None, None, :], _over_keys(image, cols)[:, None, None, :]
        rows = text_after[:, None, :, None] if c["step"] == 0 else torch.ones(1, 1, 1, 1, dtype=torch.bool)

        def redistribute(a, sink=S, vis=V, rows=rows):
            seen, rest, sunk = ((a * m).sum(-1, keepdim=True) for m in (vis, vis & ~sink, sink))
            chosen = rows & (seen >= floor) & (rest > 0) & (rest >= rho * seen)
            new = torch.where(sink, (1 - p) * a, torch.where(vis, a + p * sunk * a / rest.clamp_min(1e-30), a))
            counted.append(int(chosen.sum()))
            return torch.where(chosen, new, a)

        torch.testing.assert_close(out, _reference_output(attn, c, edit_probs=redistribute), rtol=1e-5, atol=1e-6)
    assert sum(counted) > 0


@pytest.mark.parametrize("family", NEW)
def test_two_branch_methods_generate_or_are_refused_with_the_reason(tiny, monkeypatch, family):
    """PAI with its CFG step and VCD (a noised re-encoding of the image; its logits: tests/test_vcd.py) run on
    every new family: cached generate equals the no-cache loop. An adapter that declares its image features
    cannot be re-encoded (``noised_images_unsupported``) gets vcd refused with that reason."""
    model, processor = tiny(family)
    inputs = testing.tiny_inputs(processor, batch=2)
    for spec in ["pai", "vcd"]:
        with attnkit.intervene(model, spec):
            out = model.generate(**inputs, max_new_tokens=3, **GEN)
            assert torch.equal(out, testing.greedy_reference(model, inputs, 3, family))
    monkeypatch.setattr(type(get_adapter(model)), "noised_images_unsupported", "its features are per tile")
    with pytest.raises(ValueError, match=f"vcd is not supported on {family} yet: its features are per tile"):
        attnkit.wrap(model, "vcd")
    assert attnkit.handle_of(model) is None


@pytest.mark.parametrize("family", ["qwen3_vl", "gemma3"])
def test_saved_folder_loads_with_an_image_processor(tmp_path, family):
    """``attnkit eval --model DIR`` on a saved folder: a processor that takes images (the stock Qwen3-VL one needs
    torchvision), with the same outputs as the offline one. (The tiny OneVision / InternVL processors do not
    save their processor-level settings, so their reloaded folders differ from the offline processor.)"""
    from attnkit.eval.loading import load_processor

    testing.save_tiny(family, tmp_path)
    loaded, offline = load_processor(tmp_path), testing.tiny_processor(family)
    prompt = testing.tiny_prompt(offline, "describe this image")
    image = testing.tiny_image(1)
    a = loaded(images=[image], text=[prompt], return_tensors="pt")
    b = offline(images=[image], text=[prompt], return_tensors="pt")
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key
