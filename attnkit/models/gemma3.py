"""Gemma 3 (``Gemma3ForConditionalGeneration``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnkit.models.base import ModelAdapter, keep_output, mean_received_attention


class Gemma3Adapter(ModelAdapter):
    """SigLIP (no [CLS]) -> k x k average pooling to ``mm_tokens_per_image`` (256) soft tokens -> RMSNorm + linear
    projection -> Gemma 3 LLM.

    Each image is ``<start_of_image> <image_soft_token> * 256 <end_of_image>``. In the LLM the image tokens
    attend to each other bidirectionally: ``token_type_ids == 1`` runs become ``block_sequence_ids`` and the
    model builds, once per forward in ``Gemma3Model.forward``, a mask dict: ``full_attention`` = causal OR
    same-image block, ``sliding_attention`` = (causal OR same-image block) AND sliding window. Layers
    alternate local (sliding window) and global attention. Prefill only: ``generate()`` passes
    ``token_type_ids`` at the first step, decode steps get plain causal (and sliding) masks. A local
    layer's cache keeps only the last ``sliding_window - 1`` keys in decode; interventions that index key
    columns map them through that window (:class:`attnkit.interventions.pai.PromptLayout`).
    Text embeddings are scaled by sqrt(hidden) inside the embedding; image features are not.

    Token dropping: the layers that run on kept tokens get the masks the model's own mask functions
    (``create_masks_for_vision_model``, ``create_causal_mask`` / ``create_sliding_window_causal_mask``)
    build for the KEPT sequence, as the unmodified model fed only those tokens (at their original
    positions) would: kept image tokens of one image stay one bidirectional block, and the sliding window
    counts kept tokens (a local layer's cache holds the last ``sliding_window - 1`` kept keys). Pruners that
    read layer K-1's attention (FastV, SparseVLM) read it as the layer computed it (its own mask: window
    included on a local layer); PyramidDrop's probe of layer K uses that layer's rotary base and, as on every
    family, a plain causal mask (on a local layer the ranking row is not cut to the window).
    """

    families = {"Gemma3ForConditionalGeneration": "gemma3"}
    vision_scores = ("received",)
    rebuilds_sliding_masks = True

    @property
    def layer_types(self) -> list[str]:
        return list(self.text_config.layer_types)

    @property
    def sliding_window(self) -> int:
        return self.text_config.sliding_window

    @property
    def fixed_visual_tokens(self) -> int:
        return self.model.config.mm_tokens_per_image

    def image_token_counts(self, args: tuple, kwargs: dict) -> list[int] | None:
        counts = super().image_token_counts(args, kwargs)
        pixel_values = self.forward_arg("pixel_values", args, kwargs)
        if counts is not None or pixel_values is None:
            return counts
        return [self.model.config.mm_tokens_per_image] * pixel_values.shape[0]

    # --- vision capture -----------------------------------------------------------------------------
    def install_vision_capture(self, installed, wants: frozenset[str], sink) -> None:
        """At SigLIP's last encoder layer (whose output, after ``post_layernorm``, the projector pools): the
        mean attention each patch receives over all the image's query patches (``received``, head mean) and
        that layer's keys (head mean, ``keys``), both averaged over each k x k pooling unit exactly as the
        projector's ``avg_pool`` averages the patch rows (k = 4 on the checkpoints: 64x64 patches -> 16x16);
        ``features`` = the pooled rows the projector's RMSNorm + linear take (:meth:`project` maps them).
        One row per soft token, in the LLM's (row-major) order.

        SigLIP has no [CLS]; ``received`` is the substitute the FasterVLM/VisPruner author recommends
        (VisPruner issue #1), as for Qwen-VL. Query/key projections are captured with forward hooks, so
        sdpa/flash stay on in the tower.
        """
        self.check_vision_wants(wants)
        tower = self.vision_tower
        attn = getattr(tower, "vision_model", tower).encoder.layers[-1].self_attn
        projector = self.projector
        captured: dict = {}

        if wants & {"received", "keys"}:
            installed.forward_hook(attn.k_proj, keep_output(captured, "k"))
        if "received" in wants:
            installed.forward_hook(attn.q_proj, keep_output(captured, "q"))

        def pool(rows: torch.Tensor) -> torch.Tensor:
            """[n, P, c] per patch -> [n, tokens, c] averaged over each pooling unit (the projector's avg_pool)."""
            n, _, c = rows.shape
            side = projector.patches_per_image
            grid = rows.transpose(1, 2).reshape(n, c, side, side)
            return F.avg_pool2d(grid, projector.kernel_size, projector.kernel_size).flatten(2).transpose(1, 2)

        def on_pool(module, args, out):
            if "k" not in captured and "features" not in wants:
                return
            rows: dict[str, torch.Tensor] = {}
            if "k" in captured:
                k = captured.pop("k")
                n, patches = k.shape[:2]
                k = k.view(n, patches, attn.num_heads, -1).transpose(1, 2).float()           # [n, H, P, d]
                if "keys" in wants:
                    rows["keys"] = pool(k.mean(1))
                if "q" in captured:
                    q = captured.pop("q").view(n, patches, attn.num_heads, -1).transpose(1, 2).float()
                    received = mean_received_attention(q, k, attn.scale).mean(1)               # [n, P]
                    rows["received"] = pool(received[..., None])[..., 0]
            if "features" in wants:
                rows["features"] = out.flatten(2).transpose(1, 2)                              # [n, tokens, D]
            n_img = next(iter(rows.values())).shape[0]
            tokens = self.model.config.mm_tokens_per_image
            sink([{"group": torch.zeros(tokens, dtype=torch.long), **{name: t[i] for name, t in rows.items()}}
                  for i in range(n_img)])

        installed.forward_hook(projector.avg_pool, on_pool)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """The projector after its pooling (RMSNorm + linear) on pooled rows ``features`` [m, D_vision] -> [m, D]."""
        weight = self.projector.mm_input_projection_weight
        x = features.to(weight.device, weight.dtype)
        return torch.matmul(self.projector.mm_soft_emb_norm(x), weight)

    # --- masks and rotary of a shortened sequence (the token dropper) ----------------------------------------
    def mask_inputs(self, args: tuple, kwargs: dict) -> dict:
        return {"token_type_ids": self.forward_arg("token_type_ids", args, kwargs)}

    def _first_layer(self, kind: str, from_layer: int) -> int:
        """The first ``kind`` layer at or after ``from_layer`` (the cache layer a mask is sized against)."""
        types = self.layer_types
        return next((i for i in range(from_layer, len(types)) if types[i] == kind), types.index(kind))

    def kept_masks(self, inputs: dict, hidden: torch.Tensor, mask_2d: torch.Tensor, cache, from_layer: int,
                   kept: torch.Tensor | None) -> dict:
        """``{"full_attention", "sliding_attention"}`` for the kept sequence, as ``Gemma3Model.forward`` builds them
        (``create_masks_for_vision_model`` at prefill when ``token_type_ids`` were given: causal OR same-image
        block, the local one AND the window; decode / no ``token_type_ids``: ``create_masks_for_generate``'s causal
        and sliding-window masks), each sized against the first layer of its type from ``from_layer`` on (the
        layers before hold the full sequence). The block ids come from the KEPT tokens' ``token_type_ids`` and
        the window counts kept tokens, as for the model fed only those tokens."""
        from transformers.masking_utils import (
            _preprocess_mask_arguments,
            blockwise_overlay,
            create_causal_mask,
            create_sliding_window_causal_mask,
            maybe_pad_block_sequence_ids,
            sliding_window_overlay,
        )
        from transformers.models.gemma3.modeling_gemma3 import get_block_sequence_ids_for_mask

        config = self.language_model.config
        full_idx, sliding_idx = self._first_layer("full_attention", from_layer), \
            self._first_layer("sliding_attention", from_layer)
        kw = dict(config=config, inputs_embeds=hidden, attention_mask=mask_2d, past_key_values=cache)
        types = inputs.get("token_type_ids")
        if kept is None or types is None:
            return {"full_attention": create_causal_mask(**kw, layer_idx=full_idx),
                    "sliding_attention": create_sliding_window_causal_mask(**kw, layer_idx=sliding_idx)}
        kept = kept.to(types.device)
        kept_types = torch.where(kept >= 0, types.gather(1, kept.clamp(min=0)), 0)
        blocks = get_block_sequence_ids_for_mask(kept_types, device=hidden.device)
        early, _, _, _, kv_length, _, kv_offset = _preprocess_mask_arguments(**kw, position_ids=None,
                                                                             layer_idx=sliding_idx)
        padded = blocks if early else maybe_pad_block_sequence_ids(blocks, mask_2d, kv_length, kv_offset)
        return {"full_attention": create_causal_mask(**kw, block_sequence_ids=blocks, layer_idx=full_idx),
                "sliding_attention": create_causal_mask(**kw, or_mask_function=blockwise_overlay(padded),
                                                        and_mask_function=sliding_window_overlay(config.sliding_window),
                                                        layer_idx=sliding_idx)}

    def layer_rotary(self, layer_idx: int, rotary: tuple, position_ids: torch.Tensor | None, like: torch.Tensor):
        """Local and global layers have their own rotary bases: layer ``layer_idx``'s, from the language model's
        ``rotary_emb`` at the same positions."""
        kind = self.layer_types[layer_idx]
        if kind == self.layer_types[0] or position_ids is None:
            return rotary
        return self.language_model.rotary_emb(like, position_ids, kind)
