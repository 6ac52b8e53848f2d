"""The synthetic world is deterministic and its exported POPE/CHAIR files follow the published formats."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from attnkit.synth import demo_data_path
from attnkit.synth.export import ExportConfig, export_benchmark, synonyms_text
from attnkit.synth.model import build_processor
from attnkit.synth.text import POPE_QUESTION, POPE_SUFFIX, caption, question_answers, vocabulary
from attnkit.synth.world import CATEGORIES, Scene, SceneObject, SynthWorld, WorldConfig, world_stats

NAMES = {c.name for c in CATEGORIES}


def _png(world: SynthWorld, i: int) -> bytes:
    buf = io.BytesIO()
    world.render(world.scene(i)).save(buf, format="PNG")
    return buf.getvalue()


def test_world_is_deterministic_per_seed():
    a, b, c = SynthWorld(WorldConfig(seed=3)), SynthWorld(WorldConfig(seed=3)), SynthWorld(WorldConfig(seed=4))
    for i in range(5):
        assert a.scene(i) == b.scene(i)
        assert _png(a, i) == _png(b, i)
    assert [a.scene(i) for i in range(5)] != [c.scene(i) for i in range(5)]
    assert _png(a, 0) != _png(c, 0)


def test_scenes_are_valid_and_have_cooccurrence():
    world = SynthWorld(WorldConfig(seed=0))
    scenes = [world.scene(i) for i in range(400)]
    for s in scenes:
        assert 2 <= len(s.objects) <= 5 and len(s.categories) == len(s.objects)
        for o in s.objects:
            x, y, w, h = o.bbox
            assert 0 <= x and 0 <= y and x + w <= s.width and y + h <= s.height
    stats = world_stats(scenes)
    # priors a model can learn: a cup comes with a table far more often than a table comes in general
    assert stats.cooccur["cup"]["table"] > 1.5 * stats.frequency["table"]
    assert stats.cooccur["car"]["laptop"] < 0.5 * stats.frequency["laptop"]
    assert set(caption(scenes[0]).split()) <= set(vocabulary()) | {"a"}


def test_training_questions_are_balanced_and_never_repeat_a_category():
    world = SynthWorld(WorldConfig(seed=0))
    stats = world_stats([world.scene(i) for i in range(300)])
    rng = np.random.default_rng(0)
    for i in range(200):
        scene = world.scene(i)
        qa = question_answers(scene, rng, stats.cooccur, stats.frequency, n=8, suffix_prob=0.5,
                              negative_mix=(0.2, 0.4, 0.4))
        before, after = POPE_QUESTION.split("{}")
        cats = [q.removesuffix(POPE_SUFFIX).removeprefix(before).removesuffix(after) for q, _ in qa]
        assert len(set(cats)) == len(cats), qa                       # nothing to copy from an earlier turn
        assert [a for _, a in qa] == ["yes", "no"] * min(4, len(scene.categories))
        assert all((c in scene.categories) == (a == "yes") for c, (_, a) in zip(cats, qa, strict=True))


def test_patch_targets_label_each_patch_with_the_category_covering_most_of_it():
    from scripts.train_demo import CAT_INDEX, patch_targets

    objects = (SceneObject("cup", (8, 0, 12, 8), (0, 0, 0)), SceneObject("dog", (0, 16, 8, 8), (0, 0, 0)),
               SceneObject("tree", (4, 16, 3, 8), (0, 0, 0)))
    scene = Scene(0, "kitchen", objects, (255, 255, 255), 24, 24)
    got = patch_targets([scene], grid=3, patch=8).view(3, 3)
    cup, dog = CAT_INDEX["cup"] + 1, CAT_INDEX["dog"] + 1
    # cup covers patch (0,1) fully and half of (0,2); dog covers (2,0) fully, more than the tree's 3/8
    assert got.tolist() == [[0, cup, cup], [0, 0, 0], [dog, 0, 0]]
    assert patch_targets([scene], grid=3, patch=8, min_cover=0.6).view(3, 3)[0].tolist() == [0, cup, 0]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    cfg = ExportConfig(seed=5, pope_images=8, chair_images=6, stats_scenes=300)
    return export_benchmark(tmp_path_factory.mktemp("synth"), cfg), cfg


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _truth(out, prefix="synth"):
    """image file -> present categories, by re-generating the scenes the files name."""
    man = json.loads((out / "manifest.json").read_text())
    world = SynthWorld(WorldConfig(seed=man["config"]["seed"]))
    return lambda name: world.scene(int(name.removeprefix(f"{prefix}_").removesuffix(".png"))).categories


@pytest.mark.parametrize("split", ["random", "popular", "adversarial"])
def test_pope_files_are_official_format_with_right_negatives(exported, split):
    out, cfg = exported
    rows = _jsonl(out / f"synth_pope_{split}.json")
    assert len(rows) == 2 * cfg.pope_per_image * cfg.pope_images
    assert [r["question_id"] for r in rows] == list(range(1, len(rows) + 1))
    assert all(set(r) == {"question_id", "image", "text", "label"} for r in rows)
    assert [r["label"] for r in rows[:2]] == ["yes", "no"] and sum(r["label"] == "yes" for r in rows) == len(rows) / 2
    present = _truth(out)
    stats = world_stats([SynthWorld(WorldConfig(seed=0)).scene(i) for i in range(cfg.stats_scenes)])
    for r in rows:
        assert (out / "images" / r["image"]).is_file()
        obj = r["text"].removeprefix("Is there a ").removesuffix(" in the image?")
        assert obj in NAMES
        assert (obj in present(r["image"])) == (r["label"] == "yes")
    for img in {r["image"] for r in rows}:
        negs = [r["text"].split()[3] for r in rows if r["image"] == img and r["label"] == "no"]
        absent_popular = [c for c in stats.popular() if c not in present(img)]
        absent_cooccur = [c for c in stats.cooccurring(present(img)) if c not in present(img)]
        if split == "popular":
            assert negs == absent_popular[: len(negs)]
        elif split == "adversarial":
            assert negs == absent_cooccur[: len(negs)]
        else:
            assert len(set(negs)) == len(negs)


def test_chair_files_are_coco_format(exported):
    out, cfg = exported
    inst = json.loads((out / "synth_chair_instances.json").read_text())
    assert set(inst) == {"images", "annotations", "categories"}
    assert len(inst["images"]) == cfg.chair_images
    cats = {c["id"]: c["name"] for c in inst["categories"]}
    assert set(cats.values()) == NAMES and all({"id", "name", "supercategory"} == set(c) for c in inst["categories"])
    images = {im["id"]: im for im in inst["images"]}
    present = _truth(out)
    for a in inst["annotations"]:
        assert set(a) == {"id", "image_id", "category_id", "bbox", "area", "iscrowd"} and a["iscrowd"] == 0
        im = images[a["image_id"]]
        x, y, w, h = a["bbox"]
        assert a["area"] == w * h and x + w <= im["width"] and y + h <= im["height"]
        assert cats[a["category_id"]] in present(im["file_name"])
    for im in inst["images"]:
        assert (out / "images" / im["file_name"]).is_file()
        n = sum(a["image_id"] == im["id"] for a in inst["annotations"])
        assert n == len(present(im["file_name"]))
    caps = json.loads((out / "synth_chair_captions.json").read_text())
    assert {a["image_id"] for a in caps["annotations"]} == set(images)
    prompts = _jsonl(out / "synth_chair_prompts.jsonl")
    assert [p["image_id"] for p in prompts] == [im["id"] for im in inst["images"]]
    image_list = (out / "synth_chair_image_list.txt").read_text().split()
    assert [int(i) for i in image_list] == [im["id"] for im in inst["images"]]
    lines = (out / "synth_chair_synonyms.txt").read_text().splitlines()
    assert [line.split(", ")[0] for line in lines] == [c.name for c in CATEGORIES]
    assert "cup, mug" in lines and synonyms_text().count("\n") == len(CATEGORIES)


def test_pope_and_chair_images_are_disjoint(exported):
    out, _ = exported
    pope = {r["image"] for r in _jsonl(out / "synth_pope_random.json")}
    chair = {p["image"] for p in _jsonl(out / "synth_chair_prompts.jsonl")}
    assert not pope & chair


def test_shipped_data_is_the_default_export():
    data = demo_data_path()
    man = json.loads((data / "manifest.json").read_text())
    assert man["config"] == {**ExportConfig().__dict__}
    rows = _jsonl(data / "synth_pope_adversarial.json")
    assert 100 <= len(rows) <= 300 and all((data / "images" / r["image"]).is_file() for r in rows)
    assert man["config"]["seed"] != 0  # held out from the training world
    # the shipped images are what the current world renders (a palette or layout change needs a re-export)
    world = SynthWorld(WorldConfig(seed=man["config"]["seed"], image_size=man["config"]["image_size"]))
    for name in sorted({r["image"] for r in rows})[:3]:
        shipped = np.asarray(Image.open(data / "images" / name).convert("RGB"))
        scene = world.scene(int(name.rsplit("_", 1)[1].split(".")[0]))
        assert np.array_equal(shipped, np.asarray(world.render(scene))), name


def test_training_conversations_probe_the_asked_object_word():
    from scripts.train_demo import Conversations, TrainConfig

    processor = build_processor()
    tok = processor.tokenizer
    conv = Conversations(processor, SynthWorld(WorldConfig(seed=0)), TrainConfig())
    n_probes = 0
    for i in range(20):
        ids, labels, probes = conv.sample(1_000_000 + i, step=300)
        assert len(ids) == len(labels) and ids.count(tok.convert_tokens_to_ids("<image>")) == 144
        words = tok.convert_ids_to_tokens(ids)
        for pos, answer in probes:
            assert words[pos - 3:pos] == ["is", "there", "a"] and words[pos] in NAMES
            # the answer the probe asks for is the one the turn is trained on (first label after the question)
            assert tok.convert_ids_to_tokens(answer) == next(tok.convert_ids_to_tokens(x)
                                                             for x in labels[pos:] if x != -100)
        n_probes += len(probes)
    assert n_probes >= 20 * 4
    with pytest.raises(ValueError, match="caption_mode='end'; allowed"):
        TrainConfig(caption_mode="end")
