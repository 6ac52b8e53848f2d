"""wrap / intervene / remove: a wrapped model with no intervention is bit-identical, and remove() restores it."""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit import testing
from attnkit.hooks.attention import ATTR

FAMILIES = testing.FAMILIES


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _assert_clean(model, impl):
    assert model.config.get_text_config()._attn_implementation == impl
    assert getattr(model, "_attnkit_handle", None) is None
    assert not any(hasattr(m, ATTR) for m in model.modules())
    assert not model._forward_hooks and not model._forward_pre_hooks


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("batch", [1, 3])
def test_wrap_noop_is_bit_identical(tiny, family, impl, batch):
    model, processor = tiny(family, impl)
    inputs = testing.tiny_inputs(processor, batch=batch)
    if batch > 1:
        assert (inputs["attention_mask"] == 0).any(), "batch should be left-padded"
    ref = _logits(model, inputs)
    handle = attnkit.wrap(model)
    assert model.config.get_text_config()._attn_implementation == f"attnkit_{impl}"
    assert torch.equal(_logits(model, inputs), ref)
    handle.remove()
    _assert_clean(model, impl)
    assert torch.equal(_logits(model, inputs), ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_intervene_restores_after_exception(tiny, family):
    model, processor = tiny(family)
    inputs = testing.tiny_inputs(processor, batch=2)
    ref = _logits(model, inputs)

    def boom(module, args, output):
        raise RuntimeError("boom")

    layer = model.model.language_model.layers[1]
    with pytest.raises(RuntimeError, match="boom"):
        with attnkit.intervene(model, "record"):
            h = layer.register_forward_hook(boom)
            try:
                model(**inputs)
            finally:
                h.remove()
    _assert_clean(model, "sdpa")
    assert torch.equal(_logits(model, inputs), ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_wrapped_equals_unwrapped(tiny, family):
    model, processor = tiny(family)
    inputs = testing.tiny_inputs(processor, batch=3)
    kw = dict(max_new_tokens=5, do_sample=False)
    ref = model.generate(**inputs, **kw)
    with attnkit.intervene(model, "record") as handle:
        out = model.generate(**inputs, **kw)
        stats = handle.stats()
    assert torch.equal(out, ref)
    assert stats["decode_steps"] == 4 and stats["forward_calls"] == 5
    assert stats["prefill_ms"] > 0
    assert stats["record"]["layers"] == list(range(4))


def test_stats_reset_per_generate(tiny):
    model, processor = tiny("llava")
    with attnkit.intervene(model) as handle:
        model.generate(**testing.tiny_inputs(processor, batch=2), max_new_tokens=3, do_sample=False)
        assert handle.stats()["visual_tokens"] == [16, 16]
        model.generate(**testing.tiny_inputs(processor, batch=1, n_images=2), max_new_tokens=2, do_sample=False)
        st = handle.stats()
    assert st["visual_tokens"] == [32] and st["decode_steps"] == 1


def test_unsupported_model_raises_type_error():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=64, vocab_size=64))
    with pytest.raises(TypeError, match="LlamaForCausalLM") as e:
        attnkit.wrap(model)
    assert "LlavaForConditionalGeneration" in str(e.value) and "Qwen2VLForConditionalGeneration" in str(e.value)


def test_double_wrap_is_an_error(tiny):
    model, _ = tiny("llava")
    with attnkit.intervene(model):
        with pytest.raises(RuntimeError, match="already wrapped"):
            attnkit.wrap(model)
    attnkit.wrap(model).remove()  # fine again after removal


@pytest.mark.parametrize("spec, exc, words", [
    ("nosuch", ValueError, ["'nosuch'", "record"]),
    ("record:foo=1", ValueError, ["'foo'", "layers"]),
    ("record:layers=-1", ValueError, ["layers=-1", "[0, inf]"]),
    ("record:layers=a", ValueError, ["layers='a'"]),
    ("record:layers", ValueError, ["'layers'"]),
    ("record:layers=9", ValueError, ["layer 9", "0..3"]),
])
def test_bad_specs_name_the_bad_value(tiny, spec, exc, words):
    model, _ = tiny("llava")
    with pytest.raises(exc) as e:
        attnkit.wrap(model, spec)
    for w in words:
        assert w in str(e.value)
    _assert_clean(model, "sdpa")


def test_same_intervention_twice_is_an_error(tiny):
    model, _ = tiny("llava")
    with pytest.raises(ValueError, match="'record' given 2 times"):
        attnkit.wrap(model, "record", attnkit.Record())


def test_wrong_type_in_python_is_an_error():
    with pytest.raises(TypeError, match="layers=3"):
        attnkit.Record(layers=3)
    with pytest.raises(ValueError, match="layers=-2"):
        attnkit.Record(layers=(1, -2))


def test_registry_lists_parameters_and_round_trips():
    info = attnkit.available()
    assert "record" in info
    assert info["record"]["params"]["layers"]["default"] is None
    iv = attnkit.build("record:layers=0+3")
    assert iv == attnkit.Record(layers=(0, 3))
    assert attnkit.build(iv.spec()) == iv
    assert attnkit.Record().spec() == "record"


@pytest.mark.parametrize("spec", [None, "record", "pai", "cls-prune:keep=4", "vcd"])
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_deepcopy_of_a_wrapped_model_is_an_unwrapped_copy(tiny, family, spec):
    import copy

    model, processor = tiny(family)
    inputs = testing.tiny_inputs(processor, batch=2)
    ref = _logits(model, inputs)
    handle = attnkit.wrap(model, *([spec] if spec else []))
    try:
        wrapped = _logits(model, inputs)
        clone = copy.deepcopy(model)
        assert attnkit.handle_of(clone) is None
        _assert_clean(clone, "sdpa")
        assert torch.equal(_logits(clone, inputs), ref)                # the copy is the model before wrap()
        assert attnkit.handle_of(model) is handle
        assert torch.equal(_logits(model, inputs), wrapped)            # the original stays wrapped and working
    finally:
        handle.remove()
    _assert_clean(model, "sdpa")
    assert torch.equal(_logits(model, inputs), ref)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_static_cache_is_refused_with_interventions(tiny, family):
    model, processor = tiny(family)
    inputs = testing.tiny_inputs(processor, batch=2)
    kw = dict(max_new_tokens=3, do_sample=False, cache_implementation="static")
    ref = model.generate(**inputs, **kw)
    with attnkit.intervene(model, "pai:cfg=false"):
        with pytest.raises(ValueError, match=r"past_key_values is a StaticCache .*use DynamicCache"):
            model.generate(**inputs, **kw)
    with attnkit.intervene(model):                                     # no intervention: static caches work
        assert torch.equal(model.generate(**inputs, **kw), ref)
    model.generation_config.cache_implementation = "static"
    try:
        with pytest.raises(ValueError, match=r"cache_implementation='static' .* set it to None or 'dynamic'"):
            attnkit.wrap(model, "record")
        attnkit.wrap(model).remove()
    finally:
        model.generation_config.cache_implementation = None
    _assert_clean(model, "sdpa")


def test_available_shows_ranges_only_where_there_are_bounds_and_whole_first_paragraphs():
    info = attnkit.available()
    assert info["pai"]["params"]["cfg"]["allowed"] == "any"
    assert info["vte"]["params"]["calibration"]["allowed"] == "any"
    assert info["cls-prune"]["params"]["score"]["allowed"].startswith("one of")
    assert info["cls-prune"]["doc"].endswith('Visual Token Pruning", arXiv 2412.01818).')


def test_find_sink_dims_takes_one_processor_output(tiny):
    model, processor = tiny("llava")
    inputs = testing.tiny_inputs(processor)
    assert attnkit.find_sink_dims(model, inputs, tau=1.0) == attnkit.find_sink_dims(model, [inputs], tau=1.0)
