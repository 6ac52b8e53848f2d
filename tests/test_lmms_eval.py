"""The lmms-eval adapter's request handling, with fake requests shaped like lmms-eval 0.7.3's (no lmms-eval here).

Chat requests carry ``(ctx, doc_to_messages, gen_kwargs, doc_id, task, split)``; the ``lmms`` base class,
``GenerationResult``/``TokenCounts`` and ``ModelManifest`` are stood in by small fakes in ``sys.modules``.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import sys
import types
from pathlib import Path

import pytest

from attnkit import handle_of, testing
from attnkit.integrations import lmms_eval as adapter
from attnkit.models.prompts import build_inputs

TASK, SPLIT = "pope_fake", "test"
QUESTIONS = ["is there a cat in the image ?", "what color is the large circle ?", "how many dogs", "describe this"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("lmms") / "llava"
    testing.save_tiny("llava", path)
    return path


def _docs():
    return [{"image": testing.tiny_image(i), "question": q} for i, q in enumerate(QUESTIONS)]


def doc_to_messages(doc):
    return [{"role": "user", "content": [{"type": "image", "url": doc["image"]},
                                         {"type": "text", "text": doc["question"]}]}]


@dataclasses.dataclass
class FakeInstance:
    args: tuple


def _requests(gen_kwargs, ids):
    return [FakeInstance((f"ctx {i}", doc_to_messages, dict(gen_kwargs), i, TASK, SPLIT)) for i in ids]


def _generator(model_dir, tmp_path, interventions=""):
    return adapter.AttnkitGenerator(str(model_dir), interventions=interventions, output_dir=str(tmp_path))


def _reference(gen, doc, max_new_tokens):
    """The answer of the unwrapped path: the runner's prompt building + greedy generate."""
    import torch

    inputs = build_inputs(gen.processor, doc["question"], doc["image"])
    with torch.inference_mode():
        out = gen.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return gen.processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def test_generate_until_answers_in_request_order_and_persists(model_dir, tmp_path):
    docs = _docs()
    gen = _generator(model_dir, tmp_path)
    try:
        order = [2, 0, 3, 1]
        results = gen.generate_until([r.args for r in _requests({"max_new_tokens": 4}, order)], {TASK: {SPLIT: docs}})
        assert [t for t, _ in results] == [_reference(gen, docs[i], 4) for i in order]
        assert all(1 <= n <= 4 for _, n in results)
        rows = [json.loads(x) for x in gen.store_path(TASK).read_text().splitlines()]
        assert [r["doc_id"] for r in rows] == order and [r["text"] for r in rows] == [t for t, _ in results]
    finally:
        gen.close()
    assert handle_of(gen.model) is None

    # a new process (fresh generator) serves stored answers without generating
    again = _generator(model_dir, tmp_path)
    try:
        again.model.generate = _raise
        cached = again.generate_until([r.args for r in _requests({"max_new_tokens": 4}, order)], {TASK: {SPLIT: docs}})
        assert cached == results
        # other gen kwargs: not the same answer, so no cache hit (generate is called and fails -> "")
        other = again.generate_until([r.args for r in _requests({"max_new_tokens": 5}, [0])], {TASK: {SPLIT: docs}})
        assert other == [("", None)]
    finally:
        del again.model.generate
        again.close()


def _raise(*a, **k):
    raise RuntimeError("generate must not be called")


@pytest.mark.parametrize("batch_size", [2, 3])
def test_batched_requests_answer_as_batch_1_in_request_order(model_dir, tmp_path, batch_size, monkeypatch):
    docs = _docs()
    gen = adapter.AttnkitGenerator(str(model_dir), output_dir=str(tmp_path), batch_size=batch_size)
    calls = []
    real = gen.model.generate

    def counted(**kw):
        calls.append(kw["input_ids"].shape[0])
        return real(**kw)

    try:
        monkeypatch.setattr(gen.model, "generate", counted)
        order = [3, 0, 2, 1]
        results = gen.generate_until([r.args for r in _requests({"max_new_tokens": 4}, order)], {TASK: {SPLIT: docs}})
        assert sorted(calls, reverse=True) == ([2, 2] if batch_size == 2 else [3, 1])
        monkeypatch.setattr(gen.model, "generate", real)
        alone = [_reference(gen, docs[i], 4) for i in order]
        assert [t for t, _ in results] == alone
        # the questions' prompts differ in length: the batches were padded
        lengths = {len(build_inputs(gen.processor, d["question"], d["image"])["input_ids"][0]) for d in docs}
        assert len(lengths) > 1
        rows = [json.loads(x) for x in gen.store_path(TASK).read_text().splitlines()]
        assert sorted(r["doc_id"] for r in rows) == [0, 1, 2, 3]
        assert all(1 <= n <= 4 for _, n in results)
    finally:
        gen.close()


def test_a_batch_with_a_failing_generate_is_redone_request_by_request(model_dir, tmp_path, monkeypatch):
    docs = _docs()
    gen = adapter.AttnkitGenerator(str(model_dir), output_dir=str(tmp_path), batch_size=4)
    real = gen.generate_prompts

    def fails_on_the_cat(prompts, images, gen_kwargs):
        if any("cat" in p for p in prompts):
            raise RuntimeError("boom")
        return real(prompts, images, gen_kwargs)

    try:
        monkeypatch.setattr(gen, "generate_prompts", fails_on_the_cat)
        out = gen.generate_until([r.args for r in _requests({"max_new_tokens": 3}, [0, 1, 2, 3])],
                                 {TASK: {SPLIT: docs}})
        assert [t == "" for t, _ in out] == [True, False, False, False]
        assert [t for t, _ in out[1:]] == [_reference(gen, docs[i], 3) for i in (1, 2, 3)]
        assert len(gen.failures) == 1 and "doc 0 failed: RuntimeError: boom" in gen.failures[0]
    finally:
        gen.close()


def test_until_truncates_and_a_failing_doc_answers_empty_without_being_stored(model_dir, tmp_path):
    docs = _docs()
    gen = _generator(model_dir, tmp_path)
    try:
        full = _reference(gen, docs[1], 6)
        stop = full.split()[2]
        docs[3] = {"image": None, "question": "broken"}                     # doc_to_messages will fail on it
        requests = [FakeInstance(("c", doc_to_messages, {"max_new_tokens": 6, "until": [stop]}, 1, TASK, SPLIT)),
                    FakeInstance(("c", doc_to_messages, {"max_new_tokens": 6}, 3, TASK, SPLIT))]
        (text, _), broken = gen.generate_until([r.args for r in requests], {TASK: {SPLIT: docs}})
        assert text == full.split(stop)[0].strip() and len(text) < len(full)
        assert broken == ("", None)
        rows = [json.loads(x) for x in gen.store_path(TASK).read_text().splitlines()]
        assert [r["doc_id"] for r in rows] == [1]
    finally:
        gen.close()


def test_simple_mode_requests_put_the_images_before_the_text(model_dir, tmp_path):
    docs = _docs()
    gen = _generator(model_dir, tmp_path)
    try:
        args = [(docs[0]["question"], {"max_new_tokens": 3}, lambda d: [d["image"]], 0, TASK, SPLIT)]
        ((text, _),) = gen.generate_until(args, {TASK: {SPLIT: docs}})
        assert text == _reference(gen, docs[0], 3)
    finally:
        gen.close()


def test_interventions_are_installed_and_key_the_store(model_dir, tmp_path):
    base = _generator(model_dir, tmp_path)
    base_path = base.store_path(TASK)
    base.close()
    gen = _generator(model_dir, tmp_path, interventions="'record:layers=0'")
    try:
        assert gen.specs == ["record:layers=0"]
        handle = handle_of(gen.model)
        assert [iv.spec() for iv in handle.interventions] == ["record:layers=0"]
        assert gen.store_path(TASK) != base_path
        gen.generate_until([r.args for r in _requests({"max_new_tokens": 2}, [0])], {TASK: {SPLIT: _docs()}})
        assert handle.interventions[0].stats()["layers"] == [0]          # it saw the prefill
    finally:
        gen.close()
    assert adapter.parse_interventions("baseline") == [] and adapter.parse_interventions("") == []
    with pytest.raises(ValueError, match="unknown intervention 'nope'"):
        adapter.parse_interventions("record;nope:keep=64")


def test_model_args_and_batch_size_as_lmms_eval_passes_them():
    kw = adapter.generator_kwargs({"pretrained": "/m", "interventions": '"var;cls-prune:keep=64"', "batch_size": "1",
                                   "max_batch_size": 8, "dtype": "bfloat16"})
    assert kw == {"pretrained": "/m", "interventions": "var;cls-prune:keep=64", "dtype": "bfloat16"}
    with pytest.raises(ValueError, match=r"unknown model_args \['method'\]"):
        adapter.generator_kwargs({"pretrained": "/m", "method": "var"})
    # an unquoted two-parameter spec, as lmms-eval's comma split hands it over: the error says how to quote it
    with pytest.raises(ValueError, match=r"unknown model_args \['keep'\].*quote the spec: --model_args "
                                         r"'pretrained=PATH,interventions=\"fastv:k=2,keep=0.5\"'"):
        adapter.generator_kwargs({"pretrained": "/m", "interventions": "fastv:k=2", "keep": 0.5})
    assert adapter.batch_size_of("1") == 1 and adapter.batch_size_of("4") == 4 and adapter.batch_size_of(8) == 8
    assert adapter.batch_size_of("auto") is None and adapter.batch_size_of("auto:4") is None
    with pytest.raises(ValueError, match="batch_size='many': give a positive integer or auto"):
        adapter.batch_size_of("many")


def test_the_store_is_keyed_by_the_request_content_not_the_task_name(model_dir, tmp_path):
    docs = _docs()
    gen = _generator(model_dir, tmp_path)
    try:
        first = gen.generate_until([r.args for r in _requests({"max_new_tokens": 4}, [0, 1])], {TASK: {SPLIT: docs}})
        gen.model.generate = _raise
        # the same task name, split, doc ids and gen kwargs on other data: not served from the store
        other = [{"image": testing.tiny_image(50 + i), "question": d["question"]} for i, d in enumerate(docs)]
        assert gen.generate_until([r.args for r in _requests({"max_new_tokens": 4}, [0])],
                                  {TASK: {SPLIT: other}}) == [("", None)]
        reworded = [{**d, "question": d["question"] + " answer yes or no"} for d in docs]
        assert gen.generate_until([r.args for r in _requests({"max_new_tokens": 4}, [1])],
                                  {TASK: {SPLIT: reworded}}) == [("", None)]
        # the same content is
        again = gen.generate_until([r.args for r in _requests({"max_new_tokens": 4}, [0, 1])], {TASK: {SPLIT: docs}})
        assert again == first
    finally:
        del gen.model.generate
        gen.close()


def test_failures_are_counted_and_printed_and_strict_raises(model_dir, tmp_path, capsys):
    docs = _docs()
    docs[2] = {"image": None, "question": "broken"}                        # doc_to_messages fails on it
    gen = _generator(model_dir, tmp_path)
    try:
        out = gen.generate_until([r.args for r in _requests({"max_new_tokens": 2}, [0, 2, 1])], {TASK: {SPLIT: docs}})
        assert [t == "" for t, _ in out] == [False, True, False]
        assert len(gen.failures) == 1 and f"{TASK}/{SPLIT} doc 2 failed" in gen.failures[0]
        err = capsys.readouterr().err
        assert 'attnkit: 1 of 3 request(s) failed and were answered ""' in err and "strict=true" in err
    finally:
        gen.close()
    strict = adapter.AttnkitGenerator(str(model_dir), output_dir=str(tmp_path), strict="true")
    try:
        with pytest.raises(adapter.SampleFailures) as failure:
            strict.generate_until([r.args for r in _requests({"max_new_tokens": 2}, [0, 2, 1])],
                                  {TASK: {SPLIT: docs}})
        assert isinstance(failure.value, SystemExit) and "doc 2 failed" in str(failure.value.code)
    finally:
        strict.close()
    with pytest.raises(ValueError, match="strict='maybe': use true or false"):
        adapter.AttnkitGenerator(str(model_dir), output_dir=str(tmp_path), strict="maybe")


def test_each_process_of_a_multi_process_run_writes_its_own_store(model_dir, tmp_path):
    docs = _docs()
    ranks = [adapter.AttnkitGenerator(str(model_dir), output_dir=str(tmp_path), rank=r, world_size=2)
             for r in range(2)]
    try:
        for r, gen in enumerate(ranks):
            gen.generate_until([x.args for x in _requests({"max_new_tokens": 2}, [r, r + 2])], {TASK: {SPLIT: docs}})
        paths = sorted(p.name for p in tmp_path.glob("*.jsonl"))
        assert paths == [f"{TASK}__{ranks[0].config_hash}.rank0.jsonl", f"{TASK}__{ranks[0].config_hash}.rank1.jsonl"]
    finally:
        for gen in ranks:
            gen.close()
    single = _generator(model_dir, tmp_path)                     # a later 1-process run serves both ranks' rows
    try:
        single.model.generate = _raise
        out = single.generate_until([x.args for x in _requests({"max_new_tokens": 2}, [0, 1, 2, 3])],
                                    {TASK: {SPLIT: docs}})
        assert all(t != "" for t, _ in out)
    finally:
        del single.model.generate
        single.close()


@pytest.fixture
def fake_lmms_eval(monkeypatch):
    """The few lmms-eval 0.7.3 names the plugin imports, as stand-ins."""

    class lmms:  # noqa: N801 - lmms-eval's name
        def __init__(self):
            self._rank, self._world_size, self.task_dict = 0, 1, {}

    @dataclasses.dataclass
    class TokenCounts:
        input_tokens: int | None = None
        output_tokens: int | None = None

    @dataclasses.dataclass
    class GenerationResult:
        text: str
        token_counts: TokenCounts | None = None

    @dataclasses.dataclass(frozen=True)
    class ModelManifest:
        model_id: str
        simple_class_path: str | None = None
        chat_class_path: str | None = None
        aliases: tuple = ()

    mods = {"lmms_eval": types.ModuleType("lmms_eval"), "lmms_eval.api": types.ModuleType("lmms_eval.api"),
            "lmms_eval.api.model": types.SimpleNamespace(lmms=lmms),
            "lmms_eval.api.instance": types.SimpleNamespace(GenerationResult=GenerationResult, TokenCounts=TokenCounts),
            "lmms_eval.models": types.ModuleType("lmms_eval.models"),
            "lmms_eval.models.registry_v2": types.SimpleNamespace(ModelManifest=ModelManifest)}
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    plugin = "attnkit.integrations.lmms_eval_model"
    real = sys.modules.pop(plugin, None)
    yield mods
    sys.modules.pop(plugin, None)              # the plugin imported here subclasses the fakes: never keep it
    if real is not None:
        sys.modules[plugin] = real


def test_entry_point_manifest_names_an_importable_chat_class(fake_lmms_eval, model_dir, tmp_path):
    (manifest,) = adapter.manifests()
    assert manifest.model_id == "attnkit" and manifest.simple_class_path is None
    module, _, name = manifest.chat_class_path.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    assert issubclass(cls, fake_lmms_eval["lmms_eval.api.model"].lmms) and cls.is_simple is False

    model = cls(pretrained=str(model_dir), batch_size="1", max_batch_size=4, interventions="record:layers=1",
                output_dir=str(tmp_path))
    try:
        assert model.device == model.generator.model.device      # lmms-eval gathers rank tensors on it
        model.task_dict = {TASK: {SPLIT: _docs()}}
        out = model.generate_until(_requests({"max_new_tokens": 3, "until": ["</s>"]}, [1, 0]))
        assert [r.text for r in out] == [_reference(model.generator, _docs()[i], 3) for i in (1, 0)]
        assert all(r.token_counts.output_tokens <= 3 for r in out)
        with pytest.raises(NotImplementedError):
            model.loglikelihood([])
    finally:
        model.generator.close()
