"""InternVL, HF-native (``InternVLForConditionalGeneration``: InternVL 2.5 / 3 checkpoints in transformers format)."""

from __future__ import annotations

import torch

from attnkit.models.base import ModelAdapter, keep_output, mean_received_attention


class InternVLAdapter(ModelAdapter):
    """InternViT (with [CLS]) -> pixel shuffle (2x2 patches -> one token, ``downsample_ratio`` 0.5) -> MLP
    projector -> Qwen2 / Llama LLM with 1-D positions.

    An image is split by the processor into 1 ... ``max_patches`` tiles of ``image_size`` pixels, plus a
    thumbnail (last) when there is more than one; each tile gives ``image_seq_length`` tokens. The prompt
    holds ``<img> <IMG_CONTEXT> * (tokens x tiles) </img>`` per image, so each image is one run of visual
    tokens. The model is not told how many tiles each image has (``pixel_values`` stacks all tiles), so the
    images are told apart by their runs, not by counts.
    """

    families = {"InternVLForConditionalGeneration": "internvl"}
    vision_scores = ("cls", "received")
    _projecting = False

    @property
    def tokens_per_tile(self) -> int:
        return self.model.config.image_seq_length

    def image_token_counts(self, args: tuple, kwargs: dict) -> list[int] | None:
        # per-image counts are not in the inputs (generate's pre-encoded features are per TILE); the
        # <img> ... </img> delimiters make each image its own run
        return None

    # --- vision capture -------------------------------------------------------------------------
    def _feature_layer(self) -> torch.nn.Module:
        f = self.model.config.vision_feature_layer
        if not isinstance(f, int):
            raise NotImplementedError("vision capture needs a single vision_feature_layer")
        layers = self.vision_tower.encoder.layer
        return layers[(f % (len(layers) + 1)) - 1]

    def _unit_pool(self, x: torch.Tensor) -> torch.Tensor:
        """Per-patch rows [tiles, S*S, c] -> the mean over each pixel-shuffle unit [tiles, S*S/u, c], in the LLM's
        token order (the model's own ``pixel_shuffle``: token (i, j) holds patches (2i, 2j), (2i, 2j+1),
        (2i+1, 2j), (2i+1, 2j+1))."""
        tiles, n, c = x.shape
        side = int(round(n ** 0.5))
        ratio = self.model.config.downsample_ratio
        unit = int(round(1 / ratio)) ** 2
        shuffled = self.model.model.pixel_shuffle(x.reshape(tiles, side, side, c), scale_factor=ratio)
        return shuffled.reshape(tiles, -1, unit, c).mean(2)

    def install_vision_capture(self, installed, wants: frozenset[str], sink) -> None:
        """At the encoder layer whose output feeds the pixel shuffle (``vision_feature_layer``), per tile: the
        [CLS]→patch attention (``cls``, default) or the mean attention each patch receives (``received``), head
        mean, from the layer's (qk-normed) queries and keys; the keys (head mean); both averaged over each 2x2
        pixel-shuffle unit in the LLM's order. ``features`` = the pixel-shuffled rows the projector maps
        ([n, 4·C]; :meth:`project` takes merged ones).

        Groups: an image's tiles in the processor's order; with several tiles the thumbnail (the processor puts it
        last) is group 0, the role of LLaVA-NeXT's base image, and the tiles are 1..T in order; a single-tile
        image is group 0. ``budget=per_crop`` keeps the same k in each tile (thumbnail included). Which tiles
        belong to which image is read from the prompt's ``<img>`` runs at the model's forward (``generate()``
        encodes the images before it: those captures wait for the prefill forward).
        """
        self.check_vision_wants(wants)
        attn = self._feature_layer().attention
        captured: dict = {}

        if wants & {"cls", "received", "keys"}:
            installed.forward_hook(attn.k_norm, keep_output(captured, "k"))
        if wants & {"cls", "received"}:
            installed.forward_hook(attn.q_norm, keep_output(captured, "q"))

        def on_attention(module, args, out):
            if "k" not in captured:
                return
            k = captured.pop("k")
            tiles, length = k.shape[:2]
            k = k.view(tiles, length, attn.num_heads, -1).transpose(1, 2)                     # [t, H, T, d]
            rows = captured.setdefault("rows", {})
            if "keys" in wants:
                rows["keys"] = self._unit_pool(k.float().mean(1)[:, 1:])
            if "q" in captured:
                q = captured.pop("q").view(tiles, length, attn.num_heads, -1).transpose(1, 2)
                kind = "cls" if "cls" in wants else "received"
                q = q[:, :, :1] if kind == "cls" else q
                score = mean_received_attention(q, k, attn.scale).mean(1)[:, 1:]
                rows[kind] = self._unit_pool(score[..., None])[..., 0]

        def on_projector(module, args):
            if self._projecting:      # project() runs the projector on merged rows: not a vision forward
                return
            rows = captured.pop("rows", {})
            if "features" in wants:
                rows["features"] = args[0]
            captured["pending"] = rows, args[0].shape[0]
            if "prompt" in captured:
                flush(*captured["prompt"])

        def flush(input_ids, attention_mask):
            rows, tiles = captured.pop("pending")
            per_image = self._tiles_per_image(input_ids, attention_mask, tiles)
            images, start = [], 0
            for n in per_image:
                order = torch.arange(n) if n == 1 else torch.cat([torch.tensor([n - 1]), torch.arange(n - 1)])
                group = torch.zeros(n, dtype=torch.long)
                group[order] = torch.arange(n)     # thumbnail (last tile) -> 0, tiles -> 1..n-1
                image = {"group": group.repeat_interleave(self.tokens_per_tile)}
                for name, t in rows.items():
                    part = t[start:start + n]
                    image[name] = part.reshape(-1, *part.shape[2:])
                images.append(image)
                start += n
            sink(images)

        def on_model(module, args, kwargs):
            input_ids = self.forward_arg("input_ids", args, kwargs)
            if input_ids is None:
                return
            prompt = (input_ids, self.forward_arg("attention_mask", args, kwargs))
            with_images = bool((input_ids == self.image_token_id).any())
            if "pending" in captured and with_images:   # generate(): the images were encoded before its prefill
                flush(*prompt)
            else:
                captured["prompt"] = prompt

        def after_model(module, args, out):
            captured.pop("prompt", None)

        if wants & {"cls", "received", "keys"}:
            installed.forward_hook(attn, on_attention)
        installed.forward_pre_hook(self.projector, on_projector)
        installed.forward_pre_hook(self.model, on_model, with_kwargs=True)
        installed.forward_hook(self.model, after_model, always_call=True)

    def _tiles_per_image(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, tiles: int) -> list[int]:
        """Tiles of each image (row-major), from the prompt's runs of image tokens; an expanded batch (beams,
        ``num_return_sequences``) repeats each sample, while the images were encoded once per sample."""
        spans = self.visual_spans(input_ids, attention_mask)
        per_sample = [[len(p) // self.tokens_per_tile for p in spans.images(b)] for b in range(spans.batch_size)]
        for r in range(1, spans.batch_size + 1):
            if spans.batch_size % r == 0:
                counts = [n for sample in per_sample[::r] for n in sample]
                if sum(counts) == tiles:
                    return counts
        raise RuntimeError(f"internvl: the vision tower encoded {tiles} tiles but the prompt's image runs hold "
                           f"{sum(n for s in per_sample for n in s)} tiles' worth of tokens")

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """The projector on pixel-shuffled rows ``features`` [m, 4·C] -> [m, D_llm]."""
        weight = next(self.projector.parameters())
        self._projecting = True
        try:
            return self.projector(features.to(weight.device, weight.dtype))
        finally:
            self._projecting = False
