"""Qwen2-VL (``Qwen2VLForConditionalGeneration``) and Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``)."""

from __future__ import annotations

import sys

import torch

from attnkit.models.base import ModelAdapter, mean_received_attention


class QwenVLAdapter(ModelAdapter):
    """Native-resolution ViT (no [CLS]) -> 2x2 patch merger -> Qwen2 LLM with 3-D (t, h, w) mrope positions.

    Each image is ``<|vision_start|> <|image_pad|> * (t*h*w/4) <|vision_end|>``, so its tokens form
    one run; a sample may hold several images.
    """

    families = {"Qwen2VLForConditionalGeneration": "qwen2_vl", "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl"}

    @property
    def vision_tower(self) -> torch.nn.Module:
        return self.model.model.visual

    @property
    def projector(self) -> torch.nn.Module:
        return self.model.model.visual.merger

    @property
    def merge_size(self) -> int:
        return self.model.config.vision_config.spatial_merge_size

    def image_token_counts(self, args: tuple, kwargs: dict) -> list[int] | None:
        counts = super().image_token_counts(args, kwargs)
        grid = self.forward_arg("image_grid_thw", args, kwargs)
        if counts is not None or grid is None:
            return counts
        return (grid.prod(-1) // self.merge_size**2).tolist()

    vision_scores = ("received",)
    _projecting = False

    def install_vision_capture(self, installed, wants: frozenset[str], sink) -> None:
        """At the last full-attention vision block: the mean attention each patch receives (over heads and
        all query patches of its image, ``received``) and its keys before the rotary embedding (head mean,
        ``keys``), both averaged over each 2x2 merge unit; ``features`` = the merger's input rows of each
        merged token ([n, 4, D], what :meth:`project` maps). One row per LLM visual token, in the LLM's order.

        Qwen's ViT has no [CLS]; ``received`` is the substitute the FasterVLM/VisPruner author recommends
        (VisPruner issue #1). Qwen2.5-VL: its last full-attention block, un-permuted from window order.
        """
        self.check_vision_wants(wants)
        visual = self.vision_tower
        full = getattr(visual, "fullatt_block_indexes", None)
        block = visual.blocks[max(full) if full else len(visual.blocks) - 1]
        attn, unit = block.attn, self.merge_size**2
        rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision
        captured: dict = {}

        def keep_grid(module, args, kwargs):
            captured["grid"] = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)

        def keep_inputs(module, args, kwargs):
            captured["cu"] = kwargs.get("cu_seqlens", args[1] if len(args) > 1 else None)
            captured["pos"] = kwargs["position_embeddings"]

        def keep_qkv(module, args, out):
            captured["qkv"] = out

        def on_block(module, args, out):
            qkv, cu, pos = captured.pop("qkv"), captured.pop("cu"), captured.pop("pos")
            n = qkv.shape[0]
            q, k, _ = qkv.reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
            if "keys" in wants:
                captured["keys"] = k.float().mean(1).view(-1, unit, k.shape[-1]).mean(1)          # [n/unit, d]
            if "received" in wants:
                q, k = rotary(q, k, *pos)
                q, k = q.transpose(0, 1), k.transpose(0, 1)                                    # [H, n, d]
                received = [mean_received_attention(q[:, a:b], k[:, a:b], attn.scaling).mean(0)   # per image
                            for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]
                captured["received"] = torch.cat(received).view(-1, unit).mean(1)

        def on_merger(module, args):
            if self._projecting:      # project() runs the merger on merged rows: not a vision forward
                return
            x = args[0]
            if "features" in wants:
                captured["features"] = x.view(-1, unit, x.shape[-1])
            grid = captured.pop("grid")
            rows = {name: captured.pop(name) for name in ("received", "keys", "features") if name in captured}
            if full is not None:  # Qwen2.5-VL: blocks run in window order; undo it like the merger's output
                from transformers.vision_utils import get_vision_window_index

                window_index, _ = get_vision_window_index(grid, self.merge_size, visual.window_size,
                                                          visual.patch_size)
                order = torch.argsort(window_index.to(x.device))
                rows = {name: t[order.to(t.device)] for name, t in rows.items()}
            counts = (grid.prod(-1) // unit).tolist()
            split = {name: torch.split(t, counts) for name, t in rows.items()}
            sink([{"group": torch.zeros(c, dtype=torch.long), **{name: split[name][i] for name in split}}
                  for i, c in enumerate(counts)])

        installed.forward_pre_hook(visual, keep_grid, with_kwargs=True)
        if wants & {"received", "keys"}:
            installed.forward_pre_hook(attn, keep_inputs, with_kwargs=True)
            installed.forward_hook(attn.qkv, keep_qkv)
            installed.forward_hook(attn, on_block)
        installed.forward_pre_hook(self.projector, on_merger)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """The patch merger on merged units: ``features`` [m, 4, D] -> [m, D_llm]."""
        weight = next(self.projector.parameters())
        self._projecting = True
        try:
            return self.projector(features.reshape(-1, features.shape[-1]).to(weight.device, weight.dtype))
        finally:
            self._projecting = False
