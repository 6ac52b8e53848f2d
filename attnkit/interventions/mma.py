"""``mma``: AKI's modality-mutual attention — in prefill, image tokens also attend to the text that follows them."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from transformers.masking_utils import or_masks

from attnkit.hooks.attention import MASK_OVERLAYS
from attnkit.interventions.base import Intervention, param, register


def mma_blocks(visual: torch.Tensor, valid: torch.Tensor, input_ids: torch.Tensor | None = None,
               marker_ids: tuple[int, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(img, txt)`` [B, L]: image queries, and the text keys they may also see.

    ``txt``: valid non-visual tokens after the sample's first image, up to the end of the prompt, or,
    with ``marker_ids``, up to and including the first occurrence of that token sequence after the last
    image (AKI's ``<|assistant|>`` rule); a sample without the marker gets no block (plain causal).
    """
    img = visual & valid
    seen = torch.cumsum(visual.long(), dim=1) > 0
    txt = seen & ~visual & valid
    if marker_ids:
        m = len(marker_ids)
        L = visual.shape[1]
        pos = torch.arange(L, device=visual.device)
        last_image = torch.where(visual, pos, -1).amax(1)                                   # [B]
        hit = torch.ones(visual.shape[0], L - m + 1, dtype=torch.bool, device=visual.device)
        for k, tid in enumerate(marker_ids):
            hit &= input_ids[:, k:L - m + 1 + k] == tid
        hit &= pos[None, :L - m + 1] > last_image[:, None]
        found = hit.any(1)
        end = torch.where(found, hit.long().argmax(1) + m, 0)                              # exclusive
        txt &= pos[None, :] < end[:, None]
    return img, txt


def mma_mask_function(img: torch.Tensor, txt: torch.Tensor) -> Callable:
    """The mask function ORed into the causal one: ``img[b, q] & txt[b, kv] & (kv > q)`` (absolute indices)."""

    def fn(batch_idx, head_idx, q_idx, kv_idx):
        return img[batch_idx, q_idx] & txt[batch_idx, kv_idx] & (kv_idx > q_idx)

    return fn


@register
@dataclasses.dataclass
class MMA(Intervention):
    """Modality-mutual attention (AKI: Wang et al., "Seeing is Understanding: Unlocking Causal Attention into
    Modality-Mutual Attention for Multimodal LLMs").

    Prefill mask, per sample (True = may attend)::

        M[q, kv] = causal[q, kv]  OR  (q in I  and  kv in T  and  kv > q)

    I = the image's tokens; T = the text after the image in the prompt: the user's question, the
    end-of-turn tokens and the assistant header (AKI: up to and including ``<|assistant|>``). Inside the
    image the mask stays causal; text queries are unchanged; padding stays masked; decode steps use the
    plain causal mask over a cache whose image K/V saw the question. By default T runs to the end of the
    prompt, which is AKI's block when the prompt ends with the generation prompt; a prompt that already
    holds the answer (log-likelihood scoring) would let the image see it: then pass ``marker_ids`` (the
    token ids of the chat template's assistant marker, e.g. Qwen's ``<|im_start|> assistant``), and T
    ends after the first occurrence of the marker following the last image. Several images: each image's
    tokens see the text after them (other images' tokens stay causal).

    **Caveat:** AKI pre-trains and fine-tunes its model with this mask; applying it to a causally trained
    model (LLaVA, Qwen2-VL) is untested territory, not the paper's setting. Compare against the baseline.

    Needs: a mask function (composed with the causal one through attnkit's same-name mask function);
    works with sdpa and eager, impossible under flash attention (fails at ``wrap()``). No probabilities
    are materialised. Identity: a prompt with no text after its image.
    """

    name = "mma"
    marker_ids: tuple[int, ...] | None = param(None, low=0, doc="assistant-marker token ids ending the text block")

    def __post_init__(self):
        super().__post_init__()
        self._img: torch.Tensor | None = None
        self._txt: torch.Tensor | None = None
        self._applied = 0

    def attach(self, ctx) -> None:
        cfg = ctx.adapter.text_config
        impl = cfg._attn_implementation
        if "flash" in impl:
            raise ValueError(f"mma needs a mask function, which flash attention ignores (this model runs {impl!r}); "
                             f"load it with attn_implementation='sdpa' or 'eager', or call "
                             f"model.set_attn_implementation('sdpa') before wrapping")
        self._adapter, self._state = ctx.adapter, ctx.state
        key = id(cfg)
        MASK_OVERLAYS[key] = self._overlay
        ctx.installed.on_remove(lambda: MASK_OVERLAYS.pop(key, None))
        ctx.installed.forward_pre_hook(ctx.model, self._before_forward, with_kwargs=True)

    def reset(self) -> None:
        self._img = self._txt = None
        self._applied = 0

    def _before_forward(self, module, args, kwargs) -> None:
        if self._state.step != 0:
            return  # decode: plain causal (the overlay only acts on q_length > 1)
        spans = self._state.spans
        if spans is None or not spans.has_images():
            self._img = self._txt = None
            return
        input_ids = self._adapter.forward_arg("input_ids", args, kwargs)
        if self.marker_ids and input_ids is None:
            raise ValueError("mma: marker_ids needs input_ids in the prefill call (got inputs_embeds only)")
        self._img, self._txt = mma_blocks(spans.visual, spans.valid, input_ids, self.marker_ids)

    def _overlay(self, kwargs: dict) -> dict:
        img, txt = self._img, self._txt
        if img is None or kwargs.get("q_length", 1) <= 1:
            return kwargs
        plans = [p for p in self._state.keep_plans if kwargs.get("kv_length") == p.index.shape[1] != img.shape[1]]
        plan = plans[-1] if plans else None
        if plan is not None:
            # layers after a token dropper (its plans on ``state.keep_plans``) see only the kept positions
            index, slot = plan.index.to(img.device), plan.slot_valid.to(img.device)
            img, txt = img.gather(1, index) & slot, txt.gather(1, index) & slot
        # any other layout (an unknown shortened sequence, another batch) keeps the plain causal mask
        if kwargs.get("kv_length") != img.shape[1] or kwargs.get("batch_size") != img.shape[0]:
            return kwargs
        if not bool((img.any(1) & txt.any(1)).any()):
            return kwargs
        device = kwargs.get("device", img.device)
        kwargs = dict(kwargs)
        kwargs["mask_function"] = or_masks(kwargs["mask_function"], mma_mask_function(img.to(device), txt.to(device)))
        kwargs["allow_is_causal_skip"] = False
        self._applied += 1
        return kwargs

    def stats(self) -> dict[str, Any]:
        if self._img is None:
            return {"masks_changed": self._applied}
        return {"masks_changed": self._applied, "image_tokens": self._img.sum(1).tolist(),
                "text_keys_unlocked": self._txt.sum(1).tolist()}
