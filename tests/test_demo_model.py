"""The shipped demo model loads offline with from_pretrained and answers the shipped benchmark correctly."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from attnkit.synth import demo_data_path, demo_model_path, load_demo
from attnkit.synth.model import prompt
from attnkit.synth.world import CATEGORIES


@pytest.fixture(scope="module")
def demo():
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("TRANSFORMERS_OFFLINE", "1")
    try:
        yield load_demo()
    finally:
        mp.undo()


def _generate(model, processor, image_names: list[str], texts: list[str], max_new_tokens: int) -> list[str]:
    images = [Image.open(demo_data_path() / "images" / n).convert("RGB") for n in image_names]
    inputs = processor(images=images, text=[prompt(processor, t) for t in texts], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def test_loads_as_llava_with_144_visual_tokens(demo):
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    model, processor = demo
    assert isinstance(model, LlavaForConditionalGeneration) and isinstance(processor, LlavaProcessor)
    cfg = model.config
    assert (cfg.vision_feature_layer, cfg.vision_feature_select_strategy) == (-2, "default")
    assert cfg.vision_config.model_type == "clip_vision_model" and cfg.text_config.model_type == "llama"
    assert processor.tokenizer.padding_side == "left"
    n_weights = sum(f.stat().st_size for f in demo_model_path().glob("*.safetensors"))
    assert n_weights <= 25 * 2**20
    img = Image.open(next((demo_data_path() / "images").glob("*.png"))).convert("RGB")
    ids = processor(images=[img], text=[prompt(processor, "Describe this image.")], return_tensors="pt")["input_ids"]
    assert (ids == cfg.image_token_id).sum().item() == 144


def test_answers_pope_questions(demo):
    model, processor = demo
    rows = [json.loads(x) for x in (demo_data_path() / "synth_pope_random.json").read_text().splitlines()][:24]
    answers = _generate(model, processor, [r["image"] for r in rows], [r["text"] for r in rows], 2)
    assert all(a.strip() in ("yes", "no") for a in answers), answers
    correct = sum(a.strip() == r["label"] for a, r in zip(answers, rows, strict=True))
    assert correct >= 21, list(zip(answers, [r["label"] for r in rows], strict=True))


def test_caption_names_present_objects(demo):
    model, processor = demo
    inst = json.loads((demo_data_path() / "synth_chair_instances.json").read_text())
    names = {c["id"]: c["name"] for c in inst["categories"]}
    images = inst["images"][:4]
    texts = ["Please describe this image in detail."] * len(images)
    caps = _generate(model, processor, [im["file_name"] for im in images], texts, 40)
    vocab = {c.name for c in CATEGORIES}
    for im, cap in zip(images, caps, strict=True):
        present = {names[a["category_id"]] for a in inst["annotations"] if a["image_id"] == im["id"]}
        mentioned = {w for w in cap.replace(",", " ").replace(".", " ").split() if w in vocab}
        assert mentioned & present, (cap, present)


def test_reference_eval_script_scores_the_shipped_model(demo):
    from scripts.eval_demo import evaluate, yes_probability

    model, processor = demo
    rows = [json.loads(x) for x in (demo_data_path() / "synth_pope_adversarial.json").read_text().splitlines()][:16]
    images = [Image.open(demo_data_path() / "images" / r["image"]).convert("RGB") for r in rows]
    p_yes = yes_probability(model, processor, images, [r["text"] for r in rows], batch=5)
    answers = _generate(model, processor, [r["image"] for r in rows], [r["text"] for r in rows], 1)
    assert [p > 0.5 for p in p_yes] == [a.strip() == "yes" for a in answers]
    res = evaluate(model, processor, demo_data_path(), limit=6)
    assert [res[f"pope_{s}"]["n"] for s in ("random", "popular", "adversarial")] == [6, 6, 6]
    assert all(0 <= res[f"pope_{s}"]["p_yes_absent"] < 0.5 for s in ("random", "popular", "adversarial"))
    assert res["chair"]["n"] == 6 and res["chair"]["recall"] > 0.5


def test_prone_set_leaves_the_cooccurrence_prior_to_decide(demo):
    """On the prone set (small, faint objects, clutter unrelated to co-occurrence) absent objects that co-occur
    with the present ones get far more "yes" than random absent ones: the prior decides on weak evidence."""
    from scripts.eval_demo import yes_probability

    model, processor = demo
    data = demo_data_path("prone")
    p_yes = {}
    for split in ("random", "adversarial"):
        rows = [json.loads(x) for x in (data / f"synth_pope_{split}.json").read_text().splitlines()]
        rows = [r for r in rows if r["label"] == "no"]
        images = [Image.open(data / "images" / r["image"]).convert("RGB") for r in rows]
        p_yes[split] = yes_probability(model, processor, images, [r["text"] for r in rows], batch=25)
    mean = {k: sum(v) / len(v) for k, v in p_yes.items()}
    false_yes = {k: sum(p > 0.5 for p in v) for k, v in p_yes.items()}
    assert len(p_yes["random"]) == len(p_yes["adversarial"]) == 150
    assert mean["adversarial"] > 2 * mean["random"] and mean["adversarial"] > 0.08, mean   # clean set: 0.031
    assert false_yes["adversarial"] >= false_yes["random"] + 8, false_yes
