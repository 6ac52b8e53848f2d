"""mma: the prefill mask against hand-built matrices, decode stays causal, flash refused, every family end to end."""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch
from transformers.masking_utils import causal_mask_function, or_masks, sdpa_mask

import attnkit
from attnkit import testing
from attnkit.hooks.install import Installed
from attnkit.interventions.base import Intervention
from attnkit.interventions.mma import MMA, mma_blocks, mma_mask_function

SPECIAL = testing.SPECIAL_IDS  # random models must not emit image markers (the no-cache loop re-reads them)
GEN = dict(do_sample=False, suppress_tokens=SPECIAL)


def test_blocks_and_mask_equal_a_hand_built_matrix():
    # sample 0: pad, T, I, I, T, T ; sample 1: T, I, I, T, M1, M2, (after the marker) T -> with marker M1 M2
    visual = torch.tensor([[0, 0, 1, 1, 0, 0, 0], [0, 1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    valid = torch.tensor([[0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    ids = torch.tensor([[0, 5, 9, 9, 6, 7, 8], [5, 9, 9, 6, 70, 71, 8]])
    img, txt = mma_blocks(visual, valid, ids)
    assert txt.tolist() == [[False, False, False, False, True, True, True],
                            [False, False, False, True, True, True, True]]
    _, txt_m = mma_blocks(visual, valid, ids, marker_ids=(70, 71))
    assert txt_m[1].tolist() == [False, False, False, True, True, True, False]
    assert not txt_m[0].any()                                           # no marker: plain causal (AKI)
    fn = or_masks(causal_mask_function, mma_mask_function(img, txt))
    mask = sdpa_mask(batch_size=2, q_length=7, kv_length=7, mask_function=fn, attention_mask=valid.long(),
                     allow_is_causal_skip=False)
    hand = torch.zeros(2, 7, 7, dtype=torch.bool)
    for b in range(2):
        for q in range(7):
            for kv in range(7):
                hand[b, q, kv] = bool(valid[b, kv]) and (kv <= q or (visual[b, q] and txt[b, kv]))
    # sample 0: the image rows 2, 3 now see 4, 5, 6; sample 1: rows 1, 2 see 3 ... 6; all else causal
    assert hand[0, 2].tolist() == [False, True, True, False, True, True, True]
    assert hand[1, 0].tolist() == [True] + [False] * 6
    assert torch.equal(mask[:, 0], hand)


@dataclasses.dataclass
class RecordMask(Intervention):
    """Test helper: keep the mask that layer 0's attention receives."""

    name = "test-record-mask"

    def __post_init__(self):
        super().__post_init__()
        self.masks = []

    def attention_layers(self, ctx):
        return [0]

    def on_attention(self, call):
        self.masks.append(call.mask)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_model_prefill_mask_and_causal_decode(tiny, family):
    model, processor = tiny(family)
    inputs = testing.tiny_inputs(processor, batch=2)
    ids, valid = inputs["input_ids"], inputs["attention_mask"].bool()
    visual = ids == model.config.image_token_id
    B, L = ids.shape
    rec = RecordMask()
    with attnkit.intervene(model, rec, "mma") as handle:
        model.generate(**inputs, max_new_tokens=2, **GEN)
        stats = handle.stats()["mma"]
    after = torch.cumsum(visual.long(), 1) > 0
    hand = torch.zeros(B, L, L, dtype=torch.bool)
    for b in range(B):
        for q in range(L):
            for kv in range(L):
                unlocked = visual[b, q] and after[b, kv] and not visual[b, kv] and kv > q
                hand[b, q, kv] = bool(valid[b, kv]) and (kv <= q or unlocked)
    prefill = rec.masks[0][:, 0]
    assert torch.equal(prefill[valid], hand[valid])                     # valid query rows
    assert stats["masks_changed"] == 1 and stats["text_keys_unlocked"] == (after & ~visual & valid).sum(1).tolist()
    for m in rec.masks[1:]:                                             # decode: one row, padding only
        assert m is None or (m.shape[-2] == 1 and torch.equal(m[:, 0, 0, :L], valid))


def test_flash_attention_is_refused():
    # a flash model cannot be built on this CPU: call attach() as wrap() does, after the switch to attnkit's name
    cfg = types.SimpleNamespace(_attn_implementation="attnkit_flash_attention_2")
    ctx = types.SimpleNamespace(adapter=types.SimpleNamespace(text_config=cfg), installed=Installed())
    with pytest.raises(ValueError, match="mma needs a mask function, which flash attention ignores"):
        MMA().attach(ctx)


def _image_last_inputs(processor, family):
    """Two left-padded prompts that end with the image: no text after it, so mma has nothing to unlock."""
    end = "<image>" if family.startswith("llava") else "<|vision_start|> <|image_pad|>"
    start = "USER:" if family.startswith("llava") else "<|im_start|> user"
    texts = [f"{start} {end}", f"{start} describe this image {end}"]
    return processor(images=[testing.tiny_image(0), testing.tiny_image(1)], text=texts, return_tensors="pt",
                     padding=True)


@pytest.mark.parametrize("family", testing.FAMILIES)
def test_family_identity_effect_and_generate(tiny, family):
    model, processor = tiny(family)
    inputs = testing.tiny_inputs(processor, batch=2)
    valid = inputs["attention_mask"].bool()
    last = _image_last_inputs(processor, family)
    tok = processor.tokenizer
    # the generation prompt ends each prompt; in a no-cache loop the marker keeps generated tokens out of the block
    marker = ("ASSISTANT:",) if family.startswith("llava") else ("<|im_start|>", "assistant")
    marker_ids = tuple(tok.convert_tokens_to_ids(t) for t in marker)
    with torch.no_grad():
        ref = model(**inputs).logits
        ref_last = model(**last).logits
        with attnkit.intervene(model, "mma"):
            changed = model(**inputs).logits
            same = model(**last).logits
        with attnkit.intervene(model, MMA(marker_ids=marker_ids)):
            marked = model(**inputs).logits
            out = model.generate(**inputs, max_new_tokens=2, **GEN)
            loop = testing.greedy_reference(model, inputs, 2, family)
    v_last = last["attention_mask"].bool()
    torch.testing.assert_close(same[v_last], ref_last[v_last], rtol=1e-5, atol=1e-5)
    assert (changed[valid] - ref[valid]).abs().max() > 1e-3
    torch.testing.assert_close(marked, changed, rtol=1e-5, atol=1e-5)    # the marker ends the prompt anyway
    assert torch.equal(out, loop)


def test_eager_and_sdpa_bases_agree(tiny):
    inputs = testing.tiny_inputs(tiny("llava")[1], batch=2)
    valid = inputs["attention_mask"].bool()
    logits = []
    for impl in ("sdpa", "eager"):
        model, _ = tiny("llava", impl)
        with attnkit.intervene(model, "mma"), torch.no_grad():
            logits.append(model(**inputs).logits[valid])
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-5)
