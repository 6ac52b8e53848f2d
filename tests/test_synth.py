"""The synthetic world is deterministic and its exported POPE/CHAIR files follow the published formats."""

from __future__ import annotations

import io
import json
from dataclasses import asdict, replace

import numpy as np
import pytest
from PIL import Image

from attnkit.synth import demo_data_path
from attnkit.synth.export import DIFFICULTIES, POPE_SPLITS, ExportConfig, export_benchmark, synonyms_text
from attnkit.synth.model import build_processor
from attnkit.synth.text import POPE_QUESTION, POPE_SUFFIX, caption, question_answers, vocabulary
from attnkit.synth.world import CATEGORIES, Scene, SceneObject, SynthWorld, WorldConfig, world_stats

PRONE = ExportConfig(difficulty="prone").world_config()

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
    assert ExportConfig(**man["config"]) == ExportConfig()   # (written before ExportConfig had "difficulty")
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


def _diff_pixels(world: SynthWorld, a: Scene, b: Scene) -> np.ndarray:
    """Where the renders of two versions of a scene differ (H x W bool)."""
    return (np.asarray(world.render(a), dtype=int) != np.asarray(world.render(b), dtype=int)).any(-1)


def test_prone_world_makes_the_clean_scenes_ambiguous_object_by_object():
    clean, prone = SynthWorld(WorldConfig(seed=1)), SynthWorld(PRONE)
    n_small = n_faint = n_fragments = n_objects = 0
    for i in range(200):
        c, p = clean.scene(i), prone.scene(i)
        # same scene (kind, objects, order, background): only the evidence changes
        assert (p.kind, p.background, [o.category for o in p.objects]) == (c.kind, c.background,
                                                                            [o.category for o in c.objects])
        assert c.lookalikes == ()
        for oc, op in zip(c.objects, p.objects, strict=True):
            (x, y, w, h), (px, py, pw, ph) = oc.bbox, op.bbox
            assert pw == ph and (pw == w or PRONE.small_size[0] <= pw <= PRONE.small_size[1] < w)
            assert x <= px and y <= py and px + pw <= x + w and py + ph <= y + h       # shrunk about its box
            blend = np.array(op.color) - (1 - PRONE.faint) * np.array(oc.color) - PRONE.faint * np.array(c.background)
            assert op.color == oc.color or np.abs(blend).max() <= 0.5
            n_small += pw < w
            n_faint += op.color != oc.color
            n_objects += 1
        assert 1 <= len(p.lookalikes) <= PRONE.lookalikes
        n_fragments += len(p.lookalikes)
    assert 0.2 < n_small / n_objects < 0.4 and 0.2 < n_faint / n_objects < 0.4 and n_fragments > 300


@pytest.fixture(scope="module")
def exported_prone(tmp_path_factory):
    cfg = ExportConfig(seed=5, pope_images=12, chair_images=8, stats_scenes=300, difficulty="prone")
    return export_benchmark(tmp_path_factory.mktemp("prone"), cfg), cfg


def test_prone_labels_are_honest_absent_is_not_drawn(exported_prone):
    out, cfg = exported_prone
    world = SynthWorld(cfg.world_config())
    man = json.loads((out / "manifest.json").read_text())
    assert man["world"]["lookalikes"] == PRONE.lookalikes and man["config"]["difficulty"] == "prone"
    scenes = {}
    for split in POPE_SPLITS:
        for r in _jsonl(out / f"synth_pope_{split}.json"):
            scene = scenes.setdefault(r["image"], world.scene(int(r["image"][6:12])))
            obj = r["text"].removeprefix("Is there a ").removesuffix(" in the image?")
            assert (r["label"] == "yes") == (obj in {o.category for o in scene.objects})
    inst = json.loads((out / "synth_chair_instances.json").read_text())
    cat_name = {c["id"]: c["name"] for c in inst["categories"]}
    for im in inst["images"]:
        scene = scenes.setdefault(im["file_name"], world.scene(im["id"]))
        drawn = sorted((o.category, list(o.bbox)) for o in scene.objects)   # CHAIR lists what is drawn
        assert sorted((cat_name[a["category_id"]], a["bbox"]) for a in inst["annotations"]
                      if a["image_id"] == im["id"]) == drawn
    n_fragments = 0
    for name, scene in scenes.items():
        assert man["lookalikes"][name] == [f.like for f in scene.lookalikes]
        present = {o.category for o in scene.objects}
        for k, o in enumerate(scene.objects):          # every present object is visibly drawn
            without = replace(scene, objects=scene.objects[:k] + scene.objects[k + 1:])
            assert _diff_pixels(world, scene, without).sum() >= 12, (name, o)
        bare = replace(scene, objects=())
        for k, f in enumerate(scene.lookalikes):
            assert f.like not in present                  # coloured like an absent category ...
            mask = _diff_pixels(world, bare, replace(bare, lookalikes=scene.lookalikes[:k] + scene.lookalikes[k + 1:]))
            ys, xs = np.nonzero(mask)
            (x0, y0), (x1, y1) = f.start, f.end
            # ... and only a short diagonal stroke: a few pixels along its segment, never an icon
            assert 0 < mask.sum() <= 45 and abs(x1 - x0) >= 3 and abs(y1 - y0) >= 3
            assert min(x0, x1) - 2 <= xs.min() and xs.max() <= max(x0, x1) + 2
            assert min(y0, y1) - 2 <= ys.min() and ys.max() <= max(y0, y1) + 2
            n_fragments += 1
    assert n_fragments >= len(scenes)


def test_shipped_prone_data_is_what_the_prone_world_renders():
    data, clean = demo_data_path("prone"), demo_data_path()
    man = json.loads((data / "manifest.json").read_text())
    cfg = ExportConfig(**man["config"])
    assert cfg == ExportConfig(difficulty="prone")                        # scripts/export_demo.py --difficulty prone
    assert man["world"] == json.loads(json.dumps(asdict(cfg.world_config())))   # a preset change needs a re-export
    # the same held-out scenes and questions as the clean set: only the images (and shrunk boxes) differ
    for split in POPE_SPLITS:
        name = f"synth_pope_{split}.json"
        assert (data / name).read_bytes() == (clean / name).read_bytes()
    world = SynthWorld(cfg.world_config())
    names = sorted(p.name for p in (data / "images").iterdir())
    assert len(names) == man["pope_images"] + man["chair_images"]
    for name in names[::7]:
        shipped = np.asarray(Image.open(data / "images" / name).convert("RGB"))
        assert np.array_equal(shipped, np.asarray(world.render(world.scene(int(name[6:12]))))), name
    size = sum(p.stat().st_size for p in data.rglob("*") if p.is_file())
    assert size <= 25 * 2**20


def test_difficulty_and_ambiguity_knobs_are_validated():
    assert set(DIFFICULTIES) == {"clean", "prone"} and ExportConfig().world_config() == WorldConfig(seed=1)
    with pytest.raises(ValueError, match="difficulty='hard'; allowed: 'clean', 'prone'"):
        ExportConfig(difficulty="hard")
    with pytest.raises(ValueError, match="kind='hard'; allowed: 'clean', 'prone'"):
        demo_data_path("hard")
    with pytest.raises(ValueError, match=r"small_prob=1.5; allowed: a probability or blend in \[0, 1\]"):
        WorldConfig(small_prob=1.5)
    with pytest.raises(ValueError, match=r"small_size=\(3, 20\); allowed: \(lo, hi\) with 4 <= lo <= hi <= min_"):
        WorldConfig(small_size=(3, 20))
    with pytest.raises(ValueError, match="lookalikes=5; allowed: 0 to 4"):
        WorldConfig(lookalikes=5)
    with pytest.raises(ValueError, match="lookalike_from='near'; allowed: 'scene', 'any'"):
        WorldConfig(lookalike_from="near")
    assert WorldConfig(small_size=[9, 12]) == WorldConfig()            # the manifest's JSON list round-trips


def test_scene_lookalikes_follow_the_scene_type_when_asked():
    from attnkit.synth.world import SCENE_TYPES

    world = SynthWorld(WorldConfig(seed=2, lookalikes=2, lookalike_from="scene"))
    for i in range(100):
        s = world.scene(i)
        assert all(f.like in SCENE_TYPES[s.kind][1] and f.like not in s.categories for f in s.lookalikes)
