"""Analytic LLM costs from real token counts: prefill FLOPs and KV-cache bytes, and per-sample spreads.

Conventions (what the numbers count, so they can be compared with a paper's):

- **FLOPs = 2 per multiply-add** (what ``torch.utils.flop_counter.FlopCounterMode`` counts for a matmul).
  Per decoder layer that processes ``n`` tokens, with hidden size ``d``, ``H`` query heads, ``G`` key/value heads
  of width ``h`` and MLP width ``m``::

      projections  2·n·d·(H·h)  [q]  +  2·2·n·d·(G·h)  [k, v: GQA widths]  +  2·n·(H·h)·d  [o]
      attention    2·2·n²·(H·h)      [QKᵀ and AV over the full n × n square]
      MLP          2·3·n·d·m         [gated (SwiGLU / GeGLU): gate, up, down]

  The attention term counts the **full square**, as FastV's formula does (and as an eager or math-kernel
  attention computes it); ``causal=True`` counts the lower triangle ``n(n+1)/2`` instead (what a flash kernel
  skipping masked blocks approaches). Norms, rotary embeddings, softmax, the embedding and the LM head are not
  counted; nor is a second decoding branch (PAI's / VCD's contrastive pass).
- **Papers differ.** FastV (Chen et al. 2024, Sec. 4) writes ``L·(4nd² + 2n²d + 2ndm)``: one FLOP per
  multiply-add, full-square attention, multi-head attention (G = H), a two-matrix MLP (:func:`fastv_flops`);
  PyramidDrop's 3.82 T for LLaVA-1.5-7B fits that formula (at about 730 tokens). FasterVLM (Zhang et al. 2024)
  quotes 43.58 T for LLaVA-NeXT-7B at 2880 visual tokens: this module's count (2 per multiply-add, gated MLP,
  full square) at 3000 tokens (120 text tokens: our assumption) is 43.57 T, while FastV's formula gives 17.5 T,
  so FasterVLM counts as we do. On
  a model with G = H and a gated MLP ours is ``2·(4nd² + 2n²d + 3ndm)`` per layer: a FastV-style figure for
  the same model is well under half of ours.
- **KV cache** after generation: ``2 (K and V) · Σ_layers tokens_l · G · h · bytes``, where ``tokens_l`` is the
  prompt tokens layer ``l`` kept at prefill plus the generated tokens the model was fed (``new_tokens − 1``:
  the last generated token is never run through the model). The main branch's cache only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

TEXT_DIMS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
             "num_hidden_layers", "dtype_bytes", "mlp_matrices")


def text_dims(model_or_config: Any, dtype_bytes: int | None = None) -> dict[str, int]:
    """The LLM dimensions the formulas need, from a loaded model (or its config): ``hidden_size``,
    ``intermediate_size``, ``num_attention_heads``, ``num_key_value_heads`` (= heads without GQA), ``head_dim``
    (= hidden / heads when the config has none), ``num_hidden_layers``, ``dtype_bytes`` (of the model's weights
    when a model is given, else of the config's dtype; 2 if unknown) and ``mlp_matrices`` (3: every supported
    family's MLP is gated)."""
    import torch

    config = getattr(model_or_config, "config", model_or_config)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    missing = [k for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers")
               if getattr(text, k, None) is None]
    if missing:
        raise ValueError(f"text config {type(text).__name__} has no {', '.join(missing)}; analytic FLOPs need them")
    heads = int(text.num_attention_heads)
    if dtype_bytes is None:
        dtype = getattr(model_or_config, "dtype", None) if hasattr(model_or_config, "parameters") else None
        dtype = dtype if isinstance(dtype, torch.dtype) else getattr(text, "dtype", None)
        dtype_bytes = torch.empty((), dtype=dtype).element_size() if isinstance(dtype, torch.dtype) else 2
    return {"hidden_size": int(text.hidden_size), "intermediate_size": int(text.intermediate_size),
            "num_attention_heads": heads,
            "num_key_value_heads": int(getattr(text, "num_key_value_heads", None) or heads),
            "head_dim": int(getattr(text, "head_dim", None) or text.hidden_size // heads),
            "num_hidden_layers": int(text.num_hidden_layers), "dtype_bytes": int(dtype_bytes), "mlp_matrices": 3}


def layer_flops(n: int, dims: Mapping[str, int], causal: bool = False) -> int:
    """FLOPs (2 per multiply-add) of one decoder layer's prefill over ``n`` tokens; see the module docstring."""
    d, m = dims["hidden_size"], dims["intermediate_size"]
    q_width = dims["num_attention_heads"] * dims["head_dim"]
    kv_width = dims["num_key_value_heads"] * dims["head_dim"]
    projections = 2 * n * d * q_width + 2 * 2 * n * d * kv_width + 2 * n * q_width * d
    pairs = n * (n + 1) // 2 if causal else n * n
    attention = 2 * 2 * pairs * q_width
    mlp = 2 * dims.get("mlp_matrices", 3) * n * d * m
    return projections + attention + mlp


def prefill_flops(layer_tokens: Sequence[int], dims: Mapping[str, int], causal: bool = False) -> int:
    """LLM prefill FLOPs of one sample: :func:`layer_flops` summed over the tokens each layer processed."""
    if len(layer_tokens) != dims["num_hidden_layers"]:
        raise ValueError(f"layer_tokens has {len(layer_tokens)} entries but the LLM has "
                         f"{dims['num_hidden_layers']} layers; give one token count per decoder layer")
    return sum(layer_flops(int(n), dims, causal) for n in layer_tokens)


def fastv_flops(n: int, hidden: int, intermediate: int, layers: int) -> int:
    """FastV's prefill formula ``L·(4nd² + 2n²d + 2ndm)`` (one FLOP per multiply-add; MHA, two-matrix MLP)."""
    return layers * (4 * n * hidden ** 2 + 2 * n ** 2 * hidden + 2 * n * hidden * intermediate)


def kv_cache_bytes(layer_tokens: Sequence[int], new_tokens: int, dims: Mapping[str, int]) -> int:
    """Bytes of the KV cache after generating ``new_tokens``: ``2 · Σ_l (tokens_l + new_tokens − 1) · G · h ·
    bytes`` (the last generated token is never fed)."""
    fed = max(int(new_tokens) - 1, 0)
    per_token = 2 * dims["num_key_value_heads"] * dims["head_dim"] * dims["dtype_bytes"]
    return sum((int(n) + fed) * per_token for n in layer_tokens)


def sample_costs(row: Mapping[str, Any], dims: Mapping[str, int] | None) -> dict[str, float | None]:
    """``prefill_tflops`` and ``kv_cache_mb`` of one row (None without ``layer_tokens`` or ``dims``)."""
    layers = row.get("layer_tokens")
    if dims is None or not layers:
        return {"prefill_tflops": None, "kv_cache_mb": None}
    return {"prefill_tflops": prefill_flops(layers, dims) / 1e12,
            "kv_cache_mb": kv_cache_bytes(layers, row.get("new_tokens") or 0, dims) / 2 ** 20}


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default rule) of ``values``."""
    if not values:
        raise ValueError("quantile of no values")
    if not 0 <= q <= 1:
        raise ValueError(f"q={q}: a quantile is in [0, 1]")
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def spread(values: Sequence[float]) -> dict[str, float | None]:
    """``{"median", "p10", "p90"}`` of per-sample values (all None for none)."""
    if not values:
        return {"median": None, "p10": None, "p90": None}
    return {"median": quantile(values, 0.5), "p10": quantile(values, 0.1), "p90": quantile(values, 0.9)}
