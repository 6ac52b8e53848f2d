"""The model adapter: everything model-specific, asked by the rest of attnkit instead of ``isinstance``."""

from __future__ import annotations

import inspect

import torch
from transformers.masking_utils import create_causal_mask

from attnkit.models.spans import VisualSpans


class ModelAdapter:
    """Where a vision-language model keeps its parts, and how its visual tokens are laid out.

    Subclasses set ``families`` (``{class name: family}``) and implement the accessors below.
    """

    families: dict[str, str] = {}
    # False: the family's token pruning is not written yet; the token dropper (every pruner) refuses it at wrap()
    supports_token_dropping: bool = True
    # None, or why a second image encoding cannot stand in for the first (vcd re-encodes a noised image)
    noised_images_unsupported: str | None = None

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.family = self.families[type(model).__name__]
        params = list(inspect.signature(model.forward).parameters)
        self._arg_index = {name: i for i, name in enumerate(params)}

    # --- parts --------------------------------------------------------------------------------
    @property
    def language_model(self) -> torch.nn.Module:
        return self.model.model.language_model

    @property
    def decoder_layers(self) -> torch.nn.ModuleList:
        return self.language_model.layers

    @property
    def text_config(self):
        return self.model.config.get_text_config()

    @property
    def num_layers(self) -> int:
        return len(self.decoder_layers)

    @property
    def num_heads(self) -> int:
        return self.text_config.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        return self.text_config.num_key_value_heads

    @property
    def vision_tower(self) -> torch.nn.Module:
        return self.model.model.vision_tower

    @property
    def projector(self) -> torch.nn.Module:
        return self.model.model.multi_modal_projector

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    def image_token_counts(self, args: tuple, kwargs: dict) -> list[int] | None:
        """Visual tokens of each image of a top-model forward call, in batch order (None if unknown).

        ``generate()`` hands the prefill pre-encoded images (``mm_encoder_outputs``): their rows are
        the counts. A plain forward gets pixels; each family computes the counts from its inputs.
        """
        encoded = self.forward_arg("mm_encoder_outputs", args, kwargs)
        if encoded and encoded.get("image") is not None:
            return [f.shape[0] for f in encoded["image"].pooler_output]
        return None

    # --- inputs -------------------------------------------------------------------------------
    def forward_arg(self, name: str, args: tuple, kwargs: dict):
        """Argument ``name`` of a call to the top model's ``forward``, given positionally or by keyword."""
        if name in kwargs:
            return kwargs[name]
        i = self._arg_index.get(name)
        return args[i] if i is not None and i < len(args) else None

    # --- vision capture -------------------------------------------------------------------------
    vision_scores: tuple[str, ...] = ()   # the scores install_vision_capture can deliver; the first is the default
    fixed_visual_tokens: int | None = None  # visual tokens of every image, where the family fixes them (else None)

    def install_vision_capture(self, installed, wants: frozenset[str], sink) -> None:
        """Hook the vision tower so that each forward calls ``sink(images)``: one dict per image (batch order)
        holding, per visual token the LLM receives for that image and in the LLM's token order:

        - ``"cls"`` / ``"received"`` [n]: the [CLS]→patch attention, or the mean attention each token receives,
          at the layer whose output feeds the LLM (head mean; pooled over a merge unit where tokens merge);
        - ``"keys"`` [n, d]: that layer's keys (head mean, pooled likewise);
        - ``"features"`` [n, ...]: the rows the projector maps to the LLM tokens (:meth:`project` takes them);
        - ``"group"`` [n] (always): the crop/tile each token comes from (0 = the base image), -1 for tokens
          that are layout, not content (NeXT's / OneVision's row newlines: kept by the pruners that select
          before the LLM; in-LLM pruners rank every visual position).

        ``wants`` is a subset of ``{"cls", "received", "keys", "features"}`` (scores: see :attr:`vision_scores`).
        """
        raise NotImplementedError(f"{self.family}: no vision capture")

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """The projector applied to captured ``"features"`` rows (e.g. merged ones): LLM input embeddings [m, D]."""
        raise NotImplementedError(f"{self.family}: no projector access")

    def check_vision_wants(self, wants: frozenset[str]) -> None:
        known = {"cls", "received", "keys", "features"}
        bad = sorted(set(wants) - known)
        if bad:
            raise ValueError(f"unknown vision quantity {bad[0]!r}; one of {sorted(known)}")
        scores = [w for w in wants if w in ("cls", "received")]
        for w in scores:
            if w not in self.vision_scores:
                raise ValueError(f"score={w!r} is not available for {self.family}; use one of {self.vision_scores}")

    # --- language model ---------------------------------------------------------------------------
    @property
    def final_norm(self) -> torch.nn.Module:
        """The LLM's final norm (applied to the last layer's output before the LM head)."""
        return self.language_model.norm

    def attention_input(self, layer_idx: int, hidden: torch.Tensor) -> torch.Tensor:
        """What decoder layer ``layer_idx``'s attention receives for residual stream ``hidden`` (its input norm)."""
        return self.decoder_layers[layer_idx].input_layernorm(hidden)

    def install_token_dropping(self, ctx) -> None:
        """Called by the token dropper at ``wrap()``: install what the family needs so that per-token side inputs of
        the language model follow the dropper's plans (``ctx.state.keep_plans``); default: nothing."""

    def layer_output(self, layer_idx: int, hidden: torch.Tensor) -> torch.Tensor:
        """Decoder layer ``layer_idx``'s output as the next layer receives it (prefill, current layout); default:
        unchanged. Called by the token dropper before a stage at layer ``layer_idx + 1`` decides."""
        return hidden

    def visual_spans(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                     image_token_counts: list[int] | None = None) -> VisualSpans:
        return VisualSpans.from_input_ids(input_ids, self.image_token_id, attention_mask, image_token_counts)

    # --- masks and rotary of a shortened sequence (the token dropper, attnkit.hooks.drop) ------------------
    # True: kept_masks() rebuilds sliding-window masks correctly (the dropper refuses sliding layers otherwise)
    rebuilds_sliding_masks: bool = False

    def mask_inputs(self, args: tuple, kwargs: dict) -> dict:
        """What :meth:`kept_masks` needs from a top-model forward call besides the padding mask (default: nothing)."""
        return {}

    def kept_masks(self, inputs: dict, hidden: torch.Tensor, mask_2d: torch.Tensor, cache, from_layer: int,
                   kept: torch.Tensor | None):
        """The ``attention_mask`` of decoder layers ``from_layer`` on when they run on kept tokens only.

        ``inputs``: :meth:`mask_inputs` of this forward; ``hidden`` [B, q, D] the rows entering ``from_layer``;
        ``mask_2d`` the padding mask over kept (+ generated) columns; ``kept`` [B, Lk] the kept prompt positions
        (-1 on pad slots) at prefill, None at decode. ``from_layer == 0``: what the language model receives
        (default: ``mask_2d``, the model builds its causal mask); else what each layer receives (default: the
        causal mask sized against ``from_layer``'s cache). A dict is read by layer type (``layer_types``).
        """
        if from_layer == 0:
            return mask_2d
        return create_causal_mask(config=self.language_model.config, inputs_embeds=hidden, attention_mask=mask_2d,
                                  past_key_values=cache, layer_idx=from_layer)

    def layer_rotary(self, layer_idx: int, rotary: tuple, position_ids: torch.Tensor | None, like: torch.Tensor):
        """Decoder layer ``layer_idx``'s rotary ``(cos, sin)`` given layer 0's (``rotary``) and the language model's
        ``position_ids``; default: one rotary embedding for every layer."""
        return rotary


def keep_output(store: dict, name: str):
    """A forward hook that keeps its module's output (a tuple's first element) in ``store[name]``."""
    def hook(module, args, out):
        store[name] = out[0] if isinstance(out, tuple) else out
    return hook


def mean_received_attention(query: torch.Tensor, key: torch.Tensor, scale: float, chunk: int = 512) -> torch.Tensor:
    """``mean_q softmax(q kᵀ · scale)[q, k]`` in float32, query rows in chunks (bounded memory):
    query [..., n_q, d], key [..., n_k, d] -> [..., n_k]."""
    total = None
    for rows in torch.split(torch.arange(query.shape[-2], device=query.device), chunk):
        p = torch.softmax((query[..., rows, :] @ key.transpose(-1, -2)).float() * scale, dim=-1).sum(-2)
        total = p if total is None else total + p
    return total / query.shape[-2]


# model classes attnkit knows and refuses, with the reason (a wrong result would be worse than none)
REFUSED = {
    name: ("Qwen3.5 is not supported yet: its hybrid decoder interleaves Gated DeltaNet (linear-attention) layers, "
           "which have no attention probabilities or mask for attnkit's interventions to edit")
    for name in ("Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration")
}


def _adapters() -> tuple[type[ModelAdapter], ...]:
    from attnkit.models.gemma3 import Gemma3Adapter
    from attnkit.models.internvl import InternVLAdapter
    from attnkit.models.llava import LlavaAdapter
    from attnkit.models.llava_onevision import LlavaOnevisionAdapter
    from attnkit.models.qwen3_vl import Qwen3VLAdapter
    from attnkit.models.qwen_vl import QwenVLAdapter

    return (LlavaAdapter, QwenVLAdapter, Qwen3VLAdapter, LlavaOnevisionAdapter, InternVLAdapter, Gemma3Adapter)


def family_names() -> dict[str, str]:
    """``{model class name: family}`` for every supported class."""
    return {name: family for a in _adapters() for name, family in a.families.items()}


def supported_classes() -> list[str]:
    return [name for a in _adapters() for name in a.families]


def get_adapter(model) -> ModelAdapter:
    """The adapter for ``model``; ``TypeError`` naming its class and the supported ones otherwise."""
    name = type(model).__name__
    for adapter in _adapters():
        if name in adapter.families:
            return adapter(model)
    if name in REFUSED:
        raise TypeError(f"attnkit does not support {name}: {REFUSED[name]}; supported model classes: "
                        f"{', '.join(supported_classes())}")
    raise TypeError(f"attnkit does not support {name}; supported model classes: {', '.join(supported_classes())}")
