"""The README's "Adding a method" recipes run as written: each defines a method that wraps a tiny model."""

from __future__ import annotations

import re
from pathlib import Path

import torch

import attnkit
from attnkit import testing
from attnkit.interventions.base import REGISTRY

README = Path(__file__).resolve().parent.parent / "README.md"


def _recipes() -> list[str]:
    section = README.read_text().split("### Adding a method", 1)[1].split("\n## ", 1)[0]
    return [re.sub(r"(?m)^   ", "", block) for block in re.findall(r"```python\n(.*?)```", section, re.S)]


def test_adding_a_method_recipes_run(tiny):
    import dataclasses

    from attnkit.interventions.base import Intervention, param, register
    from attnkit.interventions.pruning import Pruner, count

    recipes = _recipes()
    assert len(recipes) == 2
    model, processor = tiny("llava")
    inputs = testing.tiny_inputs(processor, batch=2)
    with torch.no_grad():
        base = model(**inputs).logits
    names = ("amplify", "top-by-score")
    try:
        for code, name in zip(recipes, names):
            scope = dict(dataclasses=dataclasses, torch=torch, Intervention=Intervention, Pruner=Pruner, param=param,
                         register=register, count=count)
            exec(code, scope)
            with attnkit.intervene(model, name) as handle, torch.no_grad():
                logits = model(**inputs).logits
                stats = handle.stats()[name]
            assert not torch.allclose(logits, base)
        assert stats["visual_tokens_kept"] == [4, 4]
    finally:
        for name in names:
            REGISTRY.pop(name, None)
