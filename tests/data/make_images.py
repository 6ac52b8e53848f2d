"""Regenerate the fixture images: 32x32 solid-colour PNGs, plus one corrupt file. Run from the repo root:
``python tests/data/make_images.py``. The outputs are committed; tests never run this."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

HERE = Path(__file__).parent
IMAGES = {
    "pope/images/red.png": (200, 30, 30),
    "pope/images/green.png": (30, 200, 30),
    "pope/images/blue.png": (30, 30, 200),
    "chair/val2014/COCO_val2014_000000000042.png": (120, 90, 60),
    "chair/val2014/COCO_val2014_000000000073.png": (60, 120, 90),
    "chair/val2014/COCO_val2014_000000000139.png": (90, 60, 120),
    "mme/existence/000000006040.png": (250, 250, 0),
    "mme/existence/000000018150.png": (0, 250, 250),
    "mme/artwork/images/10002.png": (250, 0, 250),
    "mme/artwork/images/10049.png": (128, 128, 128),
    "mme/commonsense_reasoning/0001.png": (20, 20, 20),
    "amber/images/AMBER_1.png": (210, 180, 140),
    "amber/images/AMBER_2.png": (70, 130, 180),
}
CORRUPT = "pope/images/corrupt.png"  # referenced by a POPE question: the runner must record an error row

if __name__ == "__main__":
    for name, colour in IMAGES.items():
        path = HERE / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), colour).save(path, optimize=True)
    (HERE / CORRUPT).write_bytes(b"\x89PNG this is not an image \x00\xff" * 4)
