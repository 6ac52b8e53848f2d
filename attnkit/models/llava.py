"""LLaVA-1.5 (``LlavaForConditionalGeneration``) and LLaVA-NeXT (``LlavaNextForConditionalGeneration``)."""

from __future__ import annotations

import functools
import types

import torch

from attnkit.models.base import ModelAdapter, keep_output, mean_received_attention


class LlavaAdapter(ModelAdapter):
    """CLIP vision tower -> MLP projector -> Llama/Vicuna/Mistral LLM.

    LLaVA-1.5 gives every image the vision tower's patch count (576 for CLIP-L/336). LLaVA-NeXT's
    AnyRes gives each image base crop + unpadded grid + one newline token per grid row, a count
    that depends on the image size; it is computed as the processor computes it.
    """

    families = {"LlavaForConditionalGeneration": "llava", "LlavaNextForConditionalGeneration": "llava_next"}

    vision_scores = ("cls", "received")

    @property
    def fixed_visual_tokens(self) -> int | None:
        return self.patches_per_crop if self.family == "llava" else None

    def _feature_layer(self) -> torch.nn.Module:
        if not isinstance(self.model.config.vision_feature_layer, int):
            raise NotImplementedError("vision capture needs a single vision_feature_layer")
        tower = self.vision_tower
        layers = getattr(tower, "vision_model", tower).encoder.layers
        f = self.model.config.vision_feature_layer
        return layers[(f % (len(layers) + 1)) - 1]

    def install_vision_capture(self, installed, wants: frozenset[str], sink) -> None:
        """At the encoder layer whose output the LLM is fed (``vision_feature_layer``): [CLS]→patch attention
        (``cls``) or mean attention each patch receives (``received``), averaged over heads; the layer's keys
        (head mean); its output rows (``features``, what the projector maps). [CLS] itself is dropped as the
        model drops it (``vision_feature_select_strategy="default"``).

        FasterVLM: ``attentions[select_layer][:, :, 0, 1:].mean(1)`` with ``select_layer = -2``; here the
        query/key projections of that layer are captured with forward hooks, so sdpa/flash stay on.
        LLaVA-NeXT: every crop is captured alike and the per-crop rows are packed like the features.
        """
        self.check_vision_wants(wants)
        layer = self._feature_layer()
        attn = layer.self_attn
        drop_cls = int(self.model.config.vision_feature_select_strategy == "default")
        captured: dict = {}

        if wants & {"cls", "received", "keys"}:
            installed.forward_hook(attn.k_proj, keep_output(captured, "k"))
        if wants & {"cls", "received"}:
            installed.forward_hook(attn.q_proj, keep_output(captured, "q"))

        def on_layer(module, args, out):
            n_img, heads = (out[0] if isinstance(out, tuple) else out).shape[0], attn.num_heads
            crops: dict[str, torch.Tensor] = {}
            if "k" in captured:
                k = captured.pop("k")
                k = k.view(n_img, k.shape[1], heads, -1).transpose(1, 2)                     # [n, H, T, d]
                if "keys" in wants:
                    crops["keys"] = k.float().mean(1)[:, drop_cls:]
                if "q" in captured:
                    q = captured.pop("q")
                    q = q.view(n_img, q.shape[1], heads, -1).transpose(1, 2)
                    kind = "cls" if "cls" in wants else "received"
                    q = q[:, :, :1] if kind == "cls" else q
                    crops[kind] = mean_received_attention(q, k, attn.scale).mean(1)[:, drop_cls:]
            if "features" in wants:
                crops["features"] = (out[0] if isinstance(out, tuple) else out)[:, drop_cls:]
            if self.family == "llava":
                images = [{name: t[i] for name, t in crops.items()} for i in range(n_img)]
                for im in images:
                    im["group"] = torch.zeros(self.patches_per_crop, dtype=torch.long)
                sink(images)
            else:
                captured["crops"] = crops
                captured["crop_shape"] = (n_img, (out[0] if isinstance(out, tuple) else out).shape[1] - drop_cls)

        installed.forward_hook(layer, on_layer)
        if self.family != "llava":
            self._install_next_packing(installed, captured, sink)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        weight = next(self.projector.parameters())
        return self.projector(features.to(weight.device, weight.dtype))

    def _install_next_packing(self, installed, captured, sink) -> None:
        """Map per-crop rows onto the packed tokens (LLaVA-NeXT: base crop, unpadded grid, row newlines).

        All captured quantities, and a one-hot channel per crop of the image, ride as channels through the
        model's own ``pack_image_features``, with a newline row whose crop channels are all 0 (group -1), so they
        land exactly where the features land (what the packing does to features, e.g. OneVision's bilinear
        downsampling, it does to them too). A token's group is its crop (argmax of the crop channels).
        ``image_sizes`` only reaches ``get_image_features``, so that method is wrapped on this instance
        (restored on removal).
        """
        inner = self.model.model
        original = inner.get_image_features

        @functools.wraps(original)
        def get_image_features(pixel_values, image_sizes, *args, **kwargs):
            out = original(pixel_values, image_sizes, *args, **kwargs)
            crops = captured.pop("crops")
            names = sorted(crops)
            n_crops, per_crop = captured.pop("crop_shape")
            counts = self._crops_per_image(image_sizes, kwargs)
            if sum(counts) != n_crops:
                raise RuntimeError(f"{self.family}: the vision tower encoded {n_crops} crops, the images need {counts}")
            device = pixel_values.device
            width = max(counts)
            local = torch.cat([torch.arange(c, device=device) for c in counts])
            columns = [torch.nn.functional.one_hot(local, width).float()[:, None, :].expand(-1, per_crop, -1)]
            widths = [width]
            for name in names:
                t = crops[name].float()
                t = t[..., None] if t.dim() == 2 else t
                columns.append(t.to(device))
                widths.append(t.shape[-1])
            stacked = torch.cat(columns, dim=-1)
            newline = torch.zeros(stacked.shape[-1], device=device)
            packed = self._pack_channels(list(torch.split(stacked, counts)), image_sizes, newline, kwargs)
            images = []
            for rows in packed:
                parts = torch.split(rows, widths, dim=-1)
                crop = parts[0]
                group = torch.where(crop.sum(-1) > 0.5, crop.argmax(-1), -1)
                image = {"group": group.long().cpu()}
                for name, part in zip(names, parts[1:]):
                    image[name] = part[:, 0] if name in ("cls", "received") else part
                images.append(image)
            sink(images)
            return out

        installed.set_attr(inner, "get_image_features", get_image_features)

    def _crops_per_image(self, image_sizes, kwargs: dict) -> list[int]:
        return _crops_per_image(self.model.config, image_sizes)

    def _pack_channels(self, per_image: list[torch.Tensor], image_sizes, newline: torch.Tensor,
                       kwargs: dict) -> list[torch.Tensor]:
        """The model's own packing applied to per-crop channels ``per_image[i]`` [crops, per_crop, C]: [n_i, C]."""
        strategy = kwargs.get("vision_feature_select_strategy") or self.model.config.vision_feature_select_strategy
        packed, lens = self.model.model.pack_image_features(per_image, image_sizes, strategy, image_newline=newline)
        return list(torch.split(packed, [int(n) for n in lens])) if isinstance(packed, torch.Tensor) else list(packed)

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
