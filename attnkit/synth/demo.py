"""The demo model and benchmark that ship inside the package (offline, no hub)."""

from __future__ import annotations

from pathlib import Path

_ASSETS = Path(__file__).resolve().parent.parent / "assets" / "demo"


def demo_model_path() -> Path:
    """Folder of the trained demo model (``save_pretrained`` output of ``scripts/train_demo.py``)."""
    return _ASSETS / "model"


DEMO_DATA = {"clean": "data", "prone": "data_prone"}


def demo_data_path(kind: str = "clean") -> Path:
    """Folder of a held-out demo benchmark (POPE splits, CHAIR files, ``images/``).

    ``"clean"``: the default export; ``"prone"``: ``ExportConfig(difficulty="prone")``, where small, faint
    objects and look-alike clutter leave the model's co-occurrence prior to decide (``scripts/export_demo.py``).
    """
    if kind not in DEMO_DATA:
        raise ValueError(f"kind={kind!r}; allowed: {', '.join(map(repr, DEMO_DATA))}")
    return _ASSETS / DEMO_DATA[kind]


def load_demo(dtype=None):
    """``(model, processor)`` of the demo model, loaded with ``from_pretrained`` from the package, in eval mode."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = demo_model_path()
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no demo model at {path}; train it with `python scripts/train_demo.py --out {path}`")
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype or torch.float32, local_files_only=True)
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    return model.eval(), processor
