"""Sink dimensions: the few hidden dimensions in which a base LLM's massive activations live.

VAR (Kang et al., ICLR 2025) calls token j a sink at layer l when its hidden state entering layer l
has a massive value in one of the model's sink dimensions::

    phi(x) = max_{d in D_sink} |x[d]| / RMS(x),   RMS(x) = sqrt(mean_d x[d]^2),   sink  <=>  phi(x) >= tau

The dimensions are a property of the base LLM (Sun et al. 2024, "Massive activations"), fixed across
layers and unchanged by multimodal fine-tuning. Published ones are in :data:`SINK_DIMS`; for any other
model :func:`find_sink_dims` finds them from a few forward passes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

# key: (text config model_type, hidden_size, num_hidden_layers, intermediate_size) of the LLM.
# The four numbers tell the base LLMs apart where the name alone cannot (LLaVA-1.5-7B and -13B are both
# "llama"; Qwen2-VL-7B and Qwen2.5-VL-7B share hidden 3584 x 28 layers but not model_type). Caveat:
# LLaMA-1-7B has the same key as LLaMA-2-7B; no supported VLM is built on it.
SINK_DIMS: dict[tuple[str, int, int, int], tuple[int, ...]] = {
    ("llama", 4096, 32, 11008): (1415, 2533),   # LLaMA-2-7B / Vicuna-7B v1.5: LLaVA-1.5-7B, LLaVA-NeXT-Vicuna-7B
    ("llama", 5120, 40, 13824): (2100, 4743),   # LLaMA-2-13B / Vicuna-13B v1.5: LLaVA-1.5-13B, LLaVA-NeXT-13B
    ("qwen2_vl_text", 3584, 28, 18944): (458, 2570),   # Qwen2-VL-7B (VAR paper, Fig. 7)
    ("qwen2_vl", 3584, 28, 18944): (458, 2570),   # same, flat config of older checkpoints
}
# Not in the table on purpose: Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision, Gemma 3 and HF-native InternVL (2.5 / 3) have
# no published sink dimensions (VAR's Fig. 7 labels InternVL2-8B {3584}, whose InternLM2 LLM is not HF-native);
# for them ``var`` finds the dimensions itself (``sink_dims=auto``, the default off the table).


def llm_key(text_config) -> tuple[str, int, int, int]:
    """The :data:`SINK_DIMS` key of a model's text config."""
    return (text_config.model_type, text_config.hidden_size, text_config.num_hidden_layers,
            getattr(text_config, "intermediate_size", 0))


def known_sink_dims(text_config) -> tuple[int, ...] | None:
    """Published sink dimensions of this base LLM, or None."""
    return SINK_DIMS.get(llm_key(text_config))


def sink_ratio(hidden: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """|x[d]| / RMS(x) for every dimension d: [..., D] in float32 (RMS without the norm's weight, as in VAR)."""
    x = hidden.float()
    return x.abs() * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def sink_value(hidden: torch.Tensor, dims: Iterable[int]) -> torch.Tensor:
    """phi(x) = max over ``dims`` of |x[d]| / RMS(x): [...]."""
    x = hidden.float()
    idx = torch.as_tensor(list(dims), device=x.device)
    return x.index_select(-1, idx).abs().amax(-1) * torch.rsqrt(x.pow(2).mean(-1) + 1e-6)


def massive_counts(hidden: torch.Tensor, tau: float, valid: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per dimension d of ``hidden`` [B, L, D]: the number of (valid) tokens with ``|x[d]| / RMS(x) >= tau``, and
    the largest ratio: ([D] long, [D] float32), on the CPU."""
    r = sink_ratio(hidden.detach())
    if valid is not None and valid.shape == r.shape[:2]:
        r = r * valid[..., None].to(r.device)
    return (r >= tau).sum((0, 1)).cpu(), r.amax((0, 1)).cpu()


def rank_sink_dims(count: torch.Tensor, peak: torch.Tensor, top_k: int = 2) -> tuple[int, ...]:
    """:func:`find_sink_dims`' rule on accumulated counts: the ``top_k`` dimensions with the most tokens reaching
    tau (ties: the largest ratio), among those with at least one; sorted. Empty if no dimension reaches tau."""
    order = sorted(range(len(count)), key=lambda d: (int(count[d]), float(peak[d])), reverse=True)
    return tuple(sorted(d for d in order[:top_k] if count[d] > 0))


def find_sink_dims(model: torch.nn.Module, inputs_list: Iterable[Mapping], tau: float = 20.0, top_k: int = 2,
                   layers: Iterable[int] | None = None) -> tuple[int, ...]:
    """The model's sink dimensions, found from forward passes over ``inputs_list`` (processor outputs, or one).

    For each hidden state entering the decoder ``layers`` (default 2 ... L-1: the paper sees sinks from
    layer 2 on) at every valid token, the ratio ``|x[d]| / RMS(x)`` is taken per dimension d. A dimension
    scores the number of (layer, token) pairs where that ratio reaches ``tau`` (ties: the largest ratio);
    the ``top_k`` best with at least one such pair are returned, sorted. A handful of prompts with images
    suffices: massive activations sit on the same dimensions for BOS / delimiter tokens and visual sinks.
    ``ValueError`` if no dimension reaches ``tau`` (the largest ratio seen is in the message).
    """
    from attnkit.models.base import get_adapter

    if isinstance(inputs_list, Mapping):    # one processor output
        inputs_list = [inputs_list]
    adapter = get_adapter(model)
    n = adapter.num_layers
    chosen = list(range(min(2, n - 1), n)) if layers is None else list(layers)
    hidden = adapter.text_config.hidden_size
    count = torch.zeros(hidden, dtype=torch.long)
    peak = torch.zeros(hidden)
    valid: list[torch.Tensor | None] = [None]

    def capture(module, args, kwargs):
        c, p = massive_counts(args[0] if args else kwargs["hidden_states"], tau, valid[0])
        count.add_(c)
        torch.maximum(peak, p, out=peak)

    handles = [adapter.decoder_layers[i].register_forward_pre_hook(capture, with_kwargs=True) for i in chosen]
    try:
        with torch.no_grad():
            for inputs in inputs_list:
                mask = inputs.get("attention_mask")
                valid[0] = None if mask is None else mask.bool()
                model(**inputs)
    finally:
        for h in handles:
            h.remove()
    found = rank_sink_dims(count, peak, top_k)
    if not found:
        best = int(peak.argmax())
        raise ValueError(f"no hidden dimension reaches |x[d]|/RMS(x) >= tau={tau} in layers {chosen}; the largest "
                         f"ratio seen is {float(peak.max()):.2f} (dimension {best}); lower tau or pass more inputs")
    return found
