"""``vhr``: Vision-aware Head Reinforcement — amplify the heads whose output depends most on the image."""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from attnkit.interventions.base import Intervention, param, register


def default_layers(num_layers: int) -> list[int]:
    """The paper's {1} ∪ last 14 layers of 32, scaled: {1} ∪ the last round(14 · L / 32) layers."""
    last = round(14 * num_layers / 32)
    return sorted({1, *range(num_layers - last, num_layers)} & set(range(num_layers)))


def head_divergence(with_image: torch.Tensor, text_only: torch.Tensor) -> torch.Tensor:
    """VHD per head with the paper's outlier removal: [B, H] from head outputs [B, H, D] of both branches.

    ``VHD_h = ||A_h(x_V, x_T) - A_h(x_T)||_2``; set to 0 where both ``VHD_h > mean + std`` and
    ``TA_h = ||A_h(x_T)||^2 > mean + std`` (means and population stds over the layer's heads).
    """
    vhd = (with_image.float() - text_only.float()).norm(dim=-1)
    ta = text_only.float().pow(2).sum(-1)

    def high(x: torch.Tensor) -> torch.Tensor:
        return x > x.mean(-1, keepdim=True) + x.std(-1, keepdim=True, unbiased=False)

    return torch.where(high(vhd) & high(ta), 0.0, vhd)


def select_heads(vhd: torch.Tensor) -> torch.Tensor:
    """Heads above the layer's median VHD: [..., H] bool (median of an even count = mean of the middle two)."""
    return vhd > vhd.quantile(0.5, dim=-1, keepdim=True)


@register
@dataclasses.dataclass
class VHR(Intervention):
    """VHR (He et al., "Cracking the Code of Hallucination in LVLMs with Vision-aware Head Divergence", ACL 2025).

    For each chosen layer l and head h, at the first generation step (the last prompt position):
    ``VHD_lh = ||A_lh(y|x_V, x_T) - A_lh(y|x_T)||_2``, A = the head's output before ``o_proj``, x_T = the
    same prompt without the image. Outlier heads (VHD and ``||A_lh(y|x_T)||^2`` both above mean + std of the
    layer) get VHD 0; the heads above the layer's median are reinforced at every position and step::

        A~_lh = alpha * A_lh     for h with VHD_lh > median_h' VHD_lh'

    Layer by layer: layer l's VHD is measured after layers < l were reinforced (select-then-reinforce),
    in one extra prefill forward that runs the prompt with and without the image as one batch in
    lockstep (the reinforcement applies to both branches); the heads are then fixed for the request's
    prefill and every decode step (the paper's Algorithm 1). "Without the image": the visual tokens are
    removed (Qwen: with ``<|vision_start|>``/``<|vision_end|>``), the rest of the prompt kept, left-padded.

    ``alpha`` (paper: alpha, 2); ``layers`` default {1} ∪ the last round(14 · L / 32) layers (the paper's
    {1, 18..31} for 32-layer LLaVA-1.5/NeXT). ``scores=heads.json`` loads per-layer head scores written by
    :meth:`VHR.calibrate` (mean VHD over samples) and uses the same heads for every input: no extra
    forward, but that is the paper's weaker "fixed VHR" ablation — per-sample selection is the method.
    Needs only head outputs (the model's sdpa/flash kernel stays). Identity: ``alpha=1``.
    """

    name = "vhr"
    files = ("scores",)
    alpha: float = param(2.0, low=0.0, low_open=True, doc="reinforcement factor of the chosen heads (paper: alpha)")
    layers: tuple[int, ...] | None = param(None, low=0, doc="reinforced layers (default: {1} ∪ last 14/32 of them)")
    scores: str | None = param(None, doc="JSON of precomputed head scores (VHR.calibrate) instead of per-sample")

    def __post_init__(self):
        super().__post_init__()
        self._factor: dict[int, torch.Tensor] = {}
        self._chosen: dict[int, torch.Tensor] = {}
        self._vhd: dict[int, torch.Tensor] = {}
        self._fixed: dict[int, torch.Tensor] | None = None
        self._selecting = False

    # --- install ------------------------------------------------------------------------------
    def attach(self, ctx) -> None:
        self._model, self._adapter, self._state = ctx.model, ctx.adapter, ctx.state
        self._layers = self.attention_layers(ctx)
        if self.scores is not None:
            self._fixed = self._load(Path(self.scores), ctx.adapter)
            self._factor = dict(self._fixed)
        else:
            ctx.installed.forward_pre_hook(ctx.model, self._before_forward, with_kwargs=True)

    def attention_layers(self, ctx) -> list[int]:
        n = ctx.adapter.num_layers
        layers = default_layers(n) if self.layers is None else sorted(set(self.layers))
        bad = [i for i in layers if i >= n]
        if bad:
            raise ValueError(f"vhr: layers {bad} do not exist; this model has layers 0..{n - 1}")
        return layers

    def conflicts_with(self, other: Intervention) -> str | None:
        if self.scores is None and getattr(other, "drops_tokens", False):
            return (f"per-sample vhr runs an extra prefill with and without the image, which {other.name}'s token "
                    f"dropping does not follow; use precomputed heads (vhr:scores=heads.json, from VHR.calibrate)")
        return None

    def _load(self, path: Path, adapter) -> dict[int, torch.Tensor]:
        data = json.loads(path.read_text())
        if data.get("method") != "vhr" or data.get("num_heads") != adapter.num_heads:
            raise ValueError(f"vhr: {path} holds scores for {data.get('num_heads')} heads of method "
                             f"{data.get('method')!r}; this model has {adapter.num_heads} heads (write it with "
                             f"VHR.calibrate on this model)")
        scores = {int(k): torch.tensor(v, dtype=torch.float32) for k, v in data["layers"].items()}
        missing = [i for i in self._layers if i not in scores]
        if missing:
            raise ValueError(f"vhr: {path} has no scores for layers {missing}; it has {sorted(scores)}")
        self._chosen = {i: select_heads(scores[i])[None] for i in self._layers}
        return {i: self._factors(c)[:, None, :, None] for i, c in self._chosen.items()}

    def _factors(self, chosen: torch.Tensor) -> torch.Tensor:
        return torch.where(chosen, self.alpha, 1.0)

    def reset(self) -> None:
        if self._fixed is None:
            self._factor, self._chosen, self._vhd = {}, {}, {}

    # --- per-sample selection: one lockstep forward of [with image; without image] ----------------
    def _before_forward(self, module, args, kwargs) -> None:
        state = self._state
        if state.step != 0 or self._selecting:
            return
        self._factor, self._chosen, self._vhd = {}, {}, {}
        spans = state.spans
        if spans is None or not spans.has_images():
            return
        names = list(inspect.signature(self._model.forward).parameters)
        call = {**dict(zip(names, args)), **kwargs}
        inner, text_mask = self._paired_inputs(call, spans)
        if "logits_to_keep" in names:
            inner["logits_to_keep"] = 1  # only head outputs are needed: skip the full-vocabulary logits
        counts = self._adapter.image_token_counts(args, kwargs)
        saved_spans = state.spans
        saved_rope = [(m, m.__dict__["rope_deltas"]) for m in self._model.modules() if "rope_deltas" in m.__dict__]
        self._batch, self._has_image = spans.batch_size, spans.visual.any(1)
        self._selecting = True
        try:
            state.spans = self._adapter.visual_spans(inner["input_ids"], inner["attention_mask"], counts)
            with torch.no_grad():
                self._model.forward(**inner)  # the module's own hooks (ours, the handle's) are not re-entered
        finally:
            self._selecting = False
            state.spans = saved_spans
            for m, value in saved_rope:
                m.rope_deltas = value

    def _paired_inputs(self, call: dict, spans) -> tuple[dict, torch.Tensor]:
        input_ids = call.get("input_ids")
        if input_ids is None:
            raise ValueError("vhr: per-sample head selection needs input_ids in the prefill call (got inputs_embeds);"
                             " pass input_ids, or use precomputed heads with vhr:scores=heads.json")
        B, L = input_ids.shape
        device = input_ids.device
        mask = call.get("attention_mask")
        valid = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask.bool()
        drop = spans.visual.to(device)
        cfg = self._model.config
        for attr in ("vision_start_token_id", "vision_end_token_id"):
            tid = getattr(cfg, attr, None)
            if tid is not None:
                drop = drop | (input_ids == tid)
        keep = valid & ~drop
        order = torch.sort(keep.long(), dim=1, stable=True).indices      # dropped first, kept (in order) last
        text_valid = keep.gather(1, order)
        pad = getattr(self._adapter.text_config, "pad_token_id", None) or 0
        inner: dict[str, Any] = {}
        for name, value in call.items():
            if name in ("past_key_values", "labels", "use_cache", "logits_to_keep", "return_dict", "cache_position"):
                continue
            if name == "position_ids" and torch.is_tensor(value):
                text_pos = (text_valid.long().cumsum(1) - 1).clamp(min=0)
                text_pos = text_pos.expand(*value.shape[:-2], B, L).to(value.dtype)
                inner[name] = torch.cat([value, text_pos], dim=-2)
            elif torch.is_tensor(value) and value.dim() >= 2 and tuple(value.shape[:2]) == (B, L):
                moved = value.gather(1, order.view(B, L, *[1] * (value.dim() - 2)).expand_as(value))
                fill = pad if name == "input_ids" else 0
                moved = torch.where(text_valid.view(B, L, *[1] * (value.dim() - 2)), moved, fill)
                if name == "attention_mask":
                    moved = text_valid.to(value.dtype)
                inner[name] = torch.cat([value, moved])
            else:
                inner[name] = value
        if "attention_mask" not in inner:
            inner["attention_mask"] = torch.cat([valid, text_valid]).long()
        inner["use_cache"] = False
        self._last = torch.cat([_last_valid(valid), _last_valid(text_valid)])
        return inner, text_valid

    # --- attention ----------------------------------------------------------------------------
    def on_attention(self, call) -> None:
        layer = call.layer_idx
        if self._selecting:
            call.edit_output(lambda out: self._select_and_scale(layer, out))
            return
        factor = self._factor.get(layer)
        if factor is None or factor.shape[0] not in (1, call.query.shape[0]):
            return
        call.edit_output(lambda out: out * factor.to(device=out.device, dtype=out.dtype))

    def _select_and_scale(self, layer: int, out: torch.Tensor) -> torch.Tensor:
        B = self._batch
        if out.shape[0] != 2 * B:
            return out
        rows = out[torch.arange(2 * B, device=out.device), self._last.to(out.device)]   # [2B, H, D]
        vhd = head_divergence(rows[:B], rows[B:])
        vhd = torch.where(self._has_image.to(vhd.device)[:, None], vhd, 0.0)
        chosen = select_heads(vhd)
        factor = self._factors(chosen)[:, None, :, None]                              # [B, 1, H, 1]
        self._vhd[layer], self._chosen[layer], self._factor[layer] = vhd.cpu(), chosen.cpu(), factor
        return out * torch.cat([factor, factor]).to(device=out.device, dtype=out.dtype)

    def stats(self) -> dict[str, Any]:
        """Per layer: the reinforced heads (per sample, or shared when loaded from ``scores``)."""
        heads = {layer: [c[b].nonzero().flatten().tolist() for b in range(c.shape[0])]
                 for layer, c in sorted(self._chosen.items())}
        return {"mode": "precomputed" if self._fixed is not None else "per-sample", "heads": heads}

    # --- calibration --------------------------------------------------------------------------
    @classmethod
    def calibrate(cls, model: torch.nn.Module, processor, samples: Iterable, out_path: str | Path,
                  alpha: float = 2.0, layers: tuple[int, ...] | None = None) -> dict[str, Any]:
        """Mean per-sample VHD (outliers zeroed) over ``samples`` (each with ``.image`` path and ``.question``),
        written as JSON to ``out_path`` for ``vhr:scores=out_path``; returns the written dict."""
        from PIL import Image

        from attnkit.hooks.handle import installed as intervene

        vhr = cls(alpha=alpha, layers=layers)
        total: dict[int, torch.Tensor] = {}
        n = skipped = 0
        device = next(model.parameters()).device
        with intervene(model, vhr) as handle:
            for sample in samples:
                content = [{"type": "image"}, {"type": "text", "text": sample.question}]
                prompt = processor.apply_chat_template([{"role": "user", "content": content}],
                                                       add_generation_prompt=True)
                try:
                    with Image.open(sample.image) as im:
                        image = im.convert("RGB")
                except (OSError, TypeError, ValueError):  # missing or unreadable image: the sample is skipped
                    skipped += 1
                    continue
                inputs = processor(images=[image], text=[prompt], return_tensors="pt").to(device)
                with torch.no_grad():
                    model(**inputs)
                for layer, vhd in vhr._vhd.items():
                    total[layer] = total.get(layer, 0) + vhd[0]
                n += 1
            num_heads = handle.adapter.num_heads
        if n == 0:
            raise ValueError(f"vhr.calibrate: no usable sample ({skipped} with a missing or unreadable image)")
        data = {"method": "vhr", "model": type(model).__name__, "num_heads": num_heads, "alpha": alpha,
                "samples": n, "skipped": skipped,
                "layers": {str(k): [round(float(x) / n, 6) for x in v] for k, v in sorted(total.items())}}
        if any(not math.isfinite(x) for v in data["layers"].values() for x in v):
            raise ValueError("vhr.calibrate: non-finite head scores; check the model and inputs")
        Path(out_path).write_text(json.dumps(data, indent=1))
        return data


def _last_valid(valid: torch.Tensor) -> torch.Tensor:
    """Index of each row's last valid position."""
    pos = torch.arange(valid.shape[1], device=valid.device)
    return torch.where(valid, pos, -1).amax(1).clamp(min=0)
