"""A seeded world of simple scenes: coloured icons of a fixed vocabulary with COCO-like co-occurrence.

Every category is one (shape, colour) icon. A scene first draws a *scene type* (kitchen, office,
street, park), then 2-5 distinct objects, most of them from that type's weighted list and a few from
anywhere. So "cup" usually comes with "table", "car" with "road-side" things, and a model trained on
these scenes learns priors it can hallucinate from, as on COCO. A harder world for held-out data makes
the evidence weak object by object (small or faint objects, look-alike clutter; see :class:`WorldConfig`).

    world = SynthWorld(WorldConfig(seed=0))
    scene = world.scene(17)          # deterministic in (seed, index)
    image = world.render(scene)      # PIL.Image, 96x96 RGB
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image, ImageDraw


@dataclass(frozen=True)
class Category:
    id: int                      # COCO-style id, starting at 1
    name: str
    supercategory: str
    shape: str
    color: tuple[int, int, int]
    synonyms: tuple[str, ...] = ()


_C = Category
CATEGORIES: tuple[Category, ...] = (
    _C(1, "person", "person", "figure", (230, 120, 40), ("man", "woman")),
    _C(2, "table", "furniture", "bar", (140, 90, 40), ("desk",)),
    _C(3, "cup", "kitchen", "cup", (220, 30, 30), ("mug",)),
    _C(4, "bottle", "kitchen", "bottle", (30, 170, 60)),
    _C(5, "apple", "food", "circle", (200, 0, 120)),
    _C(6, "banana", "food", "crescent", (235, 215, 0)),
    _C(7, "laptop", "electronic", "square", (60, 60, 70), ("computer",)),
    _C(8, "phone", "electronic", "tall", (0, 80, 220), ("cellphone",)),
    _C(9, "book", "indoor", "diamond", (150, 40, 200)),
    _C(10, "clock", "indoor", "ring", (0, 170, 190)),
    _C(11, "chair", "furniture", "chair", (170, 120, 200)),
    _C(12, "car", "vehicle", "car", (240, 60, 160), ("automobile",)),
    _C(13, "bus", "vehicle", "wide", (250, 150, 0)),
    _C(14, "tree", "outdoor", "triangle", (20, 110, 20)),
    _C(15, "house", "outdoor", "house", (120, 60, 30), ("building",)),
    _C(16, "dog", "animal", "star", (110, 80, 60), ("puppy",)),
    _C(17, "ball", "sports", "dot", (0, 200, 120)),
    _C(18, "bird", "animal", "cross", (30, 30, 160)),
)
CATEGORY_BY_NAME = {c.name: c for c in CATEGORIES}

# Scene types: (probability, {category: weight}). Weights set the co-occurrence priors.
SCENE_TYPES: dict[str, tuple[float, dict[str, float]]] = {
    "kitchen": (0.3, {"table": 6, "cup": 5, "bottle": 3, "apple": 2.5, "banana": 2, "chair": 2, "person": 1}),
    "office": (0.25, {"laptop": 5, "table": 4, "chair": 4, "phone": 3, "book": 3, "clock": 2, "cup": 1.5}),
    "street": (0.25, {"car": 5, "person": 5, "tree": 4, "bus": 3, "house": 3, "dog": 1, "bird": 1}),
    "park": (0.2, {"tree": 5, "person": 4, "dog": 4, "ball": 3, "bird": 3, "bottle": 1}),
}


@dataclass(frozen=True)
class WorldConfig:
    """How scenes are drawn. ``off_prior`` is the chance an object ignores the scene type's weights.

    The ambiguity knobs (``small_prob`` ... ``lookalike_from``) make evidence weak object by object for a
    harder held-out world (``ExportConfig(difficulty="prone")``); with their defaults a scene is the clean one.
    """

    seed: int = 0
    image_size: int = 96
    min_objects: int = 2
    max_objects: int = 5
    min_size: int = 14
    max_size: int = 30
    off_prior: float = 0.15
    color_jitter: int = 20
    # Object-by-object ambiguity (all off by default: the training world and the clean benchmark). Drawn from
    # a separate random stream after the scene, so the objects, kind and layout stay those of the clean scene.
    small_prob: float = 0.0       # chance an object is shrunk (about its centre) to ``small_size`` pixels
    small_size: tuple[int, int] = (9, 12)
    faint_prob: float = 0.0       # chance an object's colour is blended toward the background by ``faint``
    faint: float = 0.5
    lookalikes: int = 0           # up to this many look-alike fragments per scene (see :class:`Lookalike`)
    lookalike_faint: float = 0.35  # their colour's blend toward the background
    lookalike_from: str = "any"   # "any": absent categories uniformly; "scene": by the scene type's weights

    def __post_init__(self):
        object.__setattr__(self, "small_size", tuple(self.small_size))   # a JSON round trip gives a list
        for name in ("small_prob", "faint_prob", "faint", "lookalike_faint"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name}={v!r}; allowed: a probability or blend in [0, 1]")
        lo, hi = self.small_size
        if not 4 <= lo <= hi <= self.min_size:
            raise ValueError(f"small_size={self.small_size!r}; allowed: (lo, hi) with 4 <= lo <= hi <= "
                             f"min_size={self.min_size}")
        if self.lookalike_from not in ("scene", "any"):
            raise ValueError(f"lookalike_from={self.lookalike_from!r}; allowed: 'scene', 'any'")
        if not 0 <= self.lookalikes <= 4:
            raise ValueError(f"lookalikes={self.lookalikes!r}; allowed: 0 to 4 fragments per scene")


@dataclass(frozen=True)
class SceneObject:
    category: str
    bbox: tuple[int, int, int, int]  # COCO [x, y, w, h] in pixels
    color: tuple[int, int, int]


@dataclass(frozen=True)
class Lookalike:
    """Clutter *coloured like* an absent category but not a drawing of it: a short thick diagonal stroke.

    No category's icon is a diagonal stroke, so the fragment is never an instance of ``like``; ``like`` is
    always absent from its scene (the ground truth stays true). ``like`` is drawn uniformly from the absent
    categories (``lookalike_from="any"``) or by the scene type's weights (``"scene"``).
    """

    like: str
    start: tuple[int, int]
    end: tuple[int, int]
    width: int
    color: tuple[int, int, int]


@dataclass(frozen=True)
class Scene:
    index: int
    kind: str
    objects: tuple[SceneObject, ...]
    background: tuple[int, int, int]
    width: int
    height: int
    noise_seed: int = field(default=0, compare=False)
    lookalikes: tuple[Lookalike, ...] = ()

    @property
    def categories(self) -> list[str]:
        """Present categories in canonical (vocabulary) order."""
        present = {o.category for o in self.objects}
        return [c.name for c in CATEGORIES if c.name in present]


class SynthWorld:
    """Deterministic scenes: ``scene(i)`` depends only on ``(config.seed, i)``."""

    def __init__(self, config: WorldConfig | None = None):
        self.config = config or WorldConfig()

    def rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.config.seed, index, 0x5EED])

    def scene(self, index: int) -> Scene:
        cfg, rng = self.config, self.rng(index)
        kinds = list(SCENE_TYPES)
        kind = kinds[rng.choice(len(kinds), p=[SCENE_TYPES[k][0] for k in kinds])]
        weights = SCENE_TYPES[kind][1]
        n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
        names: list[str] = []
        while len(names) < n:
            if rng.random() < cfg.off_prior:
                pool = [c.name for c in CATEGORIES if c.name not in names]
                p = np.full(len(pool), 1.0 / len(pool))
            else:
                pool = [k for k in weights if k not in names]
                if not pool:
                    continue
                p = np.array([weights[k] for k in pool], dtype=float)
                p /= p.sum()
            names.append(pool[rng.choice(len(pool), p=p)])
        objects, boxes = [], []
        for name in names:
            box = self._place(rng, boxes)
            boxes.append(box)
            base = np.array(CATEGORY_BY_NAME[name].color)
            jitter = rng.integers(-cfg.color_jitter, cfg.color_jitter + 1, 3)
            color = tuple(int(v) for v in np.clip(base + jitter, 0, 255))
            objects.append(SceneObject(name, box, color))
        background = tuple(int(v) for v in rng.integers(200, 256, 3))
        scene = Scene(index, kind, tuple(objects), background, cfg.image_size, cfg.image_size,
                      noise_seed=int(rng.integers(2**31)))
        if cfg.small_prob or cfg.faint_prob or cfg.lookalikes:
            scene = self._ambiguous(scene)
        return scene

    def _ambiguous(self, scene: Scene) -> Scene:
        """The clean scene with some objects small or faint and up to ``lookalikes`` look-alike fragments."""
        cfg = self.config
        rng = np.random.default_rng([cfg.seed, scene.index, 0xA3B1])
        bg = np.array(scene.background, dtype=float)
        objects = []
        for o in scene.objects:
            x, y, w, h = o.bbox
            if rng.random() < cfg.small_prob:
                s = int(rng.integers(cfg.small_size[0], cfg.small_size[1] + 1))
                x, y, w, h = x + (w - s) // 2, y + (h - s) // 2, s, s
            color = o.color
            if rng.random() < cfg.faint_prob:
                color = tuple(int(round(v)) for v in (1 - cfg.faint) * np.array(color) + cfg.faint * bg)
            objects.append(SceneObject(o.category, (x, y, w, h), color))
        present = {o.category for o in objects}
        pool = SCENE_TYPES[scene.kind][1] if cfg.lookalike_from == "scene" else dict.fromkeys(CATEGORY_BY_NAME, 1.0)
        weights = {k: v for k, v in pool.items() if k not in present}
        fragments = []
        for _ in range(int(rng.integers(1, cfg.lookalikes + 1)) if cfg.lookalikes else 0):
            if not weights:
                break
            names = list(weights)
            p = np.array([weights[k] for k in names]) / sum(weights.values())
            like = names[int(rng.choice(len(names), p=p))]
            del weights[like]
            length = int(rng.integers(6, 10))
            angle = math.radians(float(rng.uniform(30, 60)) + 90 * int(rng.integers(0, 2)))
            dx, dy = round(length * math.cos(angle)), round(length * math.sin(angle))
            x0 = int(rng.integers(max(1, -dx) + 1, cfg.image_size - max(1, dx) - 1))
            y0 = int(rng.integers(1, cfg.image_size - dy - 1))
            base = np.array(CATEGORY_BY_NAME[like].color, dtype=float)
            color = tuple(int(round(v)) for v in (1 - cfg.lookalike_faint) * base + cfg.lookalike_faint * bg)
            fragments.append(Lookalike(like, (x0, y0), (x0 + dx, y0 + dy), 3, color))
        return replace(scene, objects=tuple(objects), lookalikes=tuple(fragments))

    def _place(self, rng: np.random.Generator, boxes: list[tuple[int, int, int, int]]) -> tuple[int, int, int, int]:
        """A square box that overlaps earlier boxes little (IoU < 0.1, or the best of 50 tries)."""
        cfg = self.config
        best, best_iou = None, 2.0
        for _ in range(50):
            s = int(rng.integers(cfg.min_size, cfg.max_size + 1))
            x, y = (int(v) for v in rng.integers(1, cfg.image_size - s, 2))
            box = (x, y, s, s)
            iou = max((_iou(box, b) for b in boxes), default=0.0)
            if iou < best_iou:
                best, best_iou = box, iou
            if iou < 0.1:
                break
        return best

    def render(self, scene: Scene) -> Image.Image:
        """Draw the scene: light background, faint noise, then each object's icon in order."""
        img = Image.new("RGB", (scene.width, scene.height), scene.background)
        noise = np.random.default_rng(scene.noise_seed).integers(-8, 9, (scene.height, scene.width, 1))
        arr = np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
        img = Image.fromarray(arr)
        draw = ImageDraw.Draw(img)
        for f in scene.lookalikes:      # clutter first: objects drawn later may cover it
            draw.line((*f.start, *f.end), fill=f.color, width=f.width)
        for obj in scene.objects:
            _draw_icon(draw, CATEGORY_BY_NAME[obj.category].shape, obj.bbox, obj.color)
        return img


def _iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    ix = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def _draw_icon(draw: ImageDraw.ImageDraw, shape: str, bbox: tuple[int, int, int, int], color) -> None:
    x, y, w, h = bbox
    x1, y1, cx, cy = x + w - 1, y + h - 1, x + w / 2, y + h / 2
    dark = tuple(max(0, c - 90) for c in color)
    if shape == "circle":
        draw.ellipse((x, y, x1, y1), fill=color)
    elif shape == "dot":
        draw.ellipse((x + w * 0.2, y + h * 0.2, x1 - w * 0.2, y1 - h * 0.2), fill=color, outline=dark, width=2)
    elif shape == "ring":
        draw.ellipse((x, y, x1, y1), outline=color, width=max(2, w // 6))
        draw.line((cx, cy, cx, y + h * 0.25), fill=dark, width=2)
    elif shape == "square":
        draw.rectangle((x, y + h * 0.15, x1, y1 - h * 0.3), fill=color)
        draw.rectangle((x - 0, y1 - h * 0.3, x1, y1 - h * 0.15), fill=dark)
    elif shape == "tall":
        draw.rectangle((x + w * 0.28, y, x1 - w * 0.28, y1), fill=color)
    elif shape == "wide":
        draw.rectangle((x, y + h * 0.25, x1, y1 - h * 0.2), fill=color)
        for k in range(3):
            wx = x + w * (0.1 + 0.3 * k)
            draw.rectangle((wx, y + h * 0.33, wx + w * 0.18, y + h * 0.5), fill=(230, 240, 255))
    elif shape == "bar":
        draw.rectangle((x, y + h * 0.2, x1, y + h * 0.4), fill=color)
        draw.rectangle((x + w * 0.1, y + h * 0.4, x + w * 0.25, y1), fill=color)
        draw.rectangle((x1 - w * 0.25, y + h * 0.4, x1 - w * 0.1, y1), fill=color)
    elif shape == "triangle":
        draw.polygon([(cx, y), (x1, y1 - h * 0.2), (x, y1 - h * 0.2)], fill=color)
        draw.rectangle((cx - w * 0.08, y1 - h * 0.2, cx + w * 0.08, y1), fill=dark)
    elif shape == "diamond":
        draw.polygon([(cx, y), (x1, cy), (cx, y1), (x, cy)], fill=color)
    elif shape == "star":
        pts = []
        for k in range(10):
            r = (w / 2) if k % 2 == 0 else (w / 4.5)
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + r * math.cos(a), cy + r * math.sin(a)))
        draw.polygon(pts, fill=color)
    elif shape == "cross":
        draw.polygon([(x, cy), (cx, y + h * 0.2), (x1, cy), (cx, cy + h * 0.1)], fill=color)
        draw.line((x, cy, x1, cy), fill=dark, width=2)
    elif shape == "crescent":
        draw.pieslice((x, y - h * 0.4, x1, y1), 20, 160, fill=color)
    elif shape == "cup":
        draw.rectangle((x + w * 0.15, y + h * 0.2, x + w * 0.7, y1), fill=color)
        draw.ellipse((x + w * 0.6, y + h * 0.35, x1, y + h * 0.75), outline=color, width=max(2, w // 8))
    elif shape == "bottle":
        draw.rectangle((x + w * 0.3, y + h * 0.35, x1 - w * 0.3, y1), fill=color)
        draw.rectangle((x + w * 0.42, y, x1 - w * 0.42, y + h * 0.35), fill=dark)
    elif shape == "chair":
        draw.rectangle((x + w * 0.2, y, x + w * 0.35, y1), fill=color)
        draw.rectangle((x + w * 0.2, cy, x1 - w * 0.15, cy + h * 0.15), fill=color)
        draw.rectangle((x1 - w * 0.3, cy, x1 - w * 0.15, y1), fill=color)
    elif shape == "car":
        draw.rectangle((x, cy - h * 0.1, x1, y1 - h * 0.2), fill=color)
        draw.rectangle((x + w * 0.25, y + h * 0.2, x1 - w * 0.25, cy), fill=color)
        for wx in (x + w * 0.12, x1 - w * 0.38):
            draw.ellipse((wx, y1 - h * 0.35, wx + w * 0.26, y1 - h * 0.09), fill=(20, 20, 20))
    elif shape == "house":
        draw.polygon([(cx, y), (x1, cy), (x, cy)], fill=dark)
        draw.rectangle((x + w * 0.12, cy, x1 - w * 0.12, y1), fill=color)
    elif shape == "figure":
        draw.ellipse((cx - w * 0.15, y, cx + w * 0.15, y + h * 0.3), fill=color)
        draw.rectangle((cx - w * 0.12, y + h * 0.3, cx + w * 0.12, y + h * 0.7), fill=color)
        draw.line((cx, y + h * 0.7, x + w * 0.25, y1), fill=color, width=max(2, w // 8))
        draw.line((cx, y + h * 0.7, x1 - w * 0.25, y1), fill=color, width=max(2, w // 8))
        draw.line((x + w * 0.15, y + h * 0.4, x1 - w * 0.15, y + h * 0.4), fill=color, width=max(2, w // 10))
    else:
        raise ValueError(f"unknown shape {shape!r}")


@dataclass(frozen=True)
class WorldStats:
    """Object frequency (share of scenes) and co-occurrence P(b present | a present), from sampled scenes."""

    frequency: dict[str, float]
    cooccur: dict[str, dict[str, float]]

    def popular(self) -> list[str]:
        """Categories by decreasing frequency (POPE "popular")."""
        return sorted(self.frequency, key=lambda c: (-self.frequency[c], c))

    def cooccurring(self, present: list[str]) -> list[str]:
        """Categories by decreasing summed co-occurrence with ``present`` (POPE "adversarial")."""
        score = {c: sum(self.cooccur[p][c] for p in present) for c in self.frequency}
        return sorted(score, key=lambda c: (-score[c], c))


def world_stats(scenes: list[Scene]) -> WorldStats:
    names = [c.name for c in CATEGORIES]
    count = dict.fromkeys(names, 0)
    pair = {a: dict.fromkeys(names, 0) for a in names}
    for s in scenes:
        cats = s.categories
        for a in cats:
            count[a] += 1
            for b in cats:
                if a != b:
                    pair[a][b] += 1
    frequency = {c: count[c] / max(1, len(scenes)) for c in names}
    cooccur = {a: {b: pair[a][b] / max(1, count[a]) for b in names} for a in names}
    return WorldStats(frequency, cooccur)
