"""lmms-eval 0.7.3 backend: an ``attnkit`` chat model, so any lmms-eval task runs with interventions.

Install lmms-eval without its dependencies (they replace a CPU torch; see the docs), add attnkit's entry
point (group ``lmms_eval.models``: ``attnkit = "attnkit.integrations.lmms_eval:manifests"``), then::

    lmms-eval --model attnkit --tasks pope \\
        --model_args pretrained=/models/llava-1.5-7b-hf,interventions="var;cls-prune:keep=64"

model_args: ``pretrained`` (local folder), ``interventions`` (specs joined by ``;``; empty or "baseline"
for the unmodified model through the same path), ``dtype``, ``device_map`` / ``device``,
``quantization`` (4bit/8bit), ``output_dir`` (per-sample JSONL; default ``./attnkit_lmms_eval``),
``max_new_tokens`` (used when the task sets none). Each response is appended to
``{output_dir}/{task}__{config hash}.jsonl`` as soon as it is generated and served from there on a rerun
(lmms-eval itself keeps nothing of a crashed run); the hash covers the model path, the interventions,
dtype/quantization and the attnkit version, and each row's key adds the split, doc id and gen kwargs.
A failing sample is logged and answered with "" (not stored, so a rerun retries it).

This module does not import lmms-eval: :class:`AttnkitGenerator` does the work on plain request tuples;
``attnkit.integrations.lmms_eval_model.AttnkitLMMS`` is the thin ``lmms`` subclass lmms-eval loads.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

MODEL_ID = "attnkit"
CHAT_CLASS_PATH = "attnkit.integrations.lmms_eval_model.AttnkitLMMS"
DEFAULT_OUTPUT_DIR = "attnkit_lmms_eval"


def manifests():
    """Entry-point target (group ``lmms_eval.models``): the ``attnkit`` chat model's manifest."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_ID, chat_class_path=CHAT_CLASS_PATH)]


def parse_interventions(text: str | None) -> list[str]:
    """``"var;cls-prune:keep=64"`` -> canonical specs (validated by the registry); ``""``/``"baseline"`` -> ``[]``."""
    from attnkit.eval.runner import canonical, split_specs

    config = canonical((text or "").strip().strip("'\"") or "baseline")   # model_args may keep the quotes
    return split_specs(config)


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def hf_messages(messages: Sequence[Mapping[str, Any]]) -> tuple[list[dict], list]:
    """lmms-eval chat messages (content items ``{"type": "image", "url": PIL}``) -> HF chat messages with
    ``{"type": "image"}`` placeholders, and the images in order."""
    from attnkit.models.prompts import open_image

    out, images = [], []
    for message in messages:
        content = message["content"]
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        items = []
        for c in content:
            kind = c.get("type")
            if kind == "text":
                items.append({"type": "text", "text": c["text"]})
            elif kind == "image":
                image = c.get("url", c.get("image"))
                images.append(open_image(image) if isinstance(image, (str, Path)) else image.convert("RGB"))
                items.append({"type": "image"})
            else:
                raise ValueError(f"attnkit's lmms-eval model handles text and images, not {kind!r} content")
        out.append({"role": message["role"], "content": items})
    return out, images


class AttnkitGenerator:
    """Loads a model, wraps it with the interventions for its lifetime, answers ``generate_until`` requests."""

    def __init__(self, pretrained: str, interventions: str = "", dtype: str = "auto", device_map: str | None = None,
                 device: str | None = None, quantization: str | None = None, output_dir: str | None = None,
                 max_new_tokens: int = 256, model=None, processor=None):
        import attnkit

        self.specs = parse_interventions(interventions)      # bad specs fail before the model loads
        if model is None:
            from attnkit.eval.loading import load_model_and_processor

            model, processor = load_model_and_processor(pretrained, dtype=dtype, device_map=device_map or device,
                                                        quantization=quantization)
        self.model, self.processor = model, processor
        self.max_new_tokens = int(max_new_tokens)
        self.config = {"model": str(Path(pretrained).resolve()), "interventions": ";".join(self.specs) or "baseline",
                       "dtype": str(dtype), "quantization": quantization, "attnkit": attnkit.__version__}
        self.config_hash = _hash(self.config)
        self.output_dir = Path(output_dir or DEFAULT_OUTPUT_DIR)
        self._stores: dict[str, tuple[dict[str, dict], Any]] = {}
        self.handle = attnkit.wrap(model, *self.specs)

    # --- persistence -------------------------------------------------------------------------
    def store_path(self, task: str) -> Path:
        return self.output_dir / f"{task}__{self.config_hash}.jsonl"

    def _store(self, task: str):
        if task not in self._stores:
            from attnkit.eval.runner import RowWriter, read_rows, repair_jsonl

            self.output_dir.mkdir(parents=True, exist_ok=True)
            path = self.store_path(task)
            repair_jsonl(path, drop_errors=False)
            rows = {r["key"]: r for r in read_rows(path)}
            self._stores[task] = (rows, RowWriter(path))
        return self._stores[task]

    @staticmethod
    def row_key(split: str, doc_id: int | str, gen_kwargs: Mapping[str, Any]) -> str:
        return f"{split}/{doc_id}/{_hash(gen_kwargs)}"

    # --- requests ----------------------------------------------------------------------------
    def generate_until(self, args_list: Sequence[tuple], task_dict: Mapping) -> list[tuple[str, int | None]]:
        """``(text, new tokens)`` per request, in request order.

        Chat requests: ``(ctx, doc_to_messages, gen_kwargs, doc_id, task, split)``; simple ones:
        ``(ctx, gen_kwargs, doc_to_visual, doc_id, task, split)`` (the images go before the text).
        """
        from tqdm.auto import tqdm

        out = []
        for args in tqdm(args_list, desc="attnkit generate_until", disable=len(args_list) < 2):
            ctx, doc_id, task, split = args[0], args[3], args[4], args[5]
            chat = callable(args[1])
            gen_kwargs = dict(args[2] if chat else args[1])
            rows, writer = self._store(task)
            key = self.row_key(split, doc_id, gen_kwargs)
            if key in rows:
                out.append((rows[key]["text"], rows[key].get("new_tokens")))
                continue
            try:
                doc = task_dict[task][split][doc_id]
                messages = args[1](doc) if chat else _simple_messages(ctx, args[2](doc))
                text, n_new = self.generate(messages, gen_kwargs)
            except Exception as e:  # noqa: BLE001 - one bad doc must not end the run
                log.warning("attnkit: %s/%s doc %s failed: %s: %s", task, split, doc_id, type(e).__name__, e)
                out.append(("", None))
                continue
            row = {"key": key, "doc_id": doc_id, "split": split, "text": text, "new_tokens": n_new}
            writer.write(row)
            rows[key] = row
            out.append((text, n_new))
        return out

    def generate(self, messages: Sequence[Mapping[str, Any]], gen_kwargs: Mapping[str, Any]) -> tuple[str, int]:
        """One chat through the processor and ``generate()``; stops at the task's ``until`` strings."""
        kwargs = dict(gen_kwargs)
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        hf, images = hf_messages(messages)
        prompt = self.processor.apply_chat_template(hf, add_generation_prompt=True)
        inputs = (self.processor(images=images, text=[prompt], return_tensors="pt") if images
                  else self.processor(text=[prompt], return_tensors="pt")).to(self.model.device)
        temperature = float(kwargs.get("temperature") or 0)
        sample = bool(kwargs.get("do_sample", False)) and temperature > 0
        options: dict[str, Any] = {"max_new_tokens": int(kwargs.get("max_new_tokens") or self.max_new_tokens),
                                   "num_beams": int(kwargs.get("num_beams") or 1), "do_sample": sample}
        if sample:
            options["temperature"] = temperature
            if kwargs.get("top_p"):
                options["top_p"] = float(kwargs["top_p"])
        tok = getattr(self.processor, "tokenizer", self.processor)
        with torch.inference_mode():
            out = self.model.generate(**inputs, pad_token_id=tok.pad_token_id, **options)
        new = out[0, inputs["input_ids"].shape[1]:]
        text = self.processor.decode(new, skip_special_tokens=True)
        for stop in until:
            if stop:
                text = text.split(stop)[0]
        return text.strip(), int(new.numel())

    def close(self) -> None:
        """Remove the interventions and close the JSONL files."""
        self.handle.remove()
        for _, writer in self._stores.values():
            writer.close()
        self._stores.clear()


def _simple_messages(ctx: str, visuals: Sequence | None) -> list[dict]:
    content: list[dict] = [{"type": "image", "url": v} for v in (visuals or [])]
    return [{"role": "user", "content": [*content, {"type": "text", "text": ctx}]}]


def generator_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """model_args as lmms-eval passes them (strings, ints, bools) -> :class:`AttnkitGenerator` keywords."""
    allowed = {"pretrained", "interventions", "dtype", "device_map", "device", "quantization", "output_dir",
               "max_new_tokens"}
    unknown = sorted(set(kwargs) - allowed - {"batch_size"})
    if unknown:
        raise ValueError(f"unknown model_args {unknown} for the attnkit lmms-eval model; allowed: "
                         f"{', '.join(sorted(allowed | {'batch_size'}))}")
    out = {k: v for k, v in kwargs.items() if k in allowed and v is not None}
    if isinstance(out.get("interventions"), str):
        out["interventions"] = out["interventions"].strip().strip("'\"")
    return out


def batch_size_of(value: Any) -> int:
    """lmms-eval hands ``--batch_size`` over as a string ("1", "auto"); attnkit generates one sample at a time."""
    if value in (None, "auto"):
        return 1
    size = int(value)
    if size != 1:
        log.warning("attnkit's lmms-eval model generates one sample at a time; batch_size=%s is ignored", size)
    return 1

