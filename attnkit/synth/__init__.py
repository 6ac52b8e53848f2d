"""A synthetic vision-language world, its benchmarks, and the small trained demo model that ships with attnkit.

Scenes are 96x96 images of 2-5 coloured icons from 18 categories (person, table, cup, ...), drawn by a
seeded generator (:mod:`attnkit.synth.world`) with COCO-like co-occurrence (a scene type such as
"kitchen" makes cup, table and bottle likely), so a model learns priors it can hallucinate from.
The training world is seed 0; benchmarks are exported from another seed (held out).
``ExportConfig(difficulty="prone")`` exports the same held-out scenes and questions with the evidence made
weak object by object (small or faint objects, look-alike clutter), so the model's co-occurrence prior
decides and the adversarial split gets harder than random; it ships as ``demo_data_path("prone")``
(``python scripts/export_demo.py --difficulty prone --out attnkit/assets/demo/data_prone``).

Exported directory (:func:`attnkit.synth.export.export_benchmark`; the shipped copy is
:func:`demo_data_path`)::

    images/synth_000123.png            96x96 RGB scenes (POPE and CHAIR images)
    synth_pope_random.json             POPE question files, JSON lines as the official ones:
    synth_pope_popular.json              {"question_id": 1, "image": "synth_000123.png",
    synth_pope_adversarial.json           "text": "Is there a cup in the image?", "label": "yes"}
                                       3 present + 3 absent objects per image; absent ones are random /
                                       most frequent / most co-occurring with the present ones (POPE's rules)
    synth_chair_instances.json         COCO instances JSON (images, annotations with bbox, categories)
    synth_chair_captions.json          COCO captions JSON (one reference caption per image)
    synth_chair_synonyms.txt           CHAIR synonyms: "canonical, synonym1, synonym2" per line
    synth_chair_prompts.jsonl          images to caption: {"image_id", "image", "text"}
    synth_chair_image_list.txt         the same image ids, one per line (CHAIR's image_list)
    manifest.json                      export settings and the category frequencies used for "popular"

The demo model (:func:`demo_model_path`, :func:`load_demo`) is a ``LlavaForConditionalGeneration``
(CLIP vision tower, 144 visual tokens, Llama decoder) trained by ``scripts/train_demo.py``.
"""

from __future__ import annotations

from attnkit.synth.demo import demo_data_path, demo_model_path, load_demo
from attnkit.synth.export import ExportConfig, export_benchmark
from attnkit.synth.world import CATEGORIES, Scene, SynthWorld, WorldConfig

__all__ = ["CATEGORIES", "ExportConfig", "Scene", "SynthWorld", "WorldConfig", "demo_data_path", "demo_model_path",
           "export_benchmark", "load_demo"]
