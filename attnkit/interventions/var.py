"""``var``: Visual Attention Redistribution — move attention from sink tokens to the other visual tokens."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from attnkit.interventions.base import Intervention, param, register
from attnkit.interventions.pai import prompt_layout
from attnkit.interventions.sinks import find_sink_dims, known_sink_dims, massive_counts, rank_sink_dims, sink_value

__all__ = ["VAR", "Redistribution", "find_sink_dims", "redistribute"]


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
    return Redistribution(sink, visual, p, rho, min_visual)(probs, edit_rows)


class Redistribution:
    """:func:`redistribute` for fixed key masks, precomputed so that a call costs a handful of small
    operations (decode runs it in every edited layer at every step).

    One matmul of the probabilities with four key columns gives, per row: the visual mass, the
    image-centric margin ``sum_{V \\ S} a - rho sum_{V} a``, ``p`` times the sink mass and the non-sink
    visual mass; the selection tests are then ``visual >= min_visual`` and ``margin >= 0``.
    Columns beyond the masks' length (generated tokens) are text: nothing to move there.
    """

    def __init__(self, sink: torch.Tensor, visual: torch.Tensor, p: float, rho: float, min_visual: float):
        sink, visual = sink.float(), visual.float()
        rest = visual * (1 - sink)
        self.cols = torch.stack([visual, rest - rho * visual, p * sink, rest], dim=-1)[:, None]   # [B, 1, kv, 4]
        self.keep = (1 - p * sink)[:, None, None]                                                # [B, 1, 1, kv]
        self.rest = rest[:, None, None]
        self.thresholds = torch.tensor([min_visual, 0.0], device=sink.device)
        self.check_rest = rho == 0 or min_visual == 0   # otherwise implied: rest >= rho*visual >= rho*min_visual > 0

    def grow(self, kv_len: int, room: int = 256) -> None:
        """Extend the masks with text columns to at least ``kv_len`` keys (long generations)."""
        have = self.cols.shape[2]
        if have < kv_len:
            extra = kv_len + room - have
            self.cols = torch.nn.functional.pad(self.cols, (0, 0, 0, extra))
            self.keep = torch.nn.functional.pad(self.keep, (0, extra), value=1.0)
            self.rest = torch.nn.functional.pad(self.rest, (0, extra))

    def __call__(self, probs: torch.Tensor, edit_rows: torch.Tensor | None,
                 offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``probs`` [B, H, r, kv] (float32) over key columns ``offset ... offset+kv-1`` (a sliding-window cache
        holds only the last keys), ``edit_rows`` [B, r] or None (all rows) -> (probs', selected)."""
        kv = probs.shape[-1]
        self.grow(offset + kv)
        keys = slice(offset, offset + kv)
        mass = torch.matmul(probs, self.cols[:, :, keys])                        # [B, H, r, 4]
        selected = (mass[..., :2] >= self.thresholds).all(-1)
        if edit_rows is not None:
            selected &= edit_rows[:, None, :]
        if self.check_rest:
            selected &= mass[..., 3] > 0
        gain = mass[..., 2] / mass[..., 3].clamp_min(torch.finfo(probs.dtype).tiny)   # p * sink / rest
        # a'_ij = a_ij * (1 - p [j in S] + gain_i [j in V \\ S]) on selected rows, a_ij elsewhere
        factor = torch.addcmul(self.keep[..., keys], gain.unsqueeze(-1), self.rest[..., keys])
        return torch.where(selected.unsqueeze(-1), probs * factor, probs), selected


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

    ``sink_dims``: given (``var:sink_dims=458+2570``), or by default from
    :data:`attnkit.interventions.sinks.SINK_DIMS` (keyed by the LLM's model_type, hidden size, layer count
    and MLP size), or ``auto`` (the default for a model off the table): found once, at the first prefill
    after ``wrap()`` that has images, with :func:`attnkit.find_sink_dims`' rule (the two dimensions with
    the most valid tokens reaching ``|x[d]|/RMS(x) >= tau``) on the hidden states entering the first edited
    layer at which any dimension reaches tau — layers before it have no sink under any choice of dims,
    so the result equals ``var:sink_dims=<found>``; fixed for later requests; ``stats()`` reports them and
    the layer. If no dimension reaches tau in any edited layer (e.g. a small random model:
    ``|x[d]|/RMS(x) <= sqrt(hidden)``), nothing is edited and ``stats()`` says so. Needs post-softmax
    probabilities: the chosen layers run
    eager attention on the rows it edits (prefill: the text after the image, chunked; decode: the new row),
    the other rows keep the model's kernel; a layer without any sink is not touched.
    Identity: ``p=0``.
    """

    name = "var"
    p: float = param(0.6, low=0.0, high=1.0, doc="fraction of sink attention moved (paper: p)")
    rho: float = param(0.5, low=0.0, high=1.0, doc="image-centric head: min non-sink visual share (paper: rho)")
    tau: float = param(20.0, low=0.0, low_open=True, doc="sink threshold on |x[d]|/RMS(x) (paper: tau)")
    min_visual_attention: float = param(0.2, low=0.0, high=1.0, doc="image-centric head: min visual attention")
    sink_dims: tuple[int, ...] | str | None = param(None, low=0, doc="sink dimensions d1+d2, or 'auto' (found at "
                                                    "the first prefill); default: the known table, else auto")
    first_layer: int = param(2, low=0, doc="first edited layer (paper: 2)")
    last_layer: bool = param(False, doc="also edit the last layer (the paper does not)")
    text_sinks: bool = param(True, doc="move attention from text sinks (BOS, ...) too, as the paper's equation")

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.sink_dims, str) and self.sink_dims != "auto":
            raise ValueError(f"var: sink_dims={self.sink_dims!r} is not allowed; use dimensions (sink_dims=458+2570) "
                             f"or sink_dims=auto")
        self._sinks: dict[int, torch.Tensor | None] = {}
        self._dims: tuple[int, ...] | None = ()      # None: auto, not found yet
        self._auto: dict[str, Any] | None = None     # auto: what was found (layer, peak ratio)
        self._counts: dict[int, list[torch.Tensor]] = {}
        self._prep: dict[tuple, tuple | None] = {}

    # --- install ------------------------------------------------------------------------------
    def attach(self, ctx) -> None:
        cfg = ctx.adapter.text_config
        dims = known_sink_dims(cfg) if self.sink_dims is None else self.sink_dims
        if dims is None or dims == "auto":
            self._dims, self._auto = None, {"layer": None, "peak_ratio": 0.0}
        else:
            bad = [d for d in dims if d >= cfg.hidden_size]
            if bad:
                raise ValueError(f"var: sink_dims {bad} out of range for hidden size {cfg.hidden_size}; "
                                 f"use dimensions in [0, {cfg.hidden_size})")
            self._dims = tuple(dims)
        self._state = ctx.state
        self._layers = self.attention_layers(ctx)
        for i in self._layers:
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
            if self._dims is None and bool(layout.visual.any()):
                self._find_dims(layer, hidden, layout.valid)
            if not self._dims:   # auto, nothing massive (yet): no sink under any choice of dimensions
                self._sinks[layer] = torch.zeros_like(layout.valid)
                return
            sink = (sink_value(hidden, self._dims) >= self.tau) & layout.valid
            if not self.text_sinks:
                sink &= layout.visual
            self._sinks[layer] = sink

        return hook

    def _find_dims(self, layer: int, hidden: torch.Tensor, valid: torch.Tensor) -> None:
        """``sink_dims=auto`` at the first prefill: :func:`find_sink_dims`' rule on this layer's input; decided at
        the first edited layer where a dimension reaches tau, or () after the last one."""
        count, peak = massive_counts(hidden, self.tau, valid)
        self._auto["peak_ratio"] = max(self._auto["peak_ratio"], float(peak.max()))
        found = rank_sink_dims(count, peak)
        if found:
            self._dims, self._auto["layer"] = found, layer
        elif layer == self._layers[-1]:
            self._dims = ()

    def reset(self) -> None:
        self._sinks, self._counts, self._prep = {}, {}, {}

    # --- attention ----------------------------------------------------------------------------
    def _prepared(self, call) -> tuple | None:
        """What this layer needs for the current request, computed once per request and layer (decode steps
        then cost no host synchronisation here), or None if the layer has nothing to move."""
        key = (call.layer_idx, id(call.state.spans), id(call.state.plan_at(call.layer_idx)))
        if key not in self._prep:
            sink = self._sinks.get(call.layer_idx)
            layout = prompt_layout(call.state, call.layer_idx, call.query.device)
            ok = (sink is not None and layout is not None and sink.shape == layout.visual.shape
                  and bool(sink.any()) and bool(layout.visual.any()))
            self._prep[key] = None
            if ok:
                has_image = layout.visual.any(1)[:, None]
                edit = Redistribution(sink.to(call.query.device), layout.visual, self.p, self.rho,
                                      self.min_visual_attention)
                self._prep[key] = (layout, edit, has_image, bool(has_image.all()))
        return self._prep[key]

    def on_attention(self, call) -> None:
        prep = self._prepared(call)
        if prep is None:
            return
        layout, redistribution, has_image, all_images = prep
        kv, q, step = call.kv_len, call.q_len, call.state.step
        offset = layout.key_offset(kv, step)     # > 0: a sliding-window layer's decode keys (the window only)
        if kv + offset < layout.length:
            return
        if q == 1 and step > 0:
            # a generated token: edited in every sample with an image
            edit_rows, lo, hi = (None if all_images else has_image), 0, 1
        else:
            # query rows sit at key columns kv-q ... kv-1; prompt rows: text after the sample's first image
            pos = torch.arange(kv - q, kv, device=call.query.device)
            text = layout.text_after_image[:, pos.clamp(max=layout.length - 1)]
            edit_rows = torch.where((pos < layout.length)[None, :], text, has_image)
            rows_any = edit_rows.any(0).nonzero()
            if rows_any.numel() == 0:
                return
            lo, hi = int(rows_any[0]), int(rows_any[-1]) + 1     # the block of rows worth editing (prefill: text)
        counts = self._counts.setdefault(call.layer_idx, []) if q > 1 else None   # stats: prefill rows only

        def edit(rows: slice, probs: torch.Tensor) -> torch.Tensor:
            er = None if edit_rows is None else edit_rows[:, rows]
            out, selected = redistribution(probs, er, offset)
            if counts is not None:
                counts.append(selected.sum())
                counts.append(er.sum() * probs.shape[1])
            return out

        call.edit_probs(edit, rows=slice(lo, hi))

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
        out: dict[str, Any] = {"sink_dims": None if self._dims is None else list(self._dims), "layers": layers}
        if self._auto is not None:
            if self._dims is None:
                out["sink_dims_auto"] = "not found yet: found at the first prefill with images"
            elif self._dims:
                out["sink_dims_auto"] = (f"found at layer {self._auto['layer']} of the first prefill (tokens with "
                                         f"|x[d]|/RMS(x) >= tau={self.tau})")
            else:
                out["sink_dims_auto"] = (f"no hidden dimension reached |x[d]|/RMS(x) >= tau={self.tau} in layers "
                                         f"{self._layers[0]}..{self._layers[-1]} at the first prefill (largest ratio "
                                         f"{self._auto['peak_ratio']:.2f}): nothing is edited")
        return out
