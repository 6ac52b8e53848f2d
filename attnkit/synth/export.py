"""Write held-out benchmarks of the synthetic world in the published POPE and CHAIR file formats."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from attnkit.synth.text import CHAIR_PROMPT, POPE_QUESTION, caption
from attnkit.synth.world import CATEGORIES, CATEGORY_BY_NAME, Scene, SynthWorld, WorldConfig, WorldStats, world_stats

POPE_SPLITS = ("random", "popular", "adversarial")

# Export difficulties: WorldConfig overrides of the eval world (the training world stays clean).
DIFFICULTIES: dict[str, dict] = {
    "clean": {},
    # Evidence made weak object by object, not globally: 30% of objects small (9-12 px instead of 14-30),
    # 30% faint (colour half-way to the background), and 1-3 look-alike fragments per scene coloured like
    # *uniformly* drawn absent categories. The clutter is independent of co-occurrence, so any gap between
    # the random and adversarial splits is the model's co-occurrence prior deciding on weak evidence.
    "prone": {"small_prob": 0.3, "faint_prob": 0.3, "lookalikes": 3, "lookalike_from": "any"},
}


@dataclass(frozen=True)
class ExportConfig:
    """What to write. The eval world's ``seed`` must differ from the training world's (0)."""

    seed: int = 1
    prefix: str = "synth"
    pope_images: int = 50
    pope_per_image: int = 3       # positives per image; as many negatives (POPE uses 3 + 3)
    chair_images: int = 60
    stats_scenes: int = 4000      # scenes of the training world (seed 0) the POPE statistics come from
    image_size: int = 96
    difficulty: str = "clean"     # a key of DIFFICULTIES: "clean" (the shipped demo data) or "prone"

    def __post_init__(self):
        if self.difficulty not in DIFFICULTIES:
            raise ValueError(f"difficulty={self.difficulty!r}; allowed: {', '.join(map(repr, DIFFICULTIES))}")

    def world_config(self) -> WorldConfig:
        """The eval world these files are rendered from (what tests re-render to check shipped images)."""
        return WorldConfig(seed=self.seed, image_size=self.image_size, **DIFFICULTIES[self.difficulty])


def image_name(scene: Scene, prefix: str = "synth") -> str:
    return f"{prefix}_{scene.index:06d}.png"


def pope_questions(scenes: list[Scene], stats: WorldStats, split: str, per_image: int, seed: int,
                   prefix: str = "synth") -> list[dict]:
    """POPE rows: per image ``per_image`` present objects ("yes") and as many absent ones ("no").

    Negatives follow POPE: *random* samples absent categories uniformly; *popular* takes the most
    frequent absent categories; *adversarial* takes the absent categories that co-occur most with the
    present ones. Yes and no alternate, as in the official files.
    """
    if split not in POPE_SPLITS:
        raise ValueError(f"split={split!r}; use one of {', '.join(POPE_SPLITS)}")
    rng = np.random.default_rng([seed, POPE_SPLITS.index(split)])
    rows: list[dict] = []
    for scene in scenes:
        present = scene.categories
        k = min(per_image, len(present))
        pos = [present[i] for i in sorted(rng.choice(len(present), size=k, replace=False))]
        absent = [c.name for c in CATEGORIES if c.name not in present]
        if split == "random":
            neg = [absent[i] for i in rng.choice(len(absent), size=k, replace=False)]
        elif split == "popular":
            neg = [c for c in stats.popular() if c not in present][:k]
        else:
            neg = [c for c in stats.cooccurring(present) if c not in present][:k]
        for p, n in zip(pos, neg, strict=True):
            for obj, label in ((p, "yes"), (n, "no")):
                rows.append({"question_id": len(rows) + 1, "image": image_name(scene, prefix),
                             "text": POPE_QUESTION.format(obj), "label": label})
    return rows


def coco_instances(scenes: list[Scene], prefix: str = "synth") -> dict:
    """COCO instances JSON (images, annotations, categories) for ``scenes``."""
    images = [{"id": s.index, "file_name": image_name(s, prefix), "width": s.width, "height": s.height}
              for s in scenes]
    anns = []
    for s in scenes:
        for o in s.objects:
            x, y, w, h = o.bbox
            anns.append({"id": len(anns) + 1, "image_id": s.index, "category_id": CATEGORY_BY_NAME[o.category].id,
                         "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
    cats = [{"id": c.id, "name": c.name, "supercategory": c.supercategory} for c in CATEGORIES]
    return {"images": images, "annotations": anns, "categories": cats}


def coco_captions(scenes: list[Scene], prefix: str = "synth") -> dict:
    """COCO captions JSON (one reference caption per image); CHAIR also reads objects from these."""
    images = [{"id": s.index, "file_name": image_name(s, prefix), "width": s.width, "height": s.height}
              for s in scenes]
    anns = [{"id": i + 1, "image_id": s.index, "caption": caption(s)} for i, s in enumerate(scenes)]
    return {"images": images, "annotations": anns}


def synonyms_text() -> str:
    """CHAIR's synonyms format: one line per category, ``canonical, synonym1, synonym2``."""
    return "".join(", ".join((c.name, *c.synonyms)) + "\n" for c in CATEGORIES)


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def export_benchmark(out_dir: str | Path, config: ExportConfig | None = None) -> Path:
    """Render the eval scenes and write POPE, CHAIR and a manifest under ``out_dir`` (see package docs)."""
    cfg = config or ExportConfig()
    if cfg.seed == 0:
        raise ValueError("seed=0 is the training world; export held-out data with another seed")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    world = SynthWorld(cfg.world_config())
    train = SynthWorld(WorldConfig(seed=0, image_size=cfg.image_size))
    stats = world_stats([train.scene(i) for i in range(cfg.stats_scenes)])

    pope, chair, i = [], [], 0
    while len(pope) < cfg.pope_images:   # POPE needs as many present objects as questions per side
        s = world.scene(i)
        i += 1
        if len(s.categories) >= cfg.pope_per_image:
            pope.append(s)
    chair = [world.scene(j) for j in range(i, i + cfg.chair_images)]
    for s in pope + chair:
        world.render(s).save(out / "images" / image_name(s, cfg.prefix), optimize=True)

    p = cfg.prefix
    for split in POPE_SPLITS:
        _jsonl(out / f"{p}_pope_{split}.json", pope_questions(pope, stats, split, cfg.pope_per_image, cfg.seed, p))
    (out / f"{p}_chair_instances.json").write_text(json.dumps(coco_instances(chair, p)))
    (out / f"{p}_chair_captions.json").write_text(json.dumps(coco_captions(chair, p)))
    (out / f"{p}_chair_synonyms.txt").write_text(synonyms_text())
    (out / f"{p}_chair_image_list.txt").write_text("".join(f"{s.index}\n" for s in chair))
    _jsonl(out / f"{p}_chair_prompts.jsonl", [{"image_id": s.index, "image": image_name(s, p), "text": CHAIR_PROMPT}
                                              for s in chair])
    manifest = {"config": asdict(cfg), "pope_images": len(pope), "chair_images": len(chair),
                "popular": stats.popular(), "frequency": stats.frequency}
    if cfg.difficulty != "clean":   # the world it was rendered from and the clutter in each image
        manifest["world"] = asdict(cfg.world_config())
        manifest["lookalikes"] = {image_name(s, p): [f.like for f in s.lookalikes] for s in pope + chair}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return out
