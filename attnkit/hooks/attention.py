"""Attention dispatch: one attention function per base implementation, chosen per layer.

``attnkit_<base>`` (e.g. ``attnkit_sdpa``) is registered in transformers' ``AttentionInterface`` and,
under the same name, in ``AttentionMaskInterface`` (delegating to the base's mask function, so masks
keep their format; without it transformers silently drops the padding mask). While a model is
wrapped its language model runs under that name. For each call the function reads the
:class:`LayerHook` that the handle attached to the attention module: a layer no intervention
touches runs the base implementation unchanged (bit-identical outputs); a touched layer builds an
:class:`AttentionCall`, lets each intervention read or edit it, and finishes the product.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

PREFIX = "attnkit_"
ATTR = "_attnkit_layer"
ROW_CHUNK = 512  # query rows per probability chunk: bounds memory at B*H*512*kv floats


def base_attention(base: str, module: torch.nn.Module) -> Callable:
    """The attention function ``module`` would use under implementation ``base``."""
    if base == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[base]


def dispatch_name(base: str) -> str:
    """Register (once per process) and return the attnkit name wrapping implementation ``base``."""
    if base.startswith(PREFIX):
        raise ValueError(f"attention implementation {base!r} is already attnkit's; the model seems wrapped")
    if base != "eager" and base not in ALL_ATTENTION_FUNCTIONS:
        raise ValueError(f"unknown attention implementation {base!r}")
    if base not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        raise ValueError(f"attention implementation {base!r} has no mask function; attnkit supports "
                         f"{', '.join(sorted(k for k in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping))}")
    name = PREFIX + base
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, _make_dispatcher(base))
        AttentionMaskInterface.register(name, _make_mask(base))
    return name


# mask overlays (``mma``), keyed by id() of the text config that ``create_causal_mask`` passes as ``config``:
# ``overlay(kwargs) -> kwargs`` edits the base mask function's keyword arguments. A config attribute would
# leak into ``config.to_dict()``; this registry holds only wrapped models' configs (removed on unwrap).
MASK_OVERLAYS: dict[int, Callable[[dict], dict]] = {}


def _make_mask(base: str) -> Callable:
    base_mask = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping[base]

    def mask(*args, **kwargs):
        overlay = MASK_OVERLAYS.get(id(kwargs.get("config"))) if MASK_OVERLAYS else None
        if overlay is not None:
            kwargs = overlay(kwargs)
        return base_mask(*args, **kwargs)

    mask.__name__ = f"{PREFIX}{base}_mask"
    return mask


def _make_dispatcher(base: str) -> Callable:
    def attention(module, query, key, value, attention_mask, **kwargs):
        hook: LayerHook | None = getattr(module, ATTR, None)
        fn = base_attention(base, module)
        if hook is not None and hook.probe is not None:   # a probe wants this layer's query/key only
            hook.probe.append((query, key, kwargs.get("scaling") or module.scaling))
            return query.new_zeros(query.transpose(1, 2).shape), None
        if hook is None or not hook.interventions:
            return fn(module, query, key, value, attention_mask, **kwargs)
        call = AttentionCall(module, hook, query, key, value, attention_mask, fn, kwargs)
        for intervention in hook.interventions:
            intervention.on_attention(call)
        return call.finish()

    attention.__name__ = f"{PREFIX}{base}_attention"
    return attention


class LayerHook:
    """What the dispatcher needs for one decoder layer: its index, the handle's state, its interventions."""

    def __init__(self, layer_idx: int, state, interventions: list):
        self.layer_idx = layer_idx
        self.state = state
        self.interventions = interventions
        self.probe: list | None = None   # set while a pruner probes this layer's query/key (nothing else runs)


class AttentionCall:
    """One attention call of a touched layer, as interventions see it.

    ``query`` [B, H, q, D]; ``key``/``value`` [B, H_kv, kv, D] (GQA not expanded); ``mask`` whatever the
    base implementation receives (None, bool or additive 4-D, or a flash 2-D padding mask).

    Interventions either read (``iter_probs``) or register edits, applied in registration order when
    the call finishes:
    - ``edit_scores(fn, rows)``: ``fn(rows, scores) -> scores`` on the masked logits [B, H, r, kv] (float32);
    - ``edit_probs(fn, rows)``: ``fn(rows, probs) -> probs`` on the softmax output [B, H, r, kv] (float32);
    - ``edit_output(fn)``: ``fn(out) -> out`` on the per-head outputs [B, q, H, D] (before ``o_proj``).
    Score/probability edits make the query rows they may change (``rows``, a slice; default all) run
    eagerly, in chunks; the other rows of the call keep the model's own implementation (the layer runs
    it once for all rows and the eager rows replace theirs). Output edits alone keep it entirely.
    """

    def __init__(self, module, hook: LayerHook, query, key, value, mask, base_fn, kwargs):
        self.module = module
        self.layer_idx = hook.layer_idx
        self.state = hook.state
        self.query, self.key, self.value, self.mask = query, key, value, mask
        self.base_fn = base_fn
        self.kwargs = kwargs
        self._score_edits: list[Callable] = []
        self._prob_edits: list[Callable] = []
        self._output_edits: list[Callable] = []
        self._eager_rows: tuple[int, int] | None = None   # (lo, hi): the union of the edits' query rows

    @property
    def scaling(self) -> float:
        s = self.kwargs.get("scaling")
        return self.module.scaling if s is None else s

    @property
    def q_len(self) -> int:
        return self.query.shape[2]

    @property
    def kv_len(self) -> int:
        return self.key.shape[2]

    @property
    def is_prefill(self) -> bool:
        return self.state.step == 0

    def edit_scores(self, fn: Callable[[slice, torch.Tensor], torch.Tensor], rows: slice | None = None) -> None:
        self._score_edits.append(fn)
        self._add_rows(rows)

    def edit_probs(self, fn: Callable[[slice, torch.Tensor], torch.Tensor], rows: slice | None = None) -> None:
        self._prob_edits.append(fn)
        self._add_rows(rows)

    def _add_rows(self, rows: slice | None) -> None:
        lo, hi, _ = (rows or slice(None)).indices(self.q_len)
        if self._eager_rows is not None:
            lo, hi = min(lo, self._eager_rows[0]), max(hi, self._eager_rows[1])
        self._eager_rows = (lo, max(lo, hi))

    def edit_output(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self._output_edits.append(fn)

    def iter_probs(self, chunk: int = ROW_CHUNK) -> Iterator[tuple[slice, torch.Tensor]]:
        """Yield ``(rows, probs)``: unedited probabilities [B, H, len(rows), kv] in float32, as eager computes them."""
        for start in range(0, self.q_len, chunk):
            rows = slice(start, min(start + chunk, self.q_len))
            yield rows, attention_probs(self.query[:, :, rows], self.key, self.mask, self.scaling,
                                        row_offset=start, q_len=self.q_len)

    def finish(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        lo, hi = self._eager_rows or (0, 0)
        if lo == 0 and hi == self.q_len:
            out = self._eager_with_edits(lo, hi)
        else:
            out = self.base_fn(self.module, self.query, self.key, self.value, self.mask, **self.kwargs)[0]
            if hi > lo:  # only some rows are edited: they replace the model's own rows (a fresh tensor)
                out[:, lo:hi] = self._eager_with_edits(lo, hi)
        for fn in self._output_edits:
            out = fn(out)
        return out, None

    def _eager_with_edits(self, lo: int, hi: int, chunk: int | None = None) -> torch.Tensor:
        """Eager attention with the registered edits for query rows ``lo ... hi-1``: [B, hi-lo, H, D]."""
        chunk = chunk or ROW_CHUNK
        value = repeat_kv(self.value, self.query.shape[1] // self.value.shape[1])
        key = repeat_kv(self.key, self.query.shape[1] // self.key.shape[1])
        parts = []
        for start in range(lo, hi, chunk):
            rows = slice(start, min(start + chunk, hi))
            scores = attention_scores(self.query[:, :, rows], key, self.mask, self.scaling, start, self.q_len)
            for fn in self._score_edits:
                scores = fn(rows, scores)
            probs = torch.softmax(scores, dim=-1)
            for fn in self._prob_edits:
                probs = fn(rows, probs)
            parts.append(torch.matmul(probs.to(value.dtype), value))
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
        return out.transpose(1, 2)  # the model reshapes (copies) it before o_proj


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, H_kv, L, D] -> [B, H_kv * n_rep, L, D] (grouped-query attention)."""
    if n_rep == 1:
        return x
    b, h, n, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, n, d).reshape(b, h * n_rep, n, d)


def additive_mask(mask: torch.Tensor | None, q_len: int, kv_len: int, rows: slice, batch: int,
                  device: torch.device) -> torch.Tensor:
    """Any mask a base implementation receives, for query ``rows``, as an additive float32 [B|1, 1, r, kv].

    None means plain causal (queries are the last ``q_len`` of ``kv_len`` positions); bool 4-D is
    True = attend; float 4-D is already additive; 2-D is a flash padding mask ([B, kv], 1 = attend).
    Returns None where nothing is masked (no mask and a single query row: it sees every key).
    """
    if mask is None and q_len == 1:
        return None
    neg = torch.finfo(torch.float32).min
    if mask is not None and mask.dim() == 4:
        m = mask[:, :, rows, :kv_len]
        if m.dtype == torch.bool:
            return torch.zeros(m.shape, dtype=torch.float32, device=device).masked_fill(~m, neg)
        return m.float()
    q_idx = torch.arange(rows.start, rows.stop, device=device)[:, None] + (kv_len - q_len)
    allowed = torch.arange(kv_len, device=device)[None, :] <= q_idx
    allowed = allowed[None, None]
    if mask is not None:  # flash 2-D padding mask
        allowed = allowed & mask[:, None, None, -kv_len:].bool()
    return torch.zeros(allowed.shape, dtype=torch.float32, device=device).masked_fill(~allowed, neg)


def attention_scores(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, scaling: float,
                     row_offset: int = 0, q_len: int | None = None) -> torch.Tensor:
    """Masked logits q kᵀ · scaling + mask in float32 for the given query rows: [B, H, r, kv].

    ``query`` holds rows ``row_offset ...`` of a call with ``q_len`` query rows (the mask is indexed
    accordingly); keys are expanded for grouped-query attention (already expanded keys pass through).
    """
    q_len = query.shape[2] if q_len is None else q_len
    k = repeat_kv(key, query.shape[1] // key.shape[1])
    # the product in the model's dtype (as eager attention does), the mask in float32: a float32 finfo.min
    # mask would turn into -inf in bf16 and fully masked (padding) rows into NaN after the softmax
    scores = (torch.matmul(query, k.transpose(2, 3)) * scaling).float()
    rows = slice(row_offset, row_offset + query.shape[2])
    add = additive_mask(mask, q_len, key.shape[2], rows, query.shape[0], query.device)
    return scores if add is None else scores + add


def attention_probs(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, scaling: float,
                    row_offset: int = 0, q_len: int | None = None) -> torch.Tensor:
    """softmax(q kᵀ · scaling + mask) in float32 for the given query rows: [B, H, r, kv] (see
    :func:`attention_scores`)."""
    return torch.softmax(attention_scores(query, key, mask, scaling, row_offset, q_len), dim=-1)
