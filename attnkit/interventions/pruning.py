"""The pruning kit: a pruner says where it acts and overrides one ``select()``; this base owns the wiring.

A pruner is an :class:`Intervention` with ``drops_tokens = True`` that declares

- ``stages(num_layers)``: the layers where it acts (0 = before the LLM; K = between layers K-1 and K);
- ``vision``: what it reads from the vision tower at stage 0 (a subset of ``{"score", "keys", "features"}``;
  ``score`` is the family's [CLS] attention or its documented substitute, see :meth:`score_kind`);
- ``inside``: what it reads at a stage K > 0 (``"keys"``: layer K-1's keys; ``"attention"``: layer K-1's
  attention probabilities; ``"next_attention"``: the attention layer K would compute on the current tokens);

and overrides ``select(view)``: one image (:class:`ImageView`, stage 0) or one sample (:class:`SampleView`,
stage K) with what it asked for already cut to it, returning the kept token indices, or a
:class:`Selection` with replacement rows (merged tokens). Everything else — the token dropper (which
calls the decision from its own hook), the vision capture, per-image budgets with the field's name in
every error, LLaVA-NeXT's crop groups and newline tokens (always kept, never shown to ``select``),
"every image got its scores" checks (also for expanded batches: beams, ``num_return_sequences``),
stats and conflicts — lives here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from attnkit.hooks.attention import attention_scores
from attnkit.hooks.drop import Decision, Dropper, layout_at
from attnkit.interventions.base import Intervention


@dataclass
class Selection:
    """Kept token indices (into the view's tokens), and optionally new rows [m, D] for the LAST m of them
    (merged tokens, listed last): LLM input rows at stage 0, the residual stream entering layer K at stage K."""

    keep: torch.Tensor
    rows: torch.Tensor | None = None
    # [m, n]: merged row i = Σ_j weights[i, j]·(the view's token j), where the pruner says so; the dropper merges
    # per-token side inputs of the LLM alike (Qwen3-VL's DeepStack rows)
    weights: torch.Tensor | None = None


@dataclass
class ImageView:
    """One image before the LLM: its ``n`` content tokens (layout tokens such as NeXT's newlines excluded)."""

    sample: int
    image: int                      # index of the image in the batch (row-major)
    positions: torch.Tensor         # [n] prompt positions
    embeds: torch.Tensor            # [n, D] LLM input rows (projected)
    group: torch.Tensor             # [n] crop / tile of each token (0 = base image)
    score: torch.Tensor | None      # [n] the family's [CLS] attention or substitute
    keys: torch.Tensor | None       # [n, d] vision keys (head mean)
    features: torch.Tensor | None   # [n, ...] rows the projector maps
    project: Callable[[torch.Tensor], torch.Tensor]

    @property
    def n(self) -> int:
        return len(self.positions)


@dataclass
class SampleView:
    """One sample inside the LLM at stage ``layer``, in the layout that reaches layer ``layer``."""

    sample: int
    layer: int
    slots: torch.Tensor             # [n] slots of its visual tokens in the current layout
    positions: torch.Tensor         # [n] their prompt positions
    hidden_all: torch.Tensor        # [L, D] the residual stream entering layer ``layer``
    visual: torch.Tensor            # [L] bool
    valid: torch.Tensor             # [L] bool: not padding
    text: torch.Tensor              # [L] bool: valid text tokens after the image
    last: int                       # slot of the last real prompt token
    keys: torch.Tensor | None       # [H_kv, L, d] layer ``layer``-1's keys (post-RoPE), if asked
    final_norm: Callable[[torch.Tensor], torch.Tensor]
    _attention: Callable | None = None

    @property
    def n(self) -> int:
        return len(self.slots)

    @property
    def hidden(self) -> torch.Tensor:
        return self.hidden_all[self.slots.to(self.hidden_all.device)]

    def attention(self, rows: torch.Tensor) -> torch.Tensor:
        """Probabilities [H, len(rows), L] of query slots ``rows`` (softmax over all keys, as eager computes it)."""
        if self._attention is None:
            raise RuntimeError("this pruner did not ask for attention (inside = {'attention'} or {'next_attention'})")
        return self._attention(rows)

    def last_attention(self) -> torch.Tensor:
        """[n] the last real token's attention to the visual tokens, head mean (probabilities over all keys)."""
        row = self.attention(torch.tensor([self.last]))[:, 0].mean(0)
        return row[self.slots.to(row.device)]


def count(value: int | float, n: int, field: str, what: str) -> int:
    """Tokens out of ``n``: ``value`` is a count, or a ratio in (0, 1] (rounded, at least 1)."""
    if isinstance(value, float):
        return max(1, round(n * value))
    if value > n:
        raise ValueError(f"{field}={value} exceeds the {n} visual tokens of {what}; use {field} <= {n} or a ratio "
                         f"in (0, 1]")
    return value


def check_budget(name: str, field: str, value: int | float | None) -> None:
    if isinstance(value, float) and not 0.0 < value <= 1.0:
        raise ValueError(f"{name}: {field}={value} is out of range; allowed: a count >= 1 or a ratio in (0, 1]")


def split_budget(k: int, group: torch.Tensor, mode: str = "shared") -> dict[int, int]:
    """Tokens per group: ``shared`` in proportion to the groups' sizes (base image vs the rest, as FasterVLM's
    ``spatial_unpad`` branch), ``per_crop`` the same k for every crop (FasterVLM's LLaVA-NeXT rule)."""
    ids = [int(g) for g in group.unique()]
    if mode == "per_crop":
        each = max(1, round(k / len(ids)))
        return {g: min(each, int((group == g).sum())) for g in ids}
    sizes = {g: int((group == g).sum()) for g in ids}
    coarse = {0: [g for g in ids if g == 0], 1: [g for g in ids if g != 0]}
    out, given, n = {}, 0, len(group)
    parts = [p for p in coarse.values() if p]
    for j, members in enumerate(parts):
        size = sum(sizes[g] for g in members)
        share = k - given if j == len(parts) - 1 else round(k * size / n)
        given += share
        out[min(members)] = share
        for g in members[1:]:
            out[g] = 0
    return out


def topk_in_groups(score: torch.Tensor | None, group: torch.Tensor, k: int, mode: str = "shared") -> torch.Tensor:
    """Indices kept: the budget ``k`` split between groups (:func:`split_budget`), each share taken by top score
    (or evenly spaced when ``score`` is None); sorted."""
    budget = split_budget(k, group, mode)
    coarse = mode == "shared"
    chosen = []
    for g, k_g in budget.items():
        if k_g <= 0:
            continue
        members = ((group != 0) if (coarse and g != 0) else (group == g)).nonzero().squeeze(1)
        if score is None:
            pick = torch.linspace(0, len(members) - 1, k_g).round().long()
        else:
            pick = torch.topk(score[members], k_g).indices
        chosen.append(members[pick])
    return torch.cat(chosen).sort().values if chosen else torch.zeros(0, dtype=torch.long)


@dataclasses.dataclass
class Pruner(Intervention):
    """Base of all token-dropping methods (see the module docstring)."""

    drops_tokens: ClassVar[bool] = True
    vision: ClassVar[frozenset[str]] = frozenset()
    inside: ClassVar[frozenset[str]] = frozenset()
    budget_fields: ClassVar[tuple[str, ...]] = ()   # count-or-ratio fields, checked against fixed token counts
    stage_field: ClassVar[str | None] = None        # the int field naming the stage layer, checked at wrap()

    def __post_init__(self):
        super().__post_init__()
        for f in self.budget_fields:
            check_budget(self.name, f, getattr(self, f))
        self._ctx = None
        self._dropper: Dropper | None = None
        self._vision: list[dict] | None = None
        self._calls: dict[int, tuple] = {}

    # --- what a method overrides ---------------------------------------------------------------------
    def stages(self, num_layers: int) -> tuple[int, ...] | None:
        """Layers where the method acts (0 = before the LLM); None = decided at run time (any of 1..n-1)."""
        return (0,)

    def select(self, view: ImageView | SampleView) -> Selection | torch.Tensor | None:
        raise NotImplementedError

    def score_kind(self, adapter) -> str:
        return adapter.vision_scores[0]

    def check(self, ctx) -> None:
        """Extra checks at ``wrap()`` (after the budgets were checked against fixed token counts)."""

    def positions_compact(self) -> bool:
        return False

    # --- wiring --------------------------------------------------------------------------------------
    def attach(self, ctx) -> None:
        self._ctx = ctx
        adapter = ctx.adapter
        n = adapter.num_layers
        if self.stage_field is not None and getattr(self, self.stage_field) >= n:
            f = self.stage_field
            raise ValueError(f"{self.name}: {f}={getattr(self, f)} is out of range; this model has layers 0..{n - 1}, "
                             f"so use 1 <= {f} <= {n - 1}")
        fixed = adapter.fixed_visual_tokens
        for f in self.budget_fields:
            value = getattr(self, f)
            if fixed is not None and isinstance(value, int) and value > fixed:
                raise ValueError(f"{self.name}: {f}={value} exceeds the {fixed} visual tokens every image has on "
                                 f"{adapter.family}; use {f} <= {fixed} or a ratio in (0, 1]")
        self.check(ctx)
        stages = self.stages(n)
        if stages is not None and 0 in stages:
            wants = frozenset(self.score_kind(adapter) if w == "score" else w for w in self.vision)
            adapter.install_vision_capture(ctx.installed, wants, self._on_vision)
        self._dropper = Dropper(ctx, stages, self.decide, compact_positions=self.positions_compact())

    def attention_layers(self, ctx) -> list[int]:
        stages = self.stages(ctx.adapter.num_layers) or ()
        if self.inside & {"keys", "attention"}:
            return sorted({k - 1 for k in stages if k > 0})
        return []

    def conflicts_with(self, other: Intervention) -> str | None:
        if getattr(other, "drops_tokens", False):
            return "both drop visual tokens from the LLM; use one of them"
        return None

    def reset(self) -> None:
        self._calls = {}     # vision captures survive: generate() encodes the images before its first forward

    def _on_vision(self, images: list[dict]) -> None:
        self._vision = images

    def on_attention(self, call) -> None:
        spans = call.state.spans
        if call.is_prefill and spans is not None and call.q_len == call.kv_len:
            self._calls[call.layer_idx] = (call.query, call.key, call.mask, call.scaling)

    # --- decisions -----------------------------------------------------------------------------------
    def decide(self, layer: int, hidden: torch.Tensor) -> Decision | None:
        """Called by the dropper at prefill: the per-image / per-sample selections as one Decision."""
        spans = self._ctx.state.spans
        if layer == 0:
            views = self._image_views(spans, hidden)
        else:
            views = self._sample_views(spans, layer, hidden)
        keep = torch.zeros_like(spans.visual)
        keep[~spans.visual] = True
        rows: list = [None] * spans.batch_size
        weights: list = [[] for _ in range(spans.batch_size)]
        for view, always in views:
            chosen = self.select(view)
            if chosen is None:
                chosen = Selection(torch.arange(view.n))
            if not isinstance(chosen, Selection):
                chosen = Selection(chosen)
            idx = chosen.keep.to(view.positions.device).long()
            keep[view.sample, view.positions[idx]] = True
            keep[view.sample, always] = True
            if chosen.rows is not None and len(chosen.rows):
                pos = view.positions[idx[len(idx) - len(chosen.rows):]]
                old = rows[view.sample]
                rows[view.sample] = (pos, chosen.rows) if old is None else \
                    (torch.cat([old[0], pos]), torch.cat([old[1], chosen.rows.to(old[1])]))
                if chosen.weights is not None:
                    weights[view.sample].append((pos, view.positions, chosen.weights))
        return Decision(keep, rows if any(r is not None for r in rows) else None,
                        weights if any(weights) else None)

    def _image_views(self, spans, embeds: torch.Tensor) -> list[tuple[ImageView, torch.Tensor]]:
        images = [(b, pos) for b in range(spans.batch_size) for pos in spans.images(b)]
        captured = self._matched_captures(spans, len(images))
        adapter, kind = self._ctx.adapter, self.score_kind(self._ctx.adapter)
        views = []
        for i, (b, pos) in enumerate(images):
            cap = captured[i] if captured is not None else {}
            group = cap.get("group", torch.zeros(len(pos), dtype=torch.long)).cpu()
            if len(group) != len(pos):
                raise RuntimeError(f"{self.name}: image {i} of the batch has {len(pos)} tokens in the prompt but the "
                                   f"vision tower gave {len(group)}")
            content = group >= 0

            def cut(name, content=content, cap=cap):
                return cap[name][content.to(cap[name].device)] if name in cap else None

            score = cut(kind)
            view = ImageView(sample=b, image=i, positions=pos[content],
                             embeds=embeds[b, pos[content].to(embeds.device)], group=group[content],
                             score=None if score is None else score.float().cpu(), keys=cut("keys"),
                             features=cut("features"), project=adapter.project)
            views.append((view, pos[~content]))
        return views

    def _matched_captures(self, spans, n_images: int) -> list[dict] | None:
        """The vision captures of this prefill, one per prompt image; an expanded batch (beams,
        ``num_return_sequences``) repeats each sample's images, so its captures are repeated alike."""
        captured, self._vision = self._vision, None
        if captured is None:
            if self.vision:
                raise RuntimeError(f"{self.name}: no vision capture for this prefill (the images were not encoded by "
                                   f"this model's vision tower)")
            return None
        if len(captured) == n_images:
            return captured
        per_sample = [len(spans.images(b)) for b in range(spans.batch_size)]
        total = len(captured)
        for r in range(2, spans.batch_size + 1):
            if total * r == n_images and spans.batch_size % r == 0:
                out, start = [], 0
                for j in range(spans.batch_size // r):
                    k = per_sample[j * r]
                    out.extend(captured[start:start + k] * r)
                    start += k
                if start == total:
                    return out
        raise RuntimeError(f"{self.name}: got vision captures for {total} images but the prompt holds {n_images}")

    def _sample_views(self, spans, layer: int, hidden: torch.Tensor) -> list[tuple[SampleView, torch.Tensor]]:
        state, adapter = self._ctx.state, self._ctx.adapter
        visual, valid, text = (m.to(hidden.device) for m in layout_at(state, layer))
        plan = state.plan_at(layer)
        index = plan.index.to(hidden.device) if plan is not None else \
            torch.arange(spans.length, device=hidden.device).expand(spans.batch_size, -1)
        call = self._calls.get(layer - 1) if "attention" in self.inside or "keys" in self.inside else None
        if "next_attention" in self.inside:
            call = self._probe(layer, hidden, valid)
        views = []
        for b in range(spans.batch_size):
            slots = visual[b].nonzero().squeeze(1)
            if len(slots) == 0:
                continue
            last = int(valid[b].nonzero().max())
            keys = None
            if "keys" in self.inside and call is not None:
                keys = call[1][b]
            views.append((SampleView(sample=b, layer=layer, slots=slots.cpu(), positions=index[b, slots].cpu(),
                                     hidden_all=hidden[b], visual=visual[b], valid=valid[b], text=text[b], last=last,
                                     keys=keys, final_norm=adapter.final_norm,
                                     _attention=None if call is None else _row_attention(call, b)),
                          torch.zeros(0, dtype=torch.long)))
        return views

    def _probe(self, layer: int, hidden: torch.Tensor, valid: torch.Tensor) -> tuple:
        """Query/key of decoder layer ``layer`` on the current tokens, as that layer would compute them."""
        query, key, scaling = self._dropper.probe_attention(layer, hidden)
        allowed = torch.ones(hidden.shape[1], hidden.shape[1], dtype=torch.bool, device=hidden.device).tril()
        mask = allowed[None, None] & valid[:, None, None, :]
        return query, key, mask, scaling

    # --- report --------------------------------------------------------------------------------------
    def extra_stats(self) -> dict[str, Any]:
        return {}

    def stats(self) -> dict[str, Any]:
        return {**self.extra_stats(), **(self._dropper.stats() if self._dropper else {})}


def _row_attention(call: tuple, b: int) -> Callable[[torch.Tensor], torch.Tensor]:
    query, key, mask, scaling = call

    def rows_probs(rows: torch.Tensor) -> torch.Tensor:
        rows = rows.long().cpu()
        lo, hi = int(rows.min()), int(rows.max()) + 1
        m = mask[b:b + 1] if (mask is not None and mask.dim() == 4 and mask.shape[0] > 1) else \
            (mask if mask is None or mask.dim() == 4 else mask[b:b + 1])
        scores = attention_scores(query[b:b + 1, :, lo:hi], key[b:b + 1], m, scaling, lo, query.shape[2])
        return torch.softmax(scores, -1)[0][:, (rows - lo).to(scores.device)]

    return rows_probs
