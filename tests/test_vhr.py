"""vhr: head divergence and selection on hand-made tensors, per-sample selection against an independent
layer-by-layer reference, precomputed scores (calibrate), every family end to end."""

from __future__ import annotations

import json
import types

import pytest
import torch

import attnkit
from attnkit import testing
from attnkit.api import RunState
from attnkit.hooks.attention import AttentionCall, LayerHook
from attnkit.interventions.vhr import VHR, default_layers, head_divergence, select_heads

SPECIAL = testing.SPECIAL_IDS  # random models must not emit image markers (the no-cache loop re-reads them)
GEN = dict(do_sample=False, suppress_tokens=SPECIAL)


def test_divergence_outliers_and_median_on_hand_made_tensors():
    text = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [3.0, 0.0]]])       # [B=1, H=4, D=2]
    image = text + torch.tensor([[[0.0, 1.0], [0.0, 2.0], [0.0, 3.0], [0.0, 10.0]]])
    # VHD = [1, 2, 3, 10]: head 3 > mean + std (4 + 3.54); its TA = 9 > 3 + 3.46 as well -> an outlier, VHD 0
    vhd = head_divergence(image, text)
    torch.testing.assert_close(vhd, torch.tensor([[1.0, 2.0, 3.0, 0.0]]))
    assert select_heads(vhd).tolist() == [[False, True, True, False]]               # median of [0,1,2,3] = 1.5
    # a large VHD with an ordinary text-only norm is not an outlier
    text2 = torch.ones(1, 4, 2)
    vhd2 = head_divergence(text2 + torch.tensor([[[0.0, 1.0], [0.0, 2.0], [0.0, 3.0], [0.0, 10.0]]]), text2)
    torch.testing.assert_close(vhd2, torch.tensor([[1.0, 2.0, 3.0, 10.0]]))
    assert select_heads(vhd2).tolist() == [[False, False, True, True]]


def test_default_layers_scale_the_paper_rule():
    assert default_layers(32) == [1, *range(18, 32)]
    assert default_layers(28) == [1, *range(16, 28)]
    assert default_layers(4) == [1, 2, 3]


def test_scaling_touches_only_the_chosen_heads():
    torch.manual_seed(0)
    out = torch.randn(2, 5, 4, 3)                                                     # [B, q, H, D]
    vhr = VHR(alpha=2.0)
    vhr._factor = {1: torch.tensor([[1.0, 2.0, 1.0, 2.0], [2.0, 1.0, 1.0, 1.0]])[:, None, :, None]}
    q = torch.zeros(2, 4, 5, 3)
    call = AttentionCall(types.SimpleNamespace(scaling=1.0), LayerHook(1, RunState(step=3), [vhr]), q, q, q, None,
                         lambda *a, **k: (out, None), {})
    vhr.on_attention(call)
    got, _ = call.finish()
    expected = out.clone()
    expected[0, :, 1] *= 2
    expected[0, :, 3] *= 2
    expected[1, :, 0] *= 2
    assert torch.equal(got, expected)


def _reference_heads(model, processor, b, layers, alpha):
    """Select-then-reinforce layer by layer with o_proj pre-hooks, batch 1, text-only prompt from the template."""
    image, question = testing.tiny_image(b * 10), testing._PROMPTS[b % len(testing._PROMPTS)]
    with_image = processor(images=[image], text=[testing.tiny_prompt(processor, question)], return_tensors="pt")
    text_only = processor(text=[testing.tiny_prompt(processor, question, n_images=0)], return_tensors="pt")
    cfg = model.config.get_text_config()
    H, D = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    chosen: dict[int, torch.Tensor] = {}
    vhds = {}
    for layer in layers:
        seen = []

        def hook(module, args, idx, layer=layer, seen=seen):
            x = args[0].view(*args[0].shape[:-1], H, D)
            if idx == layer:
                seen.append(x[:, -1].clone())
            if idx in chosen:
                x = x * torch.where(chosen[idx], alpha, 1.0)[:, None]
            return (x.flatten(-2),)

        hs = [model.model.language_model.layers[i].self_attn.o_proj.register_forward_pre_hook(
            lambda m, a, i=i: hook(m, a, i)) for i in layers]
        try:
            with torch.no_grad():
                model(**with_image)
                model(**text_only)
        finally:
            for h in hs:
                h.remove()
        vhds[layer] = head_divergence(seen[0], seen[1])[0]
        chosen[layer] = select_heads(vhds[layer])
    return chosen, vhds


@pytest.mark.parametrize("family", ["qwen2_vl"])  # Qwen: mrope positions and <|vision_start|>/<|vision_end|> removed
def test_per_sample_selection_equals_layer_by_layer_reference(tiny, family):
    model, processor = tiny(family)
    inputs = testing.tiny_inputs(processor, batch=2)
    vhr = VHR(alpha=2.0)
    with attnkit.intervene(model, vhr) as handle, torch.no_grad():
        model(**inputs)
        heads = handle.stats()["vhr"]["heads"]
    for b in range(2):
        chosen, vhds = _reference_heads(model, processor, b, [1, 2, 3], 2.0)
        for layer in (1, 2, 3):
            assert heads[layer][b] == chosen[layer].nonzero().flatten().tolist(), (b, layer)
            torch.testing.assert_close(vhr._vhd[layer][b], vhds[layer], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", testing.ALL_FAMILIES)
@pytest.mark.parametrize("batch", [1, 3])
def test_family_identity_effect_and_generate(tiny, family, batch):
    model, processor = tiny(family)
    inputs = testing.tiny_inputs(processor, batch=batch)
    valid = inputs["attention_mask"].bool()
    with torch.no_grad():
        ref = model(**inputs).logits
        with attnkit.intervene(model, "vhr:alpha=1"):
            same = model(**inputs).logits
        vhr = VHR()
        with attnkit.intervene(model, vhr):
            changed = model(**inputs).logits
            out = model.generate(**inputs, max_new_tokens=3, **GEN)
        # heads are chosen once, at the first generation step: a no-cache loop with those heads fixed
        with attnkit.intervene(model, testing.fixed_heads(dict(vhr._factor))):
            loop = testing.greedy_reference(model, inputs, 3, family)
    torch.testing.assert_close(same[valid], ref[valid], rtol=1e-5, atol=1e-5)
    assert (changed[valid] - ref[valid]).abs().max() > 1e-3
    assert torch.equal(out, loop)


def test_calibrate_writes_json_and_scores_reproduce_generate(tiny, tmp_path):
    model, processor = tiny("qwen2_5_vl")
    samples = []
    for i in range(2):
        path = tmp_path / f"img{i}.png"
        testing.tiny_image(i).save(path)
        samples.append(types.SimpleNamespace(image=path, question=testing._PROMPTS[i]))
    out_path = tmp_path / "heads.json"
    data = VHR.calibrate(model, processor, samples, out_path)
    assert getattr(model, "_attnkit_handle", None) is None
    assert json.loads(out_path.read_text()) == data
    assert data["samples"] == 2 and sorted(data["layers"]) == ["1", "2", "3"] and len(data["layers"]["1"]) == 4
    inputs = testing.tiny_inputs(processor, batch=2)
    with attnkit.intervene(model, f"vhr:scores={out_path}") as handle, torch.no_grad():
        heads = handle.stats()["vhr"]["heads"]
        out = model.generate(**inputs, max_new_tokens=3, **GEN)
        loop = testing.greedy_reference(model, inputs, 3, "qwen2_5_vl")
    scores = data["layers"]["2"]
    median = sorted(scores)[1] / 2 + sorted(scores)[2] / 2
    assert heads[2] == [[h for h in range(4) if scores[h] > median]]
    assert torch.equal(out, loop)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**data, "num_heads": 8}))
    with pytest.raises(ValueError, match="holds scores for 8 heads"):
        attnkit.wrap(model, VHR(scores=str(bad)))
    assert getattr(model, "_attnkit_handle", None) is None


def test_per_sample_selection_refuses_token_dropping(tiny, tmp_path):
    model, _ = tiny("llava")
    with pytest.raises(ValueError, match="cls-prune and vhr cannot be combined: per-sample vhr"):
        attnkit.wrap(model, "cls-prune:keep=6", "vhr")
    path = tmp_path / "heads.json"
    path.write_text(json.dumps({"method": "vhr", "num_heads": 4, "layers": {str(i): [0.1, 0.4, 0.3, 0.2]
                                                                             for i in range(4)}}))
    attnkit.wrap(model, "cls-prune:keep=6", f"vhr:scores={path}").remove()
