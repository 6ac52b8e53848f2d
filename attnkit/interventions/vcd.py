"""``vcd``: Visual Contrastive Decoding — contrast the logits with those of a diffusion-noised image."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from attnkit.hooks.branch import Branch, BranchInputs
from attnkit.interventions.base import Intervention, param, register


def noise_level(step: int) -> tuple[float, float]:
    """``(sqrt(abar_T), sqrt(1 - abar_T))`` of VCD's 1000-step schedule
    ``beta_t = sigmoid(linspace(-6, 6, 1000)) * (5e-3 - 1e-5) + 1e-5``, ``abar_T = prod_{t <= T} (1 - beta_t)``."""
    betas = torch.sigmoid(torch.linspace(-6, 6, 1000)) * (0.5e-2 - 1e-5) + 1e-5
    abar = torch.cumprod(1 - betas, dim=0)[step]
    return float(abar.sqrt()), float((1 - abar).sqrt())


def diffusion_noise(pixel_values: torch.Tensor, step: int, seed: int, units: list[int] | None = None) -> torch.Tensor:
    """``sqrt(abar_T) * v + sqrt(1 - abar_T) * eps`` on normalised ``pixel_values`` (VCD's ``add_diffusion_noise``).

    ``eps ~ N(0, I)`` is drawn per unit (``units``: row counts of each image along dim 0, e.g. Qwen's
    flattened patches per image; default: every [C, H, W] crop) from a CPU generator seeded by ``seed`` and
    the unit's content, so an image gets the same noise alone or in any batch, on any device.
    """
    a, b = noise_level(step)
    flat = pixel_values if units is not None else pixel_values.reshape(-1, *pixel_values.shape[-3:])
    parts = []
    for x in torch.split(flat, units or 1):
        data = x.detach().to("cpu", torch.float32).contiguous()
        digest = hashlib.blake2b(data.numpy().tobytes(), digest_size=8, key=str(seed).encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
        eps = torch.randn(data.shape, generator=gen)
        parts.append((a * data + b * eps).to(pixel_values.device, pixel_values.dtype))
    return torch.cat(parts).reshape(pixel_values.shape)


@register
@dataclasses.dataclass
class VCD(Intervention):
    """VCD (Leng et al., "Mitigating Object Hallucinations in LVLMs through Visual Contrastive Decoding", CVPR 2024).

    With l = logits(y | v, x) and l' = logits(y | v', x) for a diffusion-noised image v' (T = ``noise_step``
    of 1000, :func:`diffusion_noise`, on the processor's normalised pixels as the released code does)::

        cd = (1 + alpha) * l - alpha * l',      cd[l < log(beta) + max l] = -inf

    i.e. the adaptive plausibility set V_head = {y : p(y|v, x) >= beta * max p}. ``alpha`` (paper: alpha, 1),
    ``beta`` (paper: beta, 0.1; the bundled POPE script uses 0.2), ``noise_step`` (paper: T, 500), ``seed``
    of the noise (deterministic per image content; the released code draws from the global RNG). The second
    branch is the same prompt with the noised image's features and its own KV cache (the released code's
    fixed version, c637c85; the first release reused the clean cache after step 1). Differences: the
    released code patches only sampling (greedy and beam search silently skip VCD); here ``cd`` replaces the
    logits for every decoding method. Cost: the vision tower twice and two forwards per step, two KV caches.
    Identity: ``alpha=0`` with ``beta`` below every token's probability ratio. Qwen3-VL: the noised branch gets
    the noised image's DeepStack rows too (its own encoding's ``deepstack_features``).
    """

    name = "vcd"
    alpha: float = param(1.0, low=0.0, doc="contrast strength (paper: alpha)")
    beta: float = param(0.1, low=0.0, high=1.0, low_open=True, doc="plausibility cut (paper: beta)")
    noise_step: int = param(500, low=0, high=999, doc="diffusion step T of the distortion (paper: T)")
    seed: int = param(0, low=0, doc="seed of the noise")

    def __post_init__(self):
        super().__post_init__()
        self._noised: list[torch.Tensor] | None = None
        self._stacked = False
        self._noised_deepstack: list[list[torch.Tensor]] | None = None   # per level, per image (Qwen3-VL)
        self._encoded_type = BaseModelOutputWithPooling
        self._branch = None

    def attach(self, ctx) -> None:
        if ctx.adapter.noised_images_unsupported:
            raise ValueError(f"vcd is not supported on {ctx.adapter.family} yet: "
                             f"{ctx.adapter.noised_images_unsupported}")
        self._branch = Branch(ctx, self._inputs, self.contrast)
        base = ctx.model.base_model
        original = base.get_image_features
        params = inspect.signature(original).parameters

        @functools.wraps(original)
        def get_image_features(*args, **kwargs):
            out = original(*args, **kwargs)
            if not self._branch.active:   # every encoding of the main branch: encode its noised twin too
                call = inspect.signature(original).bind(*args, **kwargs).arguments
                grid = call.get("image_grid_thw")
                pixels = call.pop("pixel_values")
                units = None if grid is None or pixels.dim() != 2 else grid.prod(-1).tolist()
                noised = diffusion_noise(pixels, self.noise_step, self.seed, units)
                extra = call.pop("kwargs", {}) if "kwargs" in params else {}
                encoded = original(noised, **call, **extra)
                features = encoded.pooler_output
                self._stacked = isinstance(features, torch.Tensor)   # Gemma 3: one [images, tokens, D] tensor
                self._noised, self._encoded_type = list(features), type(encoded)
                deepstack = getattr(encoded, "deepstack_features", None)   # Qwen3-VL: the noised image's own
                self._noised_deepstack = None if deepstack is None else [list(level) for level in deepstack]
            return out

        ctx.installed.set_attr(base, "get_image_features", get_image_features)

    def conflicts_with(self, other: Intervention) -> str | None:
        if getattr(other, "drops_tokens", False):
            return f"the noised-image branch does not follow {other.name}'s token dropping"
        if getattr(other, "cfg", False):
            return "both replace the logits with a second branch; use pai:cfg=false with vcd"
        return None

    def contrast(self, logits: torch.Tensor, noised: torch.Tensor) -> torch.Tensor:
        """The VCD step on [B, V] logits of the clean and the noised image."""
        cd = (1 + self.alpha) * logits - self.alpha * noised
        cut = logits < torch.log(torch.tensor(self.beta)) + logits.max(-1, keepdim=True).values
        return cd.masked_fill(cut, float("-inf"))

    def _inputs(self, call: dict, state, branch, prefill: bool) -> BranchInputs:
        kw = {k: v for k, v in call.items() if k not in ("past_key_values", "pixel_values", "mm_encoder_outputs")}
        if prefill:
            order = self._expanded(state)
            features = [self._noised[i] for i in order]
            fields = {"pooler_output": torch.stack(features) if self._stacked else features}
            if self._noised_deepstack is not None:
                fields["deepstack_features"] = [[level[i] for i in order] for level in self._noised_deepstack]
            kw["mm_encoder_outputs"] = {"image": self._encoded_type(**fields)}
        return BranchInputs(kw, same_layout=True)

    def _expanded(self, state) -> list[int]:
        """Which of the last encoded images (kept: generate without a cache encodes once for every step) feed the
        noised branch, in prompt-row order: generate repeats each sample's group for beams / return sequences."""
        images, rows = self._noised, state.spans.visual.sum(1).tolist()
        total = sum(len(f) for f in images or [])
        if not images or sum(rows) % total:
            raise RuntimeError(f"vcd: the prompt holds {sum(rows)} image tokens but the last image encoding "
                               f"gave {total}; pass pixel_values with the prompt (forward or generate)")
        k, out, i = sum(rows) // total, [], 0
        for s in range(len(rows) // k):
            group, need = [], rows[s * k]
            while need > 0:
                group.append(i)
                need, i = need - len(images[i]), i + 1
            out += group * k
        return out

    def stats(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "beta": self.beta, "noise_step": self.noise_step}
