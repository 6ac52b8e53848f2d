"""The eval runner: one model load, the same samples / seed / greedy decoding for the baseline and each config.

Each (benchmark, config) writes one JSONL in the output folder, ``{bench}__{label}__{hash}.jsonl``, where the
hash covers everything that decides a row: the interventions (with the content of a calibration file one names),
the benchmark and its options, the data (every
sample's question, answer and the content of the image it reads, before ``limit``/``splits``), the model folder's
content (weights, config, tokenizer, chat template; see :mod:`attnkit.eval.fingerprint`), the processor's chat
template, the decoding, dtype/quantization and the attnkit version. Rows of another key in the same folder are
never served; the run says in one line whether it resumes or starts fresh next to them.
Rows are appended, flushed and fsync'ed one sample at a time, so a killed run resumes where it stopped: ids
already in the file are skipped, a torn last line is dropped. A sample that fails (unreadable image, an
exception in generate) becomes ``{"id": ..., "error": ...}`` and the run goes on; error rows are retried
only with ``retry_errors=True``.

Data-parallel (``accelerate launch``): each process takes ``samples[rank::world]`` and writes
``….rank{r}.jsonl``; rank 0 merges them into the main file at the end.

Batches (``batch_size``; default :func:`default_batch_size`: 1 on CPU, 8 on CUDA): the samples still to do are
sorted by (generation budget, chat-prompt text tokens, image size, order), cut into batches of one budget, left-padded,
and decoded greedily by one ``generate()`` on the wrapped model. Each sample's row is its own answer: its new tokens up
to its first EOS. Answers do not depend on the batch size (the interventions keep per-sample kept sets; tested), so the
batch size is not part of the hash; an intervention whose class says ``batchable = False`` runs at batch 1 (said once).
An image that cannot be opened fails its own sample only; a batch whose ``generate()`` raises is redone one sample at a
time, so only the failing samples become error rows. Configs take turns over chunks of ``INTERLEAVE_BATCHES`` batches
(rows still one file per config), so load that drifts during a run hits every config alike.

Costs per row (names the report reads): ``prompt_tokens`` (this sample's prompt, no padding), ``layer_tokens``
(per decoder layer, the prompt tokens it processed at prefill after any dropping: the handle's ``layer_tokens``),
``new_tokens``, ``visual_tokens`` (``visual_tokens_kept`` from an intervention's stats if one reports it, else the
handle's count), ``batch_size`` (samples in the ``generate()`` that produced the row), and this sample's share of
that batch's wall time: ``prefill_ms`` = batch prefill / batch size, ``decode_ms_per_token`` = (batch wall time after
prefill / decode steps) / batch size, ``total_ms`` = batch wall time / batch size; ``peak_mem_mb``: CUDA
``max_memory_allocated`` during the batch's ``generate()`` (the batch's peak, not divided); None on CPU, where torch
keeps no allocator statistics (process RSS is allocator noise, not the run's memory).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from attnkit.eval.costs import text_dims
from attnkit.eval.fingerprint import (
    HashCache,
    digest,
    folder_fingerprint,
    intervention_files_fingerprint,
    options_fingerprint,
    samples_fingerprint,
)
from attnkit.models.prompts import build_inputs, chat_prompt, open_image

BASELINE = "baseline"
INTERLEAVE_BATCHES = 8      # batches of one config before the next config's turn


# --- configs -------------------------------------------------------------------------------------
def split_specs(config: str) -> list[str]:
    """``"var;cls-prune:keep=64"`` -> ``["var", "cls-prune:keep=64"]``; ``"baseline"`` / ``""`` -> ``[]``."""
    parts = [p.strip() for p in config.split(";") if p.strip()]
    return [] if parts in ([], [BASELINE]) else parts


def canonical(config: str) -> str:
    """The config with each intervention rebuilt from the registry (validates it; raises on a bad spec)."""
    from attnkit.interventions import build

    specs = split_specs(config)
    if BASELINE in specs:
        raise ValueError(f"{config!r}: 'baseline' cannot be combined with interventions")
    return ";".join(build(s).spec() for s in specs) or BASELINE


@dataclass(frozen=True)
class RunSettings:
    """What, besides the config, decides a row: part of the file's hash."""

    model_path: str
    max_new_tokens: int | None = None    # None: the benchmark's
    seed: int = 0
    dtype: str = "auto"
    quantization: str | None = None

    def __post_init__(self):
        if self.max_new_tokens is not None and (isinstance(self.max_new_tokens, bool)
                                                or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1):
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r}: must be a positive integer (or None for the "
                             "benchmark's budget)")


@dataclass(frozen=True)
class RunKey:
    """What decides a row. ``fingerprints``: ``data``, ``options``, ``weights``, ``template`` (see
    :func:`fingerprints`); each is part of :meth:`digest`."""

    bench: str
    config: str           # canonical
    settings: RunSettings
    max_new_tokens: int
    fingerprints: dict[str, str | None] = field(default_factory=dict)

    def payload(self) -> dict[str, Any]:
        import attnkit

        return {"bench": self.bench, "config": self.config, "model": str(Path(self.settings.model_path).resolve()),
                "decoding": {"greedy": True, "max_new_tokens": self.max_new_tokens, "seed": self.settings.seed},
                "dtype": self.settings.dtype, "quantization": self.settings.quantization,
                "attnkit": attnkit.__version__, **{k: self.fingerprints[k] for k in sorted(self.fingerprints)}}

    def digest(self) -> str:
        return digest(self.payload())[:12]

    def stem(self) -> str:
        label = re.sub(r"[^A-Za-z0-9.=+-]+", "_", self.config)[:80]
        return f"{self.bench}__{label}__{self.digest()}"


# --- JSONL persistence ---------------------------------------------------------------------------
def read_rows(path: Path) -> list[dict]:
    """Rows of a JSONL file; a torn (unparseable) last line is ignored, a bad line elsewhere raises."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}:{i + 1}: not valid JSON; delete the file to restart this config") from None
    return rows


def write_rows(path: Path, rows: Sequence[dict]) -> None:
    """Replace ``path`` atomically with ``rows``."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def repair_jsonl(path: Path, drop_errors: bool) -> None:
    """Rewrite ``path`` without a torn last line (and without error rows if asked), so appends start clean."""
    if not path.exists():
        return
    text = path.read_text()
    rows = read_rows(path)
    torn = bool(text) and not text.endswith("\n")
    if torn or (drop_errors and any("error" in r for r in rows)):
        write_rows(path, [r for r in rows if not (drop_errors and "error" in r)])


class RowWriter:
    """Append rows to a JSONL file: one write, flush and fsync per row."""

    def __init__(self, path: Path):
        self.path = path
        self._f = open(path, "a")

    def write(self, row: dict) -> None:
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


def merge_rows(row_lists: Sequence[Sequence[dict]]) -> list[dict]:
    """One row per id, first-seen order; a success row beats an error row, a later row an earlier one."""
    best: dict[str, dict] = {}
    for rows in row_lists:
        for row in rows:
            old = best.get(row["id"])
            if old is None or "error" in old or "error" not in row:
                best[row["id"]] = row
    return list(best.values())


def shard_paths(main: Path) -> list[Path]:
    return sorted(main.parent.glob(main.stem + ".rank*.jsonl"))


def merge_shards(main: Path, order: Sequence[str] | None = None) -> list[dict]:
    """Fold ``main``'s per-rank files into ``main`` (atomically) and delete them; returns the merged rows, in
    ``order`` of ids if given (ids not in it after, as found), so a file reads the same whatever the batching."""
    shards = shard_paths(main)
    rows = merge_rows([read_rows(main)] + [read_rows(p) for p in shards])
    if order is not None:
        rank = {i: n for n, i in enumerate(order)}
        rows = sorted(rows, key=lambda r: rank.get(r["id"], len(rank)))
    if shards or main.exists():
        write_rows(main, rows)
    for p in shards:
        p.unlink()
    return rows


@dataclass(frozen=True)
class Shard:
    """This process's part of the samples: ``samples[rank::world]``."""

    rank: int = 0
    world: int = 1

    @classmethod
    def from_accelerate(cls) -> Shard:
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls()
        from accelerate import PartialState

        state = PartialState()
        return cls(state.process_index, state.num_processes)

    def take(self, samples: Sequence) -> list:
        return list(samples[self.rank::self.world])

    def path(self, main: Path) -> Path:
        return main if self.world == 1 else main.with_name(f"{main.stem}.rank{self.rank}.jsonl")

    def barrier(self) -> None:
        if self.world > 1:
            from accelerate import PartialState

            PartialState().wait_for_everyone()


# --- costs ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[dict]:
    """``{"mb": ...}`` after the block: CUDA ``max_memory_allocated``; None on CPU (torch keeps no CPU allocator
    statistics, and process RSS measures the allocator, not the run)."""
    out: dict[str, float | None] = {"mb": None}
    if device.type != "cuda":
        yield out
        return
    torch.cuda.reset_peak_memory_stats(device)
    yield out
    out["mb"] = torch.cuda.max_memory_allocated(device) / 2**20


MEMORY_NOTE = {"cuda": "CUDA max_memory_allocated (peak of the batch)",
               "cpu": "n/a on CPU (torch keeps no CPU allocator statistics)"}


def default_batch_size(device: torch.device | str) -> int:
    """1 on CPU (batching buys little on few cores and keeps per-sample costs plain), 8 on CUDA."""
    return 8 if torch.device(device).type == "cuda" else 1


def visual_tokens(stats: dict[str, Any], sample: int = 0) -> int | None:
    """Visual tokens the LLM saw in sample ``sample`` of the batch: an intervention's ``visual_tokens_kept`` if
    reported, else the handle's count."""
    for value in stats.values():
        if isinstance(value, dict) and value.get("visual_tokens_kept") is not None:
            return _nth(value["visual_tokens_kept"], sample)
    return _nth(stats.get("visual_tokens"), sample)


def _nth(v, i: int):
    if isinstance(v, (list, tuple)):
        return int(v[i]) if len(v) > i else None
    return None if v is None else int(v)


# --- one batch ---------------------------------------------------------------------------------
class ImageError(OSError):
    """A sample's image cannot be opened or decoded; the message names the file."""


def sample_image(sample):
    """The sample's image opened as RGB (None without one); :class:`ImageError` naming the file if it fails."""
    try:
        return open_image(sample.image)
    except Exception as e:  # noqa: BLE001 - re-raised with the file's name
        raise ImageError(f"cannot read image {sample.image}: {type(e).__name__}: {e}") from e


def generate_one(model, processor, handle, sample, max_new_tokens: int, seed: int) -> dict[str, Any]:
    """Greedy-decode one sample on a wrapped model; the prediction and its costs (:func:`generate_batch` of 1)."""
    return generate_batch(model, processor, handle, [sample], [sample_image(sample)], max_new_tokens, seed)[0]


def generate_batch(model, processor, handle, samples: Sequence, images: Sequence, max_new_tokens: int,
                   seed: int) -> list[dict[str, Any]]:
    """Greedy-decode a left-padded batch on a wrapped model in one ``generate()``; per sample its prediction (its
    new tokens up to its first EOS) and its costs (see the module docstring for how batch costs are shared)."""
    inputs = build_inputs(processor, [s.question for s in samples], list(images)).to(model.device)
    torch.manual_seed(seed)           # greedy: only for anything random inside an intervention
    pad = getattr(getattr(processor, "tokenizer", processor), "pad_token_id", None)
    with peak_memory(model.device) as mem, torch.inference_mode():
        t0 = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             pad_token_id=pad)
        total_ms = (time.perf_counter() - t0) * 1e3
    n = len(samples)
    stats = handle.stats()
    prefill = stats.get("prefill_ms")
    steps = stats.get("decode_steps") or 0
    decode = (total_ms - prefill) / steps / n if steps and prefill is not None else None
    layer_tokens = stats.get("layer_tokens")
    prompt_tokens = inputs["attention_mask"].sum(1).tolist()
    eos = eos_ids(model)
    rows = []
    for b in range(n):
        new = until_eos(out[b, inputs["input_ids"].shape[1]:], eos)
        rows.append({"prediction": processor.decode(new, skip_special_tokens=True).strip(),
                     "new_tokens": int(new.numel()), "prompt_tokens": int(prompt_tokens[b]),
                     "layer_tokens": layer_tokens[b] if layer_tokens is not None else None,
                     "visual_tokens": visual_tokens(stats, b), "batch_size": n,
                     "prefill_ms": prefill / n if prefill is not None else None, "decode_ms_per_token": decode,
                     "total_ms": total_ms / n, "peak_mem_mb": mem["mb"]})
    return rows


def eos_ids(model) -> set[int]:
    """The token ids that end a row in ``model.generate()`` (its generation config's ``eos_token_id``)."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


def until_eos(new: torch.Tensor, eos: set[int]) -> torch.Tensor:
    """A row's new tokens up to and including its first EOS (what ``generate()`` returns for it alone; the rest is
    the batch's padding while other rows finish)."""
    for i, token in enumerate(new.tolist()):
        if token in eos:
            return new[: i + 1]
    return new


# --- a run ---------------------------------------------------------------------------------------
@dataclass
class ConfigResult:
    """The scored outcome of one (benchmark, config)."""

    bench: str
    config: str
    path: str
    n: int
    n_errors: int
    metrics: dict[str, float]
    costs: dict[str, float | None]
    errors: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


COST_KEYS = ("visual_tokens", "prompt_tokens", "prefill_ms", "decode_ms_per_token", "peak_mem_mb", "prefill_tflops",
             "kv_cache_mb")
SPREAD_KEYS = ("prefill_ms", "decode_ms_per_token")     # median with ``_p10`` / ``_p90`` over samples


def summarize_costs(rows: Sequence[dict], dims: dict[str, int] | None = None) -> dict[str, float | None]:
    """Per config over successful rows: ``prefill_ms`` and ``decode_ms_per_token`` as the median with ``…_p10`` /
    ``…_p90`` (the spread over samples); ``visual_tokens`` / ``prompt_tokens`` and the analytic ``prefill_tflops``
    / ``kv_cache_mb`` (:mod:`attnkit.eval.costs`, from each row's ``layer_tokens`` and the LLM's ``dims``) as
    means; ``peak_mem_mb`` the max (None when no row has one, e.g. on CPU)."""
    from attnkit.eval.costs import sample_costs, spread

    rows = [{**r, **sample_costs(r, dims)} for r in rows]
    out: dict[str, float | None] = {}
    for key in COST_KEYS:
        vals = [float(r[key]) for r in rows if r.get(key) is not None]
        if key in SPREAD_KEYS:
            s = spread(vals)
            out[key], out[f"{key}_p10"], out[f"{key}_p90"] = s["median"], s["p10"], s["p90"]
        elif key == "peak_mem_mb":
            out[key] = max(vals) if vals else None
        else:
            out[key] = sum(vals) / len(vals) if vals else None
    return out


def score(bench, samples: Sequence, rows: Sequence[dict], config: str, path: Path,
          dims: dict[str, int] | None = None) -> ConfigResult:
    """The benchmark's metrics over this run's samples (error rows have no prediction), and the costs
    (:func:`summarize_costs`; ``dims``: :func:`attnkit.eval.costs.text_dims` of the model, for FLOPs and KV bytes)."""
    by_id = {r["id"]: r for r in rows}
    ran = [s for s in samples if s.id in by_id]
    ok = [s for s in ran if "error" not in by_id[s.id]]
    errors = [by_id[s.id] for s in ran if "error" in by_id[s.id]]
    preds = {s.id: by_id[s.id]["prediction"] for s in ok}
    metrics = bench.score(ran, preds) if ok else {}
    return ConfigResult(bench.name, config, str(path), len(ok), len(errors), dict(metrics),
                        summarize_costs([by_id[s.id] for s in ok], dims), errors)


def load_samples(bench) -> list:
    samples = bench.samples()
    if not samples:
        where = getattr(bench, "data_dir", None)
        raise ValueError(f"benchmark {bench.name!r} has no samples" + (f" in {where}" if where else "")
                         + "; check the data folder (and --splits / --limit)")
    ids = [s.id for s in samples]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"benchmark {bench.name!r} has duplicate sample id {dup!r}; ids must be unique")
    return samples


def fingerprints(bench, samples: Sequence, processor, settings: RunSettings,
                 cache: HashCache | None = None) -> dict[str, str | None]:
    """The content fingerprints of a run: ``data`` (all of the benchmark's samples, before ``limit`` and
    ``splits``, with the content hash of each image), ``options`` (the benchmark's options), ``weights`` (every
    file of the model folder) and ``template`` (the processor's chat template)."""
    cache = cache or HashCache()
    try:
        fingerprints_of = {"data": samples_fingerprint(_unlimited(bench, samples), cache),
                           "options": options_fingerprint(getattr(bench, "options", None)),
                           "weights": folder_fingerprint(settings.model_path, cache),
                           "template": _template_hash(processor)}
    finally:
        cache.save()
    return fingerprints_of


def _unlimited(bench, samples: Sequence) -> Sequence:
    """Every sample of ``bench``, ignoring ``limit`` and ``splits`` (so changing them resumes, not restarts)."""
    if getattr(bench, "limit", None) is None and getattr(bench, "splits", None) is None:
        return samples
    full = copy.copy(bench)
    full.limit, full.splits = None, None
    return full.samples()


def _template_hash(processor) -> str | None:
    templates = [getattr(processor, "chat_template", None),
                 getattr(getattr(processor, "tokenizer", None), "chat_template", None)]
    return digest([str(t) if t is not None else None for t in templates])[:16] if processor is not None else None


class ConfigRun:
    """One (benchmark, config) of a run: its key and JSONL, the samples still to do cut into batches, its writer.

    ``prints``: :func:`fingerprints` of this run (computed here if not given).
    """

    def __init__(self, model, processor, bench, samples: Sequence, config: str, out_dir: Path,
                 settings: RunSettings, *, shard: Shard = Shard(), retry_errors: bool = False,
                 prints: dict[str, str | None] | None = None, log: Callable[[str], None] | None = None,
                 batch_size: int = 1):
        from attnkit.interventions import build

        self.model, self.processor, self.bench, self.settings = model, processor, bench, settings
        max_new = settings.max_new_tokens or bench.max_new_tokens
        if prints is None:
            prints = fingerprints(bench, samples, processor, settings)
        prints, cache = dict(prints), HashCache()
        files = intervention_files_fingerprint(split_specs(config), cache)   # calibration files' content
        cache.save()
        if files is not None:
            prints["files"] = files
        self.key = key = RunKey(bench.name, canonical(config), settings, max_new, prints)
        self.main = main = out_dir / f"{key.stem()}.jsonl"
        mine = shard.path(main)
        if shard.rank == 0:
            _write_meta(main, key)
        repair_jsonl(mine, drop_errors=retry_errors)
        done = {r["id"] for r in merge_rows([read_rows(p) for p in [main, *shard_paths(main)]])
                if not (retry_errors and "error" in r)}
        say = log or _stderr
        if shard.rank == 0:
            _say_resume_or_fresh(main, key, len(done), say)
        todo = [s for s in shard.take(samples) if s.id not in done]
        self.n_todo = len(todo)
        unbatchable = [iv.name for iv in map(build, split_specs(key.config)) if not getattr(iv, "batchable", True)]
        if unbatchable and batch_size > 1 and todo and shard.rank == 0:
            say(f"attnkit: {bench.name} {key.config}: {', '.join(unbatchable)} cannot batch exactly (a padded batch "
                f"would change answers); running it at batch size 1 instead of {batch_size}")
        self.batch_size = 1 if unbatchable else batch_size
        self.batches = plan_batches(todo, processor, bench, settings, self.batch_size)
        self._warm = False
        self.writer = RowWriter(mine)

    def run(self, n_batches: int | None = None, after_sample: Callable[[dict], None] | None = None,
            bar=None) -> None:
        """Generate and write the next ``n_batches`` batches (None: all left), under one ``wrap()``."""
        import attnkit

        n = len(self.batches) if n_batches is None else n_batches
        batches, self.batches = self.batches[:n], self.batches[n:]
        if not batches:
            return
        handle = attnkit.wrap(self.model, *split_specs(self.key.config))
        try:
            if not self._warm:
                self._warm = True
                _warm_up(self.model, self.processor, handle, batches[0][0], self.settings.seed)
            for samples, budget in batches:
                for row in self._rows(handle, samples, budget):
                    self.writer.write(row)
                    if bar is not None:
                        bar.update(1)
                    if after_sample is not None:
                        after_sample(row)
        finally:
            handle.remove()

    def _rows(self, handle, samples: Sequence, budget: int | Exception) -> Iterator[dict]:
        """The rows of one batch: error rows first (unreadable images), then the generated ones in batch order."""
        head = {s.id: {"id": s.id, "split": s.split, "config": self.key.digest()} for s in samples}
        ok, images = [], []
        for s in samples:
            try:
                if isinstance(budget, Exception):
                    raise budget
                images.append(sample_image(s))
                ok.append(s)
            except Exception as e:  # noqa: BLE001 - a failing sample becomes an error row
                yield _error_row(head[s.id], e)
        if not ok:
            return
        seed = self.settings.seed + _seed_of(ok[0])
        try:
            results = generate_batch(self.model, self.processor, handle, ok, images, budget, seed)
        except Exception as e:  # noqa: BLE001 - redone one by one below, so only the failing samples fail
            if len(ok) == 1:
                yield _error_row(head[ok[0].id], e)
                return
            _free_cuda(e)
            results = None
        if results is not None:
            for s, result in zip(ok, results, strict=True):
                yield {**head[s.id], **result}
            return
        for s, image in zip(ok, images, strict=True):
            try:
                (result,) = generate_batch(self.model, self.processor, handle, [s], [image], budget,
                                           self.settings.seed + _seed_of(s))
                yield {**head[s.id], **result}
            except Exception as e:  # noqa: BLE001
                yield _error_row(head[s.id], e)

    def close(self) -> None:
        self.writer.close()


def _error_row(head: dict, e: BaseException) -> dict:
    _free_cuda(e)
    return {**head, "error": f"{type(e).__name__}: {e}"}


def _free_cuda(e: BaseException) -> None:
    if isinstance(e, torch.cuda.OutOfMemoryError):
        torch.cuda.empty_cache()


def plan_batches(todo: Sequence, processor, bench, settings: RunSettings, batch_size: int) -> list[tuple[list, Any]]:
    """``todo`` as ``[(samples, budget)]``: batch 1 in order; else sorted by (budget, with/without image, text
    tokens of the chat prompt, image size in pixels, order) and cut into runs of ``batch_size`` of one budget and
    one kind, so a batch pads little. ``budget`` is the exception if a sample's budget cannot be computed."""
    budgets: list[Any] = []
    for s in todo:
        try:
            budgets.append(settings.max_new_tokens or _budget(bench, s))
        except Exception as e:  # noqa: BLE001 - the sample's row records it
            budgets.append(e)
    if batch_size == 1:
        return [([s], b) for s, b in zip(todo, budgets, strict=True)]
    keys = []
    for i, (s, b) in enumerate(zip(todo, budgets, strict=True)):
        failed = isinstance(b, Exception)
        keys.append((failed, -1 if failed else b, s.image is None, _text_tokens(processor, s), _pixels(s.image), i))
    batches: list[tuple[list, Any]] = []
    for key in sorted(keys):
        s, b = todo[key[-1]], budgets[key[-1]]
        last = batches[-1] if batches else None
        if (last is None or isinstance(b, Exception) or len(last[0]) == batch_size or last[1] != b
                or (last[0][0].image is None) != (s.image is None)):
            batches.append(([s], b))
        else:
            last[0].append(s)
    return batches


def _text_tokens(processor, sample) -> int:
    """Tokens of the sample's chat prompt before the processor expands the image placeholder (a sort key)."""
    tok = getattr(processor, "tokenizer", processor)
    try:
        return len(tok(chat_prompt(processor, sample.question, sample.image is not None))["input_ids"])
    except Exception:  # noqa: BLE001 - only a sort key
        return 0


def _pixels(path) -> int:
    from PIL import Image

    try:
        with Image.open(path) as im:             # reads the header only
            return im.size[0] * im.size[1]
    except Exception:  # noqa: BLE001 - only a sort key; the real open reports the error
        return 0


def run_config(model, processor, bench, samples: Sequence, config: str, out_dir: Path, settings: RunSettings, *,
               shard: Shard = Shard(), retry_errors: bool = False, progress: bool = True,
               after_sample: Callable[[dict], None] | None = None, prints: dict[str, str | None] | None = None,
               log: Callable[[str], None] | None = None, batch_size: int = 1) -> Path:
    """Generate the rows of one config that are not on disk yet; returns the main JSONL path."""
    from tqdm.auto import tqdm

    run = ConfigRun(model, processor, bench, samples, config, out_dir, settings, shard=shard,
                    retry_errors=retry_errors, prints=prints, log=log, batch_size=batch_size)
    try:
        with tqdm(total=run.n_todo, desc=f"{bench.name} {run.key.config}", disable=not progress, leave=False) as bar:
            run.run(None, after_sample, bar)
    finally:
        run.close()
    return run.main


def _warm_up(model, processor, handle, samples: Sequence, seed: int) -> None:
    """One short unrecorded generate of a config's first batch, so that first-call costs (allocations, kernel
    selection, lazy initialisation of an intervention) do not land on whichever config runs first."""
    ok, images = [], []
    for s in samples:
        try:
            images.append(sample_image(s))
            ok.append(s)
        except ImageError:
            pass
    try:
        if ok:
            generate_batch(model, processor, handle, ok, images, 2, seed)
    except Exception:  # noqa: BLE001 - the real attempt records the error
        pass


def _budget(bench, sample) -> int:
    per_sample = getattr(bench, "max_new_tokens_for", None)
    return int(per_sample(sample)) if per_sample is not None else int(bench.max_new_tokens)


def _seed_of(sample) -> int:
    """A per-sample seed offset from its id, so a resumed or sharded run seeds each sample the same way."""
    return int(hashlib.sha256(sample.id.encode()).hexdigest()[:8], 16)


def _stderr(text: str) -> None:
    print(text, file=sys.stderr)


def _say_resume_or_fresh(main: Path, key: RunKey, n_done: int, log: Callable[[str], None]) -> None:
    """One line when the folder holds rows of another key for this benchmark and config, or when resuming."""
    prefix = main.name[: -len(f"{key.digest()}.jsonl")]
    others = sorted(p for p in main.parent.glob(f"{glob_escape(prefix)}*.jsonl")
                    if p.name != main.name and ".rank" not in p.name and ".tmp" not in p.name)
    what = f"attnkit: {key.bench} {key.config}:"
    state = f"resuming {n_done} row(s) of {main.name}" if n_done else f"starting fresh in {main.name}"
    if not others:
        if n_done:
            log(f"{what} {state}")
        return
    mine = key.payload()
    diffs: set[str] = set()
    for p in others:
        try:
            theirs = json.loads(p.with_suffix(".meta.json").read_text()).get("key") or {}
        except (OSError, ValueError):
            theirs = {}
        if theirs:
            diffs.update(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        else:
            diffs.add("unknown (written by an older attnkit)")
    names = ", ".join(p.name for p in others[:2]) + (f" and {len(others) - 2} more" if len(others) > 2 else "")
    log(f"{what} {state}; not using the rows of another key in this folder ({names}: differs in "
        f"{', '.join(sorted(diffs)) or 'nothing recorded'})")


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def _write_meta(main: Path, key: RunKey) -> None:
    import attnkit

    meta = {"bench": key.bench, "config": key.config, "hash": key.digest(), "settings": asdict(key.settings),
            "max_new_tokens": key.max_new_tokens, "attnkit": attnkit.__version__, "key": key.payload()}
    path = main.with_suffix(".meta.json")
    if not path.exists():
        path.write_text(json.dumps(meta, indent=2) + "\n")


def evaluate(bench, configs: Sequence[str], out_dir: str | Path, settings: RunSettings, *, model=None,
             processor=None, device_map: str | dict | None = None, shard: Shard | None = None,
             retry_errors: bool = False, progress: bool = True,
             after_sample: Callable[[dict], None] | None = None,
             log: Callable[[str], None] | None = None, batch_size: int | None = None) -> list[ConfigResult]:
    """Run ``configs`` (``"baseline"``, ``"cls-prune:keep=64"``, ``"var;fastv:k=2"``) on ``bench``; one model load.

    ``batch_size``: samples per ``generate()`` (None: :func:`default_batch_size` of the model's device); it changes
    no answer, only the costs, and each row records it. Configs take turns, ``INTERLEAVE_BATCHES`` batches each.
    Returns one scored :class:`ConfigResult` per config on rank 0 (``[]`` on other ranks) and writes
    ``summary.json`` next to the rows.
    """
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size={batch_size!r}: must be a positive integer (or None for the device's default)")
    configs = [canonical(c) for c in configs]          # bad specs fail before the model loads
    if len(set(configs)) != len(configs):
        raise ValueError(f"a config is given twice: {configs}")
    out_dir = Path(out_dir)
    check_writable(out_dir)
    shard = shard or Shard.from_accelerate()
    samples = load_samples(bench)
    if model is None:
        from attnkit.eval.loading import load_model_and_processor

        model, processor = load_model_and_processor(settings.model_path, dtype=settings.dtype, device_map=device_map,
                                                    quantization=settings.quantization)
    _preflight(model, configs)
    batch_size = batch_size or default_batch_size(model.device)
    prints = fingerprints(bench, samples, processor, settings)
    from tqdm.auto import tqdm

    runs: list[ConfigRun] = []
    try:
        for c in configs:
            runs.append(ConfigRun(model, processor, bench, samples, c, out_dir, settings, shard=shard,
                                  retry_errors=retry_errors, prints=prints, log=log, batch_size=batch_size))
        with tqdm(total=sum(r.n_todo for r in runs), desc=f"{bench.name} ({len(runs)} configs)",
                  disable=not progress, leave=False) as bar:
            while any(r.batches for r in runs):
                for r in runs:
                    r.run(INTERLEAVE_BATCHES, after_sample, bar)
    finally:
        for r in runs:
            r.close()
    paths = [r.main for r in runs]
    shard.barrier()
    if shard.rank != 0:
        return []
    order = [s.id for s in samples]
    dims = text_dims(model)
    results = [score(bench, samples, merge_shards(p, order), c, p, dims) for c, p in zip(configs, paths, strict=True)]
    write_summary(out_dir, bench, results, memory=MEMORY_NOTE["cuda" if model.device.type == "cuda" else "cpu"],
                  samples=samples, dims=dims)
    return results


def check_writable(out_dir: Path) -> None:
    """Create ``out_dir`` and write a probe file, so an unusable output folder fails before the model loads."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".attnkit_write_test.{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"output folder {str(out_dir)!r} is not writable ({e.strerror or e}); pass --out with a "
                         "folder you can write") from None


def _preflight(model, configs: Sequence[str]) -> None:
    """Wrap and unwrap each config once, so one that cannot run on this model fails before any generation."""
    import attnkit

    for config in configs:
        try:
            attnkit.wrap(model, *split_specs(config)).remove()
        except (ValueError, TypeError) as e:
            raise ValueError(f"config {config!r} cannot run on this model: {e}") from e


def write_summary(out_dir: Path, bench, results: Sequence[ConfigResult], memory: str, samples: Sequence | None = None,
                  dims: dict[str, int] | None = None, resamples: int | None = None) -> Path:
    """``summary.json``: the results, and with ``samples`` each result's bootstrap intervals of the primary metric
    (``ci``) and of its paired difference vs the baseline (``paired``, ``significant``; see
    :mod:`attnkit.eval.intervals`); ``dims``: the LLM dimensions the FLOPs and KV bytes were computed from."""
    from attnkit.eval import intervals

    entries = [r.to_dict() for r in results]
    data: dict[str, Any] = {"bench": bench.name, "primary_metric": bench.primary_metric,
                            "higher_is_better": dict(bench.higher_is_better), "memory": memory}
    if samples is not None and results:
        base = next((i for i, r in enumerate(results) if r.config == BASELINE), 0)
        order = [base] + [i for i in range(len(results)) if i != base]
        preds = [_predictions(results[i]) for i in order]
        ran = [s for s in samples if any(s.id in p for p in preds)]
        if ran:
            found = intervals.config_intervals(bench, ran, preds, metrics={bench.primary_metric.rsplit("/", 1)[-1]},
                                               resamples=resamples)
            for i, entry in zip(order, found, strict=True):
                entries[i].update(entry)
            data["intervals"] = {"method": "percentile bootstrap over samples, stratified by split; paired vs "
                                           f"{results[base].config} on the same draws",
                                 "level": intervals.LEVEL, "resamples": resamples or intervals.default_resamples(bench)}
    if dims is not None:
        data["llm_dims"] = dict(dims)
    data["results"] = entries
    path = out_dir / "summary.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def _predictions(result: ConfigResult) -> dict[str, str]:
    """Sample id -> prediction of a scored config, from its rows on disk (error rows have none)."""
    return {r["id"]: r["prediction"] for r in read_rows(Path(result.path)) if "error" not in r and "prediction" in r}
