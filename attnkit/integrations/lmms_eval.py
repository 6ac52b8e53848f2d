"""lmms-eval 0.7.3 backend: an ``attnkit`` chat model, so any lmms-eval task runs with interventions.

Install (CPU-safe; lmms-eval's own requirements would swap a CPU torch for a CUDA one via torchvision)::

    pip install -e ".[lmms]" && pip install --no-deps lmms-eval==0.7.3

attnkit registers the model through the entry point ``lmms_eval.models`` (``attnkit =
"attnkit.integrations.lmms_eval:manifests"``), then::

    lmms-eval --model attnkit --tasks pope \\
        --model_args 'pretrained=/models/llava-1.5-7b-hf,interventions="var;fastv:k=2,keep=0.5"'

lmms-eval splits ``--model_args`` on commas outside quotes, so a spec with several parameters must be in double
quotes inside the shell's single quotes, as above. model_args: ``pretrained`` (local folder), ``interventions``
(specs joined by ``;``; empty or "baseline" for the unmodified model through the same path), ``dtype``,
``device_map`` / ``device``, ``quantization`` (4bit/8bit), ``output_dir`` (per-sample JSONL; default
``./attnkit_lmms_eval``), ``max_new_tokens`` (used when the task sets none), ``strict`` (true: the first failing
sample ends the run with exit status 1 instead of being answered ""). lmms-eval's own ``batch_size``,
``max_batch_size`` and ``device`` are accepted. ``--batch_size N`` batches for real, as lmms-eval's own models do
with its ``Collator``: requests are grouped by task and generation kwargs (and with/without images), sorted by
prompt length, and each batch is one left-padded ``generate()``; each answer is its row's new tokens up to its
first EOS, so greedy answers equal batch 1's (tested). ``auto`` (``auto:N``): 1 on CPU, 8 on CUDA, at most
``max_batch_size``.

Each response is appended to ``{output_dir}/{task}__{config hash}.jsonl`` (``….rank{r}.jsonl`` per process of a
multi-process run) as soon as it is generated and served from there on a rerun (lmms-eval itself keeps nothing of
a crashed run). The config hash covers the model folder's content (weights, tokenizer, chat template), the
interventions, dtype/quantization and the attnkit version; each row's key is the request's content: the task,
split and doc id, the messages (text and the pixels of every image) and the generation settings, so other data
under the same task name is never served from the store. A failing sample is logged, answered with "" (not
stored, so a rerun retries it) and counted: the count is printed when the requests are done (POPE's precision and
recall silently ignore such answers).

This module does not import lmms-eval: :class:`AttnkitGenerator` does the work on plain request tuples;
``attnkit.integrations.lmms_eval_model.AttnkitLMMS`` is the thin ``lmms`` subclass lmms-eval loads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

MODEL_ID = "attnkit"
CHAT_CLASS_PATH = "attnkit.integrations.lmms_eval_model.AttnkitLMMS"
DEFAULT_OUTPUT_DIR = "attnkit_lmms_eval"
# model_args lmms-eval itself adds (``batch_size``/``max_batch_size``/``device`` from its command line)
LMMS_EVAL_ARGS = ("batch_size", "max_batch_size", "device")
MODEL_ARGS = ("pretrained", "interventions", "dtype", "device_map", "device", "quantization", "output_dir",
              "max_new_tokens", "strict")


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


def image_digest(image: Any) -> str:
    """SHA-256 of an image's mode, size and pixels (a PIL image) or of a file's content (a path)."""
    if isinstance(image, (str, Path)):
        try:
            return hashlib.sha256(Path(image).read_bytes()).hexdigest()
        except OSError:
            return f"unreadable:{image}"
    h = hashlib.sha256(f"{image.mode}|{image.size}|".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def messages_digest(messages: Sequence[Mapping[str, Any]]) -> str:
    """Hash of chat messages as lmms-eval builds them: roles, texts and image pixels (other content by type)."""
    items = []
    for message in messages:
        content = message["content"]
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        for c in content:
            kind = c.get("type")
            if kind == "text":
                items.append([message["role"], "text", c["text"]])
            elif kind == "image":
                items.append([message["role"], "image", image_digest(c.get("url", c.get("image")))])
            else:
                items.append([message["role"], str(kind), repr(c)])
    return _hash(items)


class SampleFailures(SystemExit):
    """``strict=true``: a sample failed. A ``SystemExit`` because lmms-eval's command line logs any ``Exception``
    and exits 0; this ends the run with status 1 and the message."""

    def __init__(self, message: str):
        super().__init__(f"attnkit: error: {message}")
        self.message = message


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
                 max_new_tokens: int = 256, strict: bool = False, rank: int = 0, world_size: int = 1, model=None,
                 processor=None, batch_size: int | None = 1, max_batch_size: int | None = None):
        import attnkit
        from attnkit.eval.fingerprint import HashCache, folder_fingerprint, intervention_files_fingerprint

        self.specs = parse_interventions(interventions)      # bad specs fail before the model loads
        if model is None:
            from attnkit.eval.loading import load_model_and_processor

            model, processor = load_model_and_processor(pretrained, dtype=dtype, device_map=device_map or device,
                                                        quantization=quantization)
        self.model, self.processor = model, processor
        self.max_new_tokens = int(max_new_tokens)
        self.strict = _as_bool(strict, "strict")
        self.rank, self.world_size = int(rank), int(world_size)
        cache = HashCache()
        template = getattr(processor, "chat_template", None)
        self.config = {"model": str(Path(pretrained).resolve()), "interventions": ";".join(self.specs) or "baseline",
                       "dtype": str(dtype), "quantization": quantization, "attnkit": attnkit.__version__,
                       "weights": folder_fingerprint(pretrained, cache), "template": _hash(str(template))}
        files = intervention_files_fingerprint(self.specs, cache)   # calibration files' content
        if files is not None:
            self.config["files"] = files
        cache.save()
        self.config_hash = _hash(self.config)
        self.output_dir = Path(output_dir or DEFAULT_OUTPUT_DIR)
        self._stores: dict[str, tuple[dict[str, dict], Any]] = {}
        self.n_requests = 0
        self.failures: list[str] = []
        self.handle = attnkit.wrap(model, *self.specs)
        if batch_size is None:
            from attnkit.eval.runner import default_batch_size

            batch_size = min(default_batch_size(model.device), max_batch_size or 10**9)
        self.batch_size = int(batch_size)
        unbatchable = [iv.name for iv in self.handle.interventions if not getattr(iv, "batchable", True)]
        if unbatchable and self.batch_size > 1:
            if self.rank == 0:
                print(f"attnkit: {', '.join(unbatchable)} cannot batch exactly (a padded batch would change answers); "
                      f"generating at batch size 1 instead of {self.batch_size}", file=sys.stderr)
            self.batch_size = 1

    # --- persistence -------------------------------------------------------------------------
    def store_path(self, task: str) -> Path:
        """This process's JSONL for ``task`` (``….rank{r}.jsonl`` in a multi-process run)."""
        stem = f"{task}__{self.config_hash}"
        return self.output_dir / (f"{stem}.jsonl" if self.world_size == 1 else f"{stem}.rank{self.rank}.jsonl")

    def _store(self, task: str):
        if task not in self._stores:
            from attnkit.eval.runner import RowWriter, read_rows, repair_jsonl

            self.output_dir.mkdir(parents=True, exist_ok=True)
            path = self.store_path(task)
            repair_jsonl(path, drop_errors=False)
            rows: dict[str, dict] = {}
            for p in sorted(self.output_dir.glob(f"{task}__{self.config_hash}*.jsonl")):   # every rank's rows
                rows.update({r["key"]: r for r in (read_rows(p) if p == path else _read_quietly(p))})
            self._stores[task] = (rows, RowWriter(path))
        return self._stores[task]

    @staticmethod
    def row_key(task: str, split: str, doc_id: int | str, messages: Sequence[Mapping[str, Any]],
                gen_kwargs: Mapping[str, Any]) -> str:
        """The request's content: where it is from, the messages (text and image pixels) and the gen kwargs."""
        return f"{split}/{doc_id}/{_hash([task, messages_digest(messages), gen_kwargs])}"

    # --- requests ----------------------------------------------------------------------------
    def generate_until(self, args_list: Sequence[tuple], task_dict: Mapping) -> list[tuple[str, int | None]]:
        """``(text, new tokens)`` per request, in request order.

        Chat requests: ``(ctx, doc_to_messages, gen_kwargs, doc_id, task, split)``; simple ones:
        ``(ctx, gen_kwargs, doc_to_visual, doc_id, task, split)`` (the images go before the text).
        Stored answers are served; the others are generated in batches of ``batch_size`` (grouped by task, gen
        kwargs and with/without images, sorted by prompt length) and each is stored as soon as its batch is done.
        A failing request is answered ``("", None)`` and counted (``strict``: :class:`SampleFailures`); a batch
        whose ``generate()`` raises is redone one request at a time, so only the failing ones fail.
        """
        from tqdm.auto import tqdm

        out: list[tuple[str, int | None] | None] = [None] * len(args_list)
        failed_before = len(self.failures)
        pending: dict[tuple, list[tuple[int, str, list, dict, tuple]]] = {}
        for i, args in enumerate(args_list):
            ctx, doc_id, task, split = args[0], args[3], args[4], args[5]
            chat = callable(args[1])
            gen_kwargs = dict(args[2] if chat else args[1])
            rows, _ = self._store(task)
            self.n_requests += 1
            try:
                doc = task_dict[task][split][doc_id]
                messages = args[1](doc) if chat else _simple_messages(ctx, args[2](doc))
                key = self.row_key(task, split, doc_id, messages, gen_kwargs)
                if key in rows:
                    out[i] = (rows[key]["text"], rows[key].get("new_tokens"))
                    continue
                hf, images = hf_messages(messages)
                prompt = self.processor.apply_chat_template(hf, add_generation_prompt=True)
            except Exception as e:  # noqa: BLE001 - one bad doc must not end the run
                out[i] = self._failed(f"{task}/{split} doc {doc_id}", e)
                continue
            group = (task, json.dumps(gen_kwargs, sort_keys=True, default=str), bool(images))
            pending.setdefault(group, []).append((i, prompt, images, gen_kwargs, (key, doc_id, split, task)))
        batches = []
        if self.batch_size == 1:                   # request order
            batches = [[it] for it in sorted((it for items in pending.values() for it in items), key=lambda it: it[0])]
        for items in pending.values() if self.batch_size > 1 else ():
            items.sort(key=lambda item: (self._prompt_tokens(item[1]), item[0]))
            batches += [items[j:j + self.batch_size] for j in range(0, len(items), self.batch_size)]
        total = sum(len(b) for b in batches)
        with tqdm(total=total, desc="attnkit generate_until", disable=total < 2) as bar:
            for batch in batches:
                for (i, _, _, _, (key, doc_id, split, task)), result in zip(batch, self._generate_batch(batch),
                                                                            strict=True):
                    if isinstance(result, Exception):
                        out[i] = self._failed(f"{task}/{split} doc {doc_id}", result)
                    else:
                        rows, writer = self._store(task)
                        row = {"key": key, "doc_id": doc_id, "split": split, "text": result[0],
                               "new_tokens": result[1]}
                        writer.write(row)
                        rows[key] = row
                        out[i] = result
                    bar.update(1)
        new_failures = len(self.failures) - failed_before
        if new_failures:
            print(f"attnkit: {new_failures} of {len(args_list)} request(s) failed and were answered \"\" (lmms-eval "
                  f"scores them as wrong answers; POPE's precision/recall ignore them), e.g. "
                  f"{self.failures[failed_before]}; model_args strict=true makes a failure end the run",
                  file=sys.stderr)
        return out

    def _failed(self, what: str, e: Exception) -> tuple[str, None]:
        what = f"{what} failed: {type(e).__name__}: {e}"
        self.failures.append(what)
        if self.strict:
            raise SampleFailures(f"{what} (strict=true)") from e
        log.warning("attnkit: %s", what)
        return ("", None)

    def _prompt_tokens(self, prompt: str) -> int:
        tok = getattr(self.processor, "tokenizer", self.processor)
        try:
            return len(tok(prompt)["input_ids"])
        except Exception:  # noqa: BLE001 - only a sort key
            return 0

    def _generate_batch(self, batch: Sequence[tuple]) -> list[tuple[str, int] | Exception]:
        """One batch (items of one group), or, if its ``generate()`` raises, each item alone."""
        prompts, images = [item[1] for item in batch], [item[2] for item in batch]
        try:
            return self.generate_prompts(prompts, images, batch[0][3])
        except Exception as e:  # noqa: BLE001 - redone one by one: only the failing requests fail
            if len(batch) == 1:
                return [e]
        results: list[tuple[str, int] | Exception] = []
        for prompt, imgs, item in zip(prompts, images, batch, strict=True):
            try:
                results += self.generate_prompts([prompt], [imgs], item[3])
            except Exception as e:  # noqa: BLE001
                results.append(e)
        return results

    def generate(self, messages: Sequence[Mapping[str, Any]], gen_kwargs: Mapping[str, Any]) -> tuple[str, int]:
        """One chat through the processor and ``generate()``; stops at the task's ``until`` strings."""
        hf, images = hf_messages(messages)
        prompt = self.processor.apply_chat_template(hf, add_generation_prompt=True)
        return self.generate_prompts([prompt], [images], gen_kwargs)[0]

    def generate_prompts(self, prompts: Sequence[str], images: Sequence[list], gen_kwargs: Mapping[str, Any]
                         ) -> list[tuple[str, int]]:
        """Chat-templated prompts (each with its images) as one left-padded ``generate()``; per prompt its text (cut at
        the task's ``until`` strings) and its new tokens up to its first EOS."""
        from attnkit.eval.runner import eos_ids, until_eos
        from attnkit.models.prompts import padding_side

        kwargs = dict(gen_kwargs)
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        flat = [im for ims in images for im in ims]
        extra = {"padding": True} if len(prompts) > 1 else {}
        with padding_side(self.processor, "left"):
            inputs = (self.processor(images=flat, text=list(prompts), return_tensors="pt", **extra) if flat
                      else self.processor(text=list(prompts), return_tensors="pt", **extra))
        inputs = inputs.to(self.model.device)
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
        eos, results = eos_ids(self.model), []
        for b in range(len(prompts)):
            new = until_eos(out[b, inputs["input_ids"].shape[1]:], eos)
            text = self.processor.decode(new, skip_special_tokens=True)
            for stop in until:
                if stop:
                    text = text.split(stop)[0]
            results.append((text.strip(), int(new.numel())))
        return results

    def close(self) -> None:
        """Remove the interventions and close the JSONL files."""
        self.handle.remove()
        for _, writer in self._stores.values():
            writer.close()
        self._stores.clear()


def _simple_messages(ctx: str, visuals: Sequence | None) -> list[dict]:
    content: list[dict] = [{"type": "image", "url": v} for v in (visuals or [])]
    return [{"role": "user", "content": [*content, {"type": "text", "text": ctx}]}]


def _read_quietly(path: Path) -> list[dict]:
    """Another process's rows (it may be appending: a torn last line is skipped, as read_rows does)."""
    from attnkit.eval.runner import read_rows

    try:
        return read_rows(path)
    except (OSError, ValueError):
        return []


def _as_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError(f"model_args {name}={value!r}: use true or false")


def generator_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """model_args as lmms-eval passes them (strings, ints, bools) -> :class:`AttnkitGenerator` keywords.

    lmms-eval's own ``batch_size`` / ``max_batch_size`` are accepted here and dropped (the ``lmms`` class passes them
    on itself, see :func:`batch_size_of`).
    """
    unknown = sorted(set(kwargs) - set(MODEL_ARGS) - set(LMMS_EVAL_ARGS))
    if unknown:
        hint = ""
        if "interventions" in kwargs:
            shown = ",".join(f"{k}={kwargs[k]}" for k in unknown)
            hint = (f"; if {shown} belong to the interventions spec: lmms-eval splits --model_args on commas "
                    f"outside quotes, so quote the spec: --model_args 'pretrained=PATH,interventions="
                    f"\"{kwargs['interventions']},{shown}\"'")
        raise ValueError(f"unknown model_args {unknown} for the attnkit lmms-eval model; allowed: "
                         f"{', '.join(sorted(set(MODEL_ARGS) | set(LMMS_EVAL_ARGS)))}{hint}")
    out = {k: v for k, v in kwargs.items() if k in MODEL_ARGS and v is not None}
    if isinstance(out.get("interventions"), str):
        out["interventions"] = out["interventions"].strip().strip("'\"")
    return out


def batch_size_of(value: Any) -> int | None:
    """lmms-eval hands ``--batch_size`` over as a string ("1", "4", "auto", "auto:4"): the size, or None for auto
    (:class:`AttnkitGenerator` then picks 1 on CPU, 8 on CUDA, at most ``max_batch_size``)."""
    if value is None:
        return 1
    if value == "auto" or str(value).startswith("auto:"):
        return None
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"batch_size={value!r}: give a positive integer or auto") from None
    if size < 1:
        raise ValueError(f"batch_size={value!r}: give a positive integer or auto")
    return size
