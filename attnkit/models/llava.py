"""LLaVA-1.5 (``LlavaForConditionalGeneration``) and LLaVA-NeXT (``LlavaNextForConditionalGeneration``)."""

from __future__ import annotations

import functools
import types

import torch

from attnkit.models.base import ModelAdapter, mean_received_attention


class LlavaAdapter(ModelAdapter):
    """CLIP vision tower -> MLP projector -> Llama/Vicuna/Mistral LLM.

    LLaVA-1.5 gives every image the vision tower's patch count (576 for CLIP-L/336). LLaVA-NeXT's
    AnyRes gives each image base crop + unpadded grid + one newline token per grid row, a count
    that depends on the image size; it is computed as the processor computes it.
    """

    families = {"LlavaForConditionalGeneration": "llava", "LlavaNextForConditionalGeneration": "llava_next"}

    @property
    def vision_tower(self) -> torch.nn.Module:
        return self.model.model.vision_tower

    @property
    def projector(self) -> torch.nn.Module:
        return self.model.model.multi_modal_projector

    vision_scores = ("cls", "received")

    def install_vision_scores(self, installed, kind: str, sink) -> None:
        """[CLS]→patch attention (``cls``) or mean attention each patch receives (``received``) in the encoder
        layer whose output the LLM is fed (``vision_feature_layer``), averaged over heads.

        FasterVLM: ``attentions[select_layer][:, :, 0, 1:].mean(1)`` with ``select_layer = -2``; here the
        query/key projections of that layer are captured with forward hooks, so sdpa/flash stay on.
        """
        if kind not in self.vision_scores:
            raise ValueError(f"score={kind!r} is not available for {self.family}; use one of {self.vision_scores}")
        if not isinstance(self.model.config.vision_feature_layer, int):
            raise NotImplementedError("vision scores need a single vision_feature_layer")
        tower = self.vision_tower
        layers = getattr(tower, "vision_model", tower).encoder.layers
        f = self.model.config.vision_feature_layer
        attn = layers[(f % (len(layers) + 1)) - 1].self_attn
        captured = {}

        def keep_q(module, args, out):
            captured["q"] = out[:, :1] if kind == "cls" else out

        def keep_k(module, args, out):
            captured["k"] = out

        def score(module, args, out):
            q, k = captured.pop("q"), captured.pop("k")
            n, heads = k.shape[0], attn.num_heads
            q = q.view(n, q.shape[1], heads, -1).transpose(1, 2)
            k = k.view(n, k.shape[1], heads, -1).transpose(1, 2)
            s = mean_received_attention(q, k, attn.scale).mean(1)            # [n, 1 + patches]
            if self.model.config.vision_feature_select_strategy == "default":
                s = s[:, 1:]
            if self.family == "llava":
                sink(list(s), None)
            else:
                captured["crops"] = s

        installed.forward_hook(attn.q_proj, keep_q)
        installed.forward_hook(attn.k_proj, keep_k)
        installed.forward_hook(attn, score)
        if self.family == "llava_next":
            self._install_next_packing(installed, captured, sink)

    def _install_next_packing(self, installed, captured, sink) -> None:
        """Map per-crop scores onto LLaVA-NeXT's packed tokens (base crop, unpadded grid, row newlines).

        The scores ride through the model's own ``pack_image_features`` as a 1-dim feature, with +inf as
        the newline embedding, so they land exactly where the features land. ``sink`` gets, per image,
        the packed scores (+inf = newline token) and groups (0 = base crop, 1 = grid, -1 = newline).
        ``image_sizes`` only reaches ``get_image_features``, so that method is wrapped on this instance
        (restored on removal).
        """
        inner = self.model.model
        original = inner.get_image_features
        per_crop = self.patches_per_crop

        @functools.wraps(original)
        def get_image_features(pixel_values, image_sizes, *args, **kwargs):
            out = original(pixel_values, image_sizes, *args, **kwargs)
            crops = captured.pop("crops")
            counts = _crops_per_image(self.model.config, image_sizes)
            per_image = torch.split(crops[..., None].float(), counts)
            newline = torch.tensor([float("inf")], device=crops.device)
            strategy = kwargs.get("vision_feature_select_strategy") or self.model.config.vision_feature_select_strategy
            packed, lens = inner.pack_image_features(list(per_image), image_sizes, strategy, image_newline=newline)
            if isinstance(packed, torch.Tensor):
                packed = torch.split(packed, [int(n) for n in lens])
            scores = [f[:, 0] for f in packed]
            groups = []
            for sc in scores:
                g = torch.ones(len(sc), dtype=torch.long)
                g[:per_crop] = 0
                g[torch.isinf(sc).cpu()] = -1
                groups.append(g)
            sink(scores, groups)
            return out

        installed.set_attr(inner, "get_image_features", get_image_features)

    @property
    def patches_per_crop(self) -> int:
        vc = self.model.config.vision_config
        full = self.model.config.vision_feature_select_strategy == "full"
        return (vc.image_size // vc.patch_size) ** 2 + int(full)

    def image_token_counts(self, args: tuple, kwargs: dict) -> list[int] | None:
        counts = super().image_token_counts(args, kwargs)
        pixel_values = self.forward_arg("pixel_values", args, kwargs)
        if counts is not None or pixel_values is None:
            return counts
        if self.family == "llava":
            return [self.patches_per_crop] * pixel_values.shape[0]
        image_sizes = self.forward_arg("image_sizes", args, kwargs)
        return [self._next_tokens(int(h), int(w)) for h, w in image_sizes.tolist()]

    def _next_tokens(self, height: int, width: int) -> int:
        from transformers import LlavaNextProcessor

        cfg = self.model.config
        size, patch = cfg.vision_config.image_size, cfg.vision_config.patch_size
        ns = types.SimpleNamespace(image_processor=types.SimpleNamespace(image_grid_pinpoints=cfg.image_grid_pinpoints),
                                   patch_size=patch, num_additional_image_tokens=0)
        ns._get_unpadded_features = functools.partial(LlavaNextProcessor._get_unpadded_features, ns)
        n = LlavaNextProcessor._get_number_of_features(ns, height, width, size, size)
        return n + int(cfg.vision_feature_select_strategy == "full")


def _crops_per_image(config, image_sizes) -> list[int]:
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    return [image_size_to_num_patches(image_size=size, grid_pinpoints=config.image_grid_pinpoints,
                                      patch_size=config.vision_config.image_size) for size in image_sizes]
