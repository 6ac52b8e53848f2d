"""bf16, bitsandbytes 4-/8-bit (the ``quant`` extra) and ``device_map="auto"`` models wrap, prune, generate and
remove like the others.

Widths: on CPUs with AVX512-BF16, bitsandbytes (0.50) repacks every 4-bit weight [N, K] at its first forward
(``functional._convert_weight_packed_for_cpu``: N % 32 == 0, absmax reshaped to [N, K // blocksize]) and its
fused kernel reads blocks of ``blocksize`` (64) along K; other CPUs dequantise (K even). The tiny models here
are 64 wide (vision 64 instead of the default 32, which gave ``shape '[96, 0]' is invalid``), so every
quantised linear has K % 64 == 0 and N % 32 == 0 and works on every kernel path.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import attnkit
from attnkit import testing

SIZE = testing.TinySize(vision_hidden=64)   # every linear's in/out width a multiple of 64 / 32 (see above)
BLOCK_N = 32                                 # bitsandbytes' CPU repacking block along the output dimension


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    paths = {}
    for family in ("llava", "qwen2_vl"):
        paths[family] = tmp_path_factory.mktemp(family)
        testing.tiny_model(family, size=SIZE).save_pretrained(paths[family])
        testing.tiny_processor(family, SIZE).save_pretrained(paths[family])
    return paths


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_4bit_weights_fit_every_cpu_kernel(saved, family):
    """Whatever this CPU is, every 4-bit weight satisfies the AVX512-BF16 path's repacking (run here on copies)."""
    bnb = pytest.importorskip("bitsandbytes")
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    model = _load(family, saved[family], "4bit")
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) > 20                                   # the vision tower and projector are quantised too
    for layer in layers:
        state = layer.weight.quant_state
        assert layer.in_features % state.blocksize == 0 and layer.out_features % BLOCK_N == 0, layer
        packed, packed_state = _convert_weight_packed_for_cpu(layer.weight.data.clone(), copy.deepcopy(state))
        assert packed.shape == (layer.out_features, layer.in_features // 2)
        assert packed_state.absmax.shape == (layer.in_features // state.blocksize, layer.out_features)


def _load(family, path, mode):
    import transformers

    cls = {"llava": transformers.LlavaForConditionalGeneration,
           "qwen2_vl": transformers.Qwen2VLForConditionalGeneration}[family]
    if mode == "bf16":
        model = cls.from_pretrained(path, dtype=torch.bfloat16)
    elif mode == "device_map":
        model = cls.from_pretrained(path, device_map="auto")
    else:
        pytest.importorskip("bitsandbytes")
        qc = transformers.BitsAndBytesConfig(load_in_4bit=True) if mode == "4bit" else \
            transformers.BitsAndBytesConfig(load_in_8bit=True)
        model = cls.from_pretrained(path, quantization_config=qc,
                                    dtype=torch.bfloat16 if mode == "4bit" else torch.float32)
    model.generation_config.eos_token_id = None
    return model.eval()


@pytest.mark.parametrize("mode", ["bf16", "4bit", "8bit", "device_map"])
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_quantized_wrap_generate_remove(saved, family, mode):
    model = _load(family, saved[family], mode)
    if mode in ("4bit", "8bit"):
        assert "bit" in type(model.model.language_model.layers[0].self_attn.q_proj).__name__
    inputs = testing.tiny_inputs(testing.tiny_processor(family, SIZE), batch=2)
    kw = dict(max_new_tokens=3, do_sample=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = model.generate(**inputs, **kw)
        handle = attnkit.wrap(model, "record:layers=1")
        out = model.generate(**inputs, **kw)
        stats = handle.stats()
        handle.remove()
        after = model.generate(**inputs, **kw)
        for spec in ("cls-prune:keep=4", "fastv:k=1,keep=0.25"):
            with attnkit.intervene(model, spec) as h:
                pruned = model.generate(**inputs, **kw)
                assert h.stats()[spec.split(":")[0]]["visual_tokens_kept"] == [4, 4]
            assert pruned.shape == ref.shape
    assert torch.equal(out, ref) and torch.equal(after, ref)
    assert stats["visual_tokens"] == [16, 16]
    share = torch.tensor(stats["record"]["visual_share"][1])
    assert share.shape == (2, 4) and bool(((share > 0) & (share <= 1.0001)).all())
    assert model.config.get_text_config()._attn_implementation == "sdpa"
