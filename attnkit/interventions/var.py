"""``var``: Visual Attention Redistribution — move attention from sink tokens to the other visual tokens."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from attnkit.interventions.base import Intervention, param, register
from attnkit.interventions.pai import prompt_layout
from attnkit.interventions.sinks import SINK_DIMS, find_sink_dims, known_sink_dims, llm_key, sink_value

__all__ = ["VAR", "find_sink_dims", "redistribute"]


def redistribute(probs: torch.Tensor, sink: torch.Tensor, visual: torch.Tensor, edit_rows: torch.Tensor,
                 p: float, rho: float, min_visual: float) -> tuple[torch.Tensor, torch.Tensor]:
    """VAR's redistribution on post-softmax attention (paper conventions), returning (probs, selected).

    ``probs`` [B, H, r, kv]; ``sink`` / ``visual`` [B, kv] key masks (sink: all sink tokens, visual: all
    visual tokens); ``edit_rows`` [B, r] query rows that may be edited. A (head, row) is image-centric when
    ``sum_{V} a >= min_visual`` and ``sum_{V \\ S} a / sum_{V} a >= rho``; there::

        a'_ij = (1 - p) a_ij                                        j in S
        a'_ij = a_ij + p * sum_{j' in S} a_ij' * a_ij / sum_{j' in V \\ S} a_ij'   j in V \\ S
        a'_ij = a_ij                                                otherwise

    Rows that see no non-sink visual key are never selected (nothing could receive the mass).
    """
    return _redistribute(probs, key_masks(sink, visual, probs.dtype), edit_rows, p, rho, min_visual)


def key_masks(sink: torch.Tensor, visual: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, kv, 3] float columns (visual, non-sink visual, sink): the three attention masses in one matmul."""
    return torch.stack([visual, visual & ~sink, sink], dim=-1).to(dtype)[:, None]


def _redistribute(probs: torch.Tensor, masks: torch.Tensor, edit_rows: torch.Tensor, p: float, rho: float,
                  min_visual: float) -> tuple[torch.Tensor, torch.Tensor]:
    visual_mass, rest_mass, sink_mass = torch.matmul(probs, masks).unbind(-1)           # [B, H, r] each
    selected = edit_rows[:, None, :] & (visual_mass >= min_visual) & (rest_mass >= rho * visual_mass)
    if rho == 0 or min_visual == 0:  # otherwise implied: rest >= rho * visual >= rho * min_visual > 0
        selected &= rest_mass > 0
    gain = torch.where(selected, p * sink_mass / rest_mass.clamp_min(torch.finfo(probs.dtype).tiny), 0.0)
    moved = torch.where(selected, p, 0.0)
    rest_f, sink_f = masks[..., 1].unsqueeze(2), masks[..., 2].unsqueeze(2)            # [B, 1, 1, kv]
    # a'_ij = a_ij * (1 - p [j in S] + gain_i [j in V \ S]); unselected rows: factor 1
    return probs * (1 - moved[..., None] * sink_f + gain[..., None] * rest_f), selected


@register
@dataclasses.dataclass
class VAR(Intervention):
    """VAR (Kang et al., "See What You Are Told: Visual Attention Sink in Large Multimodal Models", ICLR 2025).

    1. Sinks, per layer l and sample, fixed at prefill: token j is a sink when its hidden state entering
       layer l has ``phi(x) = max_{d in D_sink} |x[d]| / RMS(x) >= tau``. ``S`` = the sinks (text sinks such
       as BOS included, as in the paper's equation; ``text_sinks=False`` keeps visual sinks only),
       ``V`` = the visual tokens. Generated tokens are never sinks.
    2. Image-centric heads, per (layer, head, query row), at every step:
       ``sum_{j in V} a_ij >= 0.2`` and ``r_i = sum_{j in V \\ S} a_ij / sum_{j in V} a_ij >= rho``.
    3. There, a fraction ``p`` of the attention to sinks moves to the non-sink visual tokens, in proportion
       to their attention (:func:`redistribute`); rows still sum to 1; text non-sinks are untouched.

    Edited rows: text queries after the sample's first image (prefill) and each generated token (decode);
    image queries and queries before the image never are. Layers 2 ... L-2 (the paper leaves the last
    layer alone; ``last_layer=True`` adds it, as the released code effectively does).

    Parameters (paper conventions, hallucination setting of App. B.2): ``p`` (paper: p, 0.6) is the
    fraction MOVED; ``rho`` (paper: rho, 0.5) the minimum non-sink share; ``tau`` (paper: tau, 20);
    ``min_visual_attention`` (0.2). The released code (seilk/VisAttnSink) uses inverted parameters:
    code_rho = 1 - rho (it keeps ``sink/visual <= rho``) and code_p = 1 - p (sinks multiplied by p);
    the author confirmed the paper's reading (issue #5). So its YAML ``p: 0.6`` moves 40% —
    ``var:p=0.4`` reproduces it. Other code departures we do not copy: strict ``phi > tau``; a layer with
    no visual sink left entirely unedited (here text sinks are still moved, per the equation).

    ``sink_dims``: from :data:`attnkit.interventions.sinks.SINK_DIMS` (keyed by the LLM's model_type,
    hidden size, layer count and MLP size) or given (``var:sink_dims=458+2570``); for other models find
    them with :func:`attnkit.find_sink_dims`. Needs post-softmax probabilities: the chosen layers run
    eager attention on the query rows of the call (chunked); a layer without any sink is not touched.
    Identity: ``p=0``.
    """

    name = "var"
    p: float = param(0.6, low=0.0, high=1.0, doc="fraction of sink attention moved (paper: p)")
    rho: float = param(0.5, low=0.0, high=1.0, doc="image-centric head: min non-sink visual share (paper: rho)")
    tau: float = param(20.0, low=0.0, low_open=True, doc="sink threshold on |x[d]|/RMS(x) (paper: tau)")
    min_visual_attention: float = param(0.2, low=0.0, high=1.0, doc="image-centric head: min visual attention")
    sink_dims: tuple[int, ...] | None = param(None, low=0, doc="sink dimensions (default: the known table)")
    first_layer: int = param(2, low=0, doc="first edited layer (paper: 2)")
    last_layer: bool = param(False, doc="also edit the last layer (the paper does not)")
    text_sinks: bool = param(True, doc="move attention from text sinks (BOS, ...) too, as the paper's equation")

    def __post_init__(self):
        super().__post_init__()
        self._sinks: dict[int, torch.Tensor | None] = {}
        self._dims: tuple[int, ...] = ()
        self._counts: dict[int, list[torch.Tensor]] = {}
        self._prep: dict[tuple, tuple | None] = {}

    # --- install ------------------------------------------------------------------------------
    def attach(self, ctx) -> None:
        cfg = ctx.adapter.text_config
        dims = self.sink_dims if self.sink_dims is not None else known_sink_dims(cfg)
        if dims is None:
            raise ValueError(f"var: no known sink dimensions for this LLM {llm_key(cfg)} (known: "
                             f"{', '.join(str(k) for k in SINK_DIMS)}); pass sink_dims=d1+d2, found with "
                             f"attnkit.find_sink_dims(model, [processor(...), ...])")
        bad = [d for d in dims if d >= cfg.hidden_size]
        if bad:
            raise ValueError(f"var: sink_dims {bad} out of range for hidden size {cfg.hidden_size}; "
                             f"use dimensions in [0, {cfg.hidden_size})")
        self._dims = tuple(dims)
        self._state = ctx.state
        for i in self.attention_layers(ctx):
            ctx.installed.forward_pre_hook(ctx.adapter.decoder_layers[i], self._sink_hook(i), with_kwargs=True)

    def attention_layers(self, ctx) -> list[int]:
        n = ctx.adapter.num_layers
        return list(range(self.first_layer, n if self.last_layer else n - 1))

    def _sink_hook(self, layer: int):
        def hook(module, args, kwargs):
            state = self._state
            if state.step != 0:
                return
            hidden = args[0] if args else kwargs["hidden_states"]
            layout = prompt_layout(state, layer, hidden.device)
            if layout is None or tuple(hidden.shape[:2]) != tuple(layout.visual.shape):
                self._sinks[layer] = None  # a layout we cannot map to prompt positions
                return
            sink = (sink_value(hidden, self._dims) >= self.tau) & layout.valid
            if not self.text_sinks:
                sink &= layout.visual
            self._sinks[layer] = sink

        return hook

    def reset(self) -> None:
        self._sinks, self._counts, self._prep = {}, {}, {}

    # --- attention ----------------------------------------------------------------------------
    def _prepared(self, call):
        """What this layer needs for the current request, computed once per request and layer (decode steps
        then cost no host synchronisation here): (layout, key masks with room for generated columns,
        has-image per sample), or None if the layer has nothing to move."""
        key = (call.layer_idx, id(call.state.spans), id(getattr(call.state, "keep_plan", None)))
        if key not in self._prep:
            sink = self._sinks.get(call.layer_idx)
            layout = prompt_layout(call.state, call.layer_idx, call.query.device)
            ok = (sink is not None and layout is not None and sink.shape == layout.visual.shape
                  and bool(sink.any()) and bool(layout.visual.any()))
            self._prep[key] = None
            if ok:
                room = layout.length + 256
                masks = key_masks(layout.keys(room, sink.to(call.query.device)), layout.keys(room, layout.visual),
                                  torch.float32)
                self._prep[key] = (layout, masks, layout.visual.any(1)[:, None])
        prep = self._prep[key]
        if prep is not None and prep[1].shape[2] < call.kv_len:  # long generation: grow the zero (text) columns
            masks = torch.nn.functional.pad(prep[1], (0, 0, 0, call.kv_len + 256 - prep[1].shape[2]))
            prep = self._prep[key] = (prep[0], masks, prep[2])
        return prep

    def on_attention(self, call) -> None:
        prepared = self._prepared(call)
        if prepared is None:
            return
        layout, masks, has_image = prepared
        device, kv, q = call.query.device, call.kv_len, call.q_len
        if kv < layout.length:
            return
        masks = masks[:, :, :kv]
        if q == 1 and kv > layout.length:
            edit_rows = has_image                   # a generated token: edited in every sample with an image
            lo, hi = 0, 1
        else:
            # query rows sit at key columns kv-q ... kv-1; prompt rows: text after the sample's first image
            pos = torch.arange(kv - q, kv, device=device)
            text = layout.text_after_image[:, pos.clamp(max=layout.length - 1)]
            edit_rows = torch.where((pos < layout.length)[None, :], text, has_image)
            rows_any = edit_rows.any(0).nonzero()
            if rows_any.numel() == 0:
                return
            lo, hi = int(rows_any[0]), int(rows_any[-1]) + 1     # the block of rows worth editing (prefill: text)
        counts = self._counts.setdefault(call.layer_idx, []) if q > 1 else None   # stats: prefill rows only
        p, rho, floor = self.p, self.rho, self.min_visual_attention

        def edit(rows: slice, probs: torch.Tensor) -> torch.Tensor:
            a, b = max(lo, rows.start), min(hi, rows.stop)
            if a >= b:
                return probs
            sub = slice(a - rows.start, b - rows.start)
            out, selected = _redistribute(probs[:, :, sub], masks.to(probs.dtype), edit_rows[:, a:b], p, rho, floor)
            if counts is not None:
                counts.append(selected.sum())
                counts.append(edit_rows[:, a:b].sum() * probs.shape[1])
            if sub.start == 0 and sub.stop == probs.shape[2]:
                return out
            probs = probs.clone()
            probs[:, :, sub] = out
            return probs

        call.edit_probs(edit)

    def stats(self) -> dict[str, Any]:
        """Per layer: sink tokens (all / visual) and the share of (head, text row) pairs edited, at prefill."""
        state = getattr(self, "_state", None)
        layers = {}
        for layer, sink in sorted(self._sinks.items()):
            if sink is None:
                layers[layer] = {"skipped": "hidden states do not match the visual spans"}
                continue
            entry: dict[str, Any] = {"sinks": sink.sum(1).tolist()}
            layout = None if state is None else prompt_layout(state, layer, sink.device)
            if layout is not None and layout.visual.shape == sink.shape:
                entry["visual_sinks"] = (sink & layout.visual).sum(1).tolist()
            if self._counts.get(layer):
                sel, tot = torch.stack(self._counts[layer]).view(-1, 2).sum(0).tolist()
                entry["image_centric_share"] = sel / tot if tot else 0.0
            layers[layer] = entry
        return {"sink_dims": list(self._dims), "layers": layers}
