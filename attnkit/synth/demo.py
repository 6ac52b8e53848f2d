"""The demo model and benchmark that ship inside the package (offline, no hub)."""

from __future__ import annotations

from pathlib import Path

_ASSETS = Path(__file__).resolve().parent.parent / "assets" / "demo"


def demo_model_path() -> Path:
    """Folder of the trained demo model (``save_pretrained`` output of ``scripts/train_demo.py``)."""
    return _ASSETS / "model"


def demo_data_path() -> Path:
    """Folder of the held-out demo benchmark (POPE splits, CHAIR files, ``images/``)."""
    return _ASSETS / "data"


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
