"""Tiny models of every supported family, built offline from real transformers configs.

Random weights (seeded), the real modeling code, and an offline word-level tokenizer and processor,
so that ``image + prompt -> processor -> generate -> text`` runs with no hub. Used by the tests, the
docs and the benchmarks (which scale the same configs up with ``size=``).

    model, processor = attnkit.testing.tiny_model_and_processor("qwen2_vl")
    inputs = attnkit.testing.tiny_inputs(processor, batch=3)      # left-padded, ragged prompts
    out = model.generate(**inputs, max_new_tokens=4)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

FAMILIES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl")
NEW_FAMILIES = ("qwen3_vl", "llava_onevision", "internvl", "gemma3")   # pruning tests: tests/test_prune_<family>.py
ALL_FAMILIES = FAMILIES + NEW_FAMILIES

_SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "<|im_start|>", "<|im_end|>",
            "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
_WORDS = ("USER: ASSISTANT: user assistant system a an the is are there in on of and or to what "
          "which how many yes no image picture photo describe this please answer question with "
          "one word color shape red green blue yellow black white small large left right top "
          "bottom center circle square triangle star cat dog car tree house person bird cup "
          "table chair book ball boat plane train bus clock phone laptop bottle apple banana "
          "pizza cake sky water grass road . , ?").split()
# markers of the newer families, after the words so that the older families' ids stay as they were
_SPECIAL_2 = ["<start_of_image>", "<end_of_image>", "<image_soft_token>", "<start_of_turn>", "<end_of_turn>",
              "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
# the tokenizer attributes each family's processor reads (e.g. Gemma 3's ``tokenizer.boi_token``)
_TOKEN_ATTRS = {
    "gemma3": {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"},
    "internvl": {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                 "video_token": "<video>"},
}
VOCAB_SIZE = 256  # the tiny configs' vocab; ids past the word list are never produced by text

LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }} "
    "{% endif %}{% endfor %}{% else %}ASSISTANT: {% for c in message['content'] %}{{ c['text'] }} "
    "{% endfor %}</s> {% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
# Gemma 3's processor expands each ``<start_of_image>`` into its image block; InternVL's each ``<IMG_CONTEXT>``
GEMMA3_TEMPLATE = (
    "<s> {% for message in messages %}<start_of_turn>{{ message['role'] }} "
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<start_of_image> {% else %}{{ c['text'] }} "
    "{% endif %}{% endfor %}<end_of_turn> {% endfor %}{% if add_generation_prompt %}<start_of_turn>assistant{% endif %}"
)
INTERNVL_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }} "
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<IMG_CONTEXT> {% else %}{{ c['text'] }} "
    "{% endif %}{% endfor %}<|im_end|> {% endfor %}{% if add_generation_prompt %}<|im_start|>assistant{% endif %}"
)
QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }} "
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|> "
    "{% else %}{{ c['text'] }} {% endif %}{% endfor %}<|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant{% endif %}"
)


def tiny_tokenizer(family: str | None = None):
    """A word-level fast tokenizer (whitespace split, left padding) with the special tokens of every family;
    ``family`` adds the named markers its processor reads (Gemma 3, InternVL)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(_SPECIAL + _WORDS + _SPECIAL_2)}
    assert len(vocab) <= VOCAB_SIZE
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        padding_side="left", extra_special_tokens=_TOKEN_ATTRS.get(family, {}),
    )
    tok.add_special_tokens({"additional_special_tokens": _SPECIAL[4:] + _SPECIAL_2})
    return tok


@dataclass(frozen=True)
class TinySize:
    """Dimensions shared by the tiny configs; ``benchmarks/`` scale them up to mid-size."""

    hidden: int = 64
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128
    vision_hidden: int = 32
    vision_layers: int = 3
    vision_heads: int = 4
    image: int = 32          # CLIP input side (LLaVA); 16 patches of 8 px
    patch: int = 8
    vocab: int = VOCAB_SIZE


def tiny_config(family: str, size: TinySize | None = None):
    """A real transformers config of ``family`` at toy size (ids match :func:`tiny_tokenizer`)."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaNextConfig,
        Qwen2_5_VLConfig,
        Qwen2VLConfig,
    )

    s = size or TinySize()
    tok_ids = {t: i for i, t in enumerate(_SPECIAL)}
    text = dict(hidden_size=s.hidden, num_hidden_layers=s.layers, num_attention_heads=s.heads,
                num_key_value_heads=s.kv_heads, intermediate_size=s.intermediate, vocab_size=s.vocab,
                max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family in ("llava", "llava_next"):
        vision = CLIPVisionConfig(hidden_size=s.vision_hidden, intermediate_size=2 * s.vision_hidden,
                                  num_hidden_layers=s.vision_layers, num_attention_heads=s.vision_heads,
                                  image_size=s.image, patch_size=s.patch, projection_dim=s.vision_hidden)
        common = dict(vision_config=vision, text_config=LlamaConfig(**text), image_token_index=tok_ids["<image>"],
                      vision_feature_layer=-2, vision_feature_select_strategy="default",
                      image_seq_length=(s.image // s.patch) ** 2, pad_token_id=0)
        if family == "llava":
            return LlavaConfig(**common)
        g = s.image
        return LlavaNextConfig(**common, image_grid_pinpoints=[[g, 2 * g], [2 * g, g], [2 * g, 2 * g]])
    if family in ("qwen2_vl", "qwen2_5_vl"):
        head_dim = s.hidden // s.heads
        mrope = _mrope_section(head_dim)
        text_cfg = dict(text, rope_parameters={"rope_type": "default", "mrope_section": mrope, "rope_theta": 1e4})
        ids = dict(image_token_id=tok_ids["<|image_pad|>"], video_token_id=tok_ids["<|video_pad|>"],
                   vision_start_token_id=tok_ids["<|vision_start|>"], vision_end_token_id=tok_ids["<|vision_end|>"])
        if family == "qwen2_vl":
            vision = dict(depth=s.vision_layers, embed_dim=s.vision_hidden, hidden_size=s.hidden,
                          num_heads=s.vision_heads, patch_size=4, spatial_merge_size=2, temporal_patch_size=2,
                          mlp_ratio=2)
            return Qwen2VLConfig(text_config=text_cfg, vision_config=vision, **ids)
        vision = dict(depth=max(s.vision_layers, 2), hidden_size=s.vision_hidden, out_hidden_size=s.hidden,
                      intermediate_size=2 * s.vision_hidden, num_heads=s.vision_heads, patch_size=4,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=16,
                      fullatt_block_indexes=[max(s.vision_layers, 2) - 1])
        return Qwen2_5_VLConfig(text_config=text_cfg, vision_config=vision, **ids)
    if family in NEW_FAMILIES:
        return _new_family_config(family, s, text)
    raise ValueError(f"unknown family {family!r}; use one of {', '.join(ALL_FAMILIES)}")


GEMMA3_SLIDING_WINDOW = 12   # smaller than every tiny prompt (about 30 tokens), larger than the text after the image
GEMMA3_LAYER_TYPES = ("sliding_attention", "full_attention")   # alternating (the checkpoints: 5 local, 1 global)


def _token_id(token: str) -> int:
    return (_SPECIAL + _WORDS + _SPECIAL_2).index(token)


def _new_family_config(family: str, s: TinySize, text: dict):
    """Qwen3-VL, LLaVA-OneVision, InternVL and Gemma 3 at toy size (real configs, ids of :func:`tiny_tokenizer`)."""
    from transformers import Gemma3Config, InternVLConfig, LlavaOnevisionConfig, Qwen3VLConfig

    head_dim = s.hidden // s.heads
    vision = dict(hidden_size=s.vision_hidden, intermediate_size=2 * s.vision_hidden,
                  num_hidden_layers=s.vision_layers, num_attention_heads=s.vision_heads)
    if family == "qwen3_vl":
        tok_ids = {t: i for i, t in enumerate(_SPECIAL)}
        rope = {"rope_type": "default", "mrope_section": _mrope_section(head_dim), "mrope_interleaved": True,
                "rope_theta": 1e4}
        deepstack = list(range(min(2, s.vision_layers)))   # DeepStack features into LLM layers 0 and 1
        vis = dict(depth=s.vision_layers, hidden_size=s.vision_hidden, intermediate_size=2 * s.vision_hidden,
                   num_heads=s.vision_heads, patch_size=4, spatial_merge_size=2, temporal_patch_size=2,
                   out_hidden_size=s.hidden, num_position_embeddings=(s.image // 4) ** 2,
                   deepstack_visual_indexes=deepstack)
        return Qwen3VLConfig(text_config=dict(text, head_dim=head_dim, rope_parameters=rope), vision_config=vis,
                             image_token_id=tok_ids["<|image_pad|>"], video_token_id=tok_ids["<|video_pad|>"],
                             vision_start_token_id=tok_ids["<|vision_start|>"],
                             vision_end_token_id=tok_ids["<|vision_end|>"])
    if family == "llava_onevision":
        g = s.image
        siglip = dict(vision, model_type="siglip_vision_model", image_size=s.image, patch_size=s.patch)
        # AnyRes-max-9: a 3x4 grid (12 crops > 9) is downsampled bilinearly, as in the checkpoints
        return LlavaOnevisionConfig(vision_config=siglip, text_config=dict(text, model_type="qwen2"),
                                    image_token_index=_SPECIAL.index("<image>"), video_token_index=_token_id("<video>"),
                                    image_grid_pinpoints=[[g, 2 * g], [2 * g, g], [2 * g, 2 * g], [3 * g, 4 * g]],
                                    vision_feature_select_strategy="full", vision_feature_layer=-1,
                                    vision_aspect_ratio="anyres_max_9")
    if family == "internvl":
        intern = dict(vision, image_size=s.image, patch_size=s.patch // 2)   # 8x8 patches + [CLS] -> 16 tokens
        return InternVLConfig(vision_config=intern, text_config=dict(text, model_type="qwen2"),
                              image_token_id=_token_id("<IMG_CONTEXT>"), image_seq_length=(s.image // s.patch) ** 2,
                              downsample_ratio=0.5, vision_feature_layer=-1, vision_feature_select_strategy="default")
    if family == "gemma3":
        types = [GEMMA3_LAYER_TYPES[i % 2] for i in range(s.layers)]
        gemma = dict(text, head_dim=head_dim, query_pre_attn_scalar=head_dim, sliding_window=GEMMA3_SLIDING_WINDOW,
                     layer_types=types, hidden_activation="gelu_pytorch_tanh")
        siglip = dict(vision, image_size=s.image, patch_size=s.patch // 2)   # 8x8 patches, pooled 2x2 -> 16 tokens
        return Gemma3Config(text_config=gemma, vision_config=siglip, mm_tokens_per_image=(s.image // s.patch) ** 2,
                            boi_token_index=_token_id("<start_of_image>"), eoi_token_index=_token_id("<end_of_image>"),
                            image_token_index=_token_id("<image_soft_token>"))
    raise ValueError(f"unknown family {family!r}; use one of {', '.join(NEW_FAMILIES)}")


def _mrope_section(head_dim: int) -> list[int]:
    """Split head_dim/2 rotary frequencies into (t, h, w) like Qwen's [16, 24, 24] for head_dim 128."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def tiny_model(family: str, seed: int = 0, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32,
               size: TinySize | None = None):
    """A randomly initialised model of ``family`` (seeded), in eval mode."""
    import transformers

    cfg = tiny_config(family, size)
    cls = {"llava": transformers.LlavaForConditionalGeneration,
           "llava_next": transformers.LlavaNextForConditionalGeneration,
           "qwen2_vl": transformers.Qwen2VLForConditionalGeneration,
           "qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration,
           "qwen3_vl": transformers.Qwen3VLForConditionalGeneration,
           "llava_onevision": transformers.LlavaOnevisionForConditionalGeneration,
           "internvl": transformers.InternVLForConditionalGeneration,
           "gemma3": transformers.Gemma3ForConditionalGeneration}[family]
    torch.manual_seed(seed)
    cfg._attn_implementation = attn_implementation
    model = cls._from_config(cfg, attn_implementation=attn_implementation, dtype=dtype)
    if family == "gemma3":   # the model's init zeroes the projection: every image row would be 0
        weight = model.model.multi_modal_projector.mm_input_projection_weight
        with torch.no_grad():
            weight.copy_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(seed)) * 0.05)
    return model.eval()


def tiny_processor(family: str, size: TinySize | None = None):
    """An offline processor for ``family`` built around :func:`tiny_tokenizer` (no torchvision needed)."""
    from transformers import CLIPImageProcessorPil, LlavaNextImageProcessorPil, LlavaNextProcessor, LlavaProcessor

    s = size or TinySize()
    tok = tiny_tokenizer()
    if family in ("llava", "llava_next"):
        kw = dict(size={"shortest_edge": s.image}, crop_size={"height": s.image, "width": s.image},
                  do_center_crop=True)
        if family == "llava":
            return LlavaProcessor(CLIPImageProcessorPil(**kw), tok, patch_size=s.patch,
                                  vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                  chat_template=LLAVA_TEMPLATE)
        g = s.image
        ip = LlavaNextImageProcessorPil(**kw, image_grid_pinpoints=[[g, 2 * g], [2 * g, g], [2 * g, 2 * g]])
        return LlavaNextProcessor(ip, tok, patch_size=s.patch, vision_feature_select_strategy="default",
                                  num_additional_image_tokens=1, chat_template=LLAVA_TEMPLATE)
    if family in ("qwen2_vl", "qwen2_5_vl"):
        from transformers import Qwen2VLImageProcessorPil

        from attnkit.models.processors import qwen_image_processor_class

        ip = Qwen2VLImageProcessorPil(min_pixels=256, max_pixels=(2 * s.image) ** 2, patch_size=4, merge_size=2,
                                   temporal_patch_size=2)
        return qwen_image_processor_class(family)(image_processor=ip, tokenizer=tok, chat_template=QWEN_TEMPLATE)
    if family in NEW_FAMILIES:
        return _new_family_processor(family, s)
    raise ValueError(f"unknown family {family!r}; use one of {', '.join(ALL_FAMILIES)}")


def _new_family_processor(family: str, s: TinySize):
    from attnkit.models.processors import image_only_processor_class

    tok = tiny_tokenizer(family)
    tokens = (s.image // s.patch) ** 2
    if family == "qwen3_vl":
        from transformers import Qwen2VLImageProcessorPil

        ip = Qwen2VLImageProcessorPil(min_pixels=256, max_pixels=(2 * s.image) ** 2, patch_size=4, merge_size=2,
                                      temporal_patch_size=2)
        return image_only_processor_class(family)(image_processor=ip, tokenizer=tok, chat_template=QWEN_TEMPLATE)
    if family == "llava_onevision":
        from transformers import LlavaOnevisionImageProcessorPil

        g = s.image
        ip = LlavaOnevisionImageProcessorPil(size={"height": g, "width": g},
                                             image_grid_pinpoints=[[g, 2 * g], [2 * g, g], [2 * g, 2 * g],
                                                                   [3 * g, 4 * g]])
        return image_only_processor_class(family)(image_processor=ip, tokenizer=tok, num_image_tokens=tokens,
                                                  vision_feature_select_strategy="full", chat_template=QWEN_TEMPLATE
                                                  .replace("<|vision_start|><|image_pad|><|vision_end|>", "<image>"))
    if family == "internvl":
        from transformers import GotOcr2ImageProcessorPil

        ip = GotOcr2ImageProcessorPil(size={"height": s.image, "width": s.image}, crop_to_patches=True,
                                      min_patches=1, max_patches=4)
        return image_only_processor_class(family)(image_processor=ip, tokenizer=tok, image_seq_length=tokens,
                                                  chat_template=INTERNVL_TEMPLATE)
    from transformers import Gemma3ImageProcessorPil, Gemma3Processor

    ip = Gemma3ImageProcessorPil(size={"height": s.image, "width": s.image})
    return Gemma3Processor(ip, tok, chat_template=GEMMA3_TEMPLATE, image_seq_length=tokens)


def tiny_model_and_processor(family: str, seed: int = 0, **kw):
    return tiny_model(family, seed=seed, **kw), tiny_processor(family, kw.get("size"))


def tiny_image(seed: int = 0, width: int = 32, height: int = 32) -> Image.Image:
    """A random RGB image (seeded)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


_PROMPTS = ["describe this image", "is there a cat in the image ? answer with one word",
            "what color is the large circle on the left of the picture", "how many dogs"]


def tiny_prompt(processor, text: str, n_images: int = 1) -> str:
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def tiny_inputs(processor, batch: int = 1, seed: int = 0, n_images: int = 1, image_sizes=None,
                nested: bool | None = None):
    """Processor outputs for ``batch`` prompts of different lengths (so batch > 1 is left-padded).

    ``nested``: pass the images as one list per sample (Gemma 3's processor needs it; LLaVA-OneVision then
    treats a sample's several images as a multi-image prompt, one crop each); default only for Gemma 3.
    """
    texts, images = [], []
    for b in range(batch):
        texts.append(tiny_prompt(processor, _PROMPTS[(seed + b) % len(_PROMPTS)], n_images))
        images.append([])
        for i in range(n_images):
            w, h = (image_sizes[(b * n_images + i) % len(image_sizes)] if image_sizes else (32, 32))
            images[-1].append(tiny_image(seed * 100 + b * 10 + i, w, h))
    if nested is None:
        nested = type(processor).__name__.startswith("Gemma3")
    if not nested:
        images = [im for sample in images for im in sample]
    return processor(images=images, text=texts, return_tensors="pt", padding=True)


def save_tiny(family: str, path, seed: int = 0) -> None:
    """Write a tiny model and its processor to ``path`` (for ``from_pretrained`` and CLI tests)."""
    model, processor = tiny_model_and_processor(family, seed=seed)
    model.save_pretrained(path)
    processor.save_pretrained(path)


# --- references for equivalence tests ----------------------------------------------------------------
SPECIAL_IDS = list(range(len(_SPECIAL))) + [_token_id(t) for t in _SPECIAL_2]  # pad, bos, eos, unk, the markers


def greedy_no_cache(model, inputs: dict, steps: int, positions_from_mask: bool = False,
                    suppress: list[int] | None = None) -> torch.Tensor:
    """Greedy decoding by full forwards on the growing sequence, without a KV cache (the reference that
    ``generate()`` with a cache must match). ``positions_from_mask`` passes generate's position ids
    (mask cumsum - 1) for 1-D-position models; ``suppress`` lists token ids never chosen (and must then be
    given to ``generate(suppress_tokens=...)`` too)."""
    inputs = dict(inputs)
    for _ in range(steps):
        kw = {}
        if positions_from_mask:
            kw["position_ids"] = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = model(**inputs, **kw, use_cache=False).logits[:, -1]
        if suppress:
            logits[:, suppress] = float("-inf")
        nxt = logits.argmax(-1, keepdim=True)
        inputs["input_ids"] = torch.cat([inputs["input_ids"], nxt], 1)
        inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(nxt)], 1)
        for name in ("mm_token_type_ids", "token_type_ids"):   # Qwen's rope index, Gemma 3's image blocks
            if name in inputs:
                inputs[name] = torch.cat([inputs[name], torch.zeros_like(nxt)], 1)
    return inputs["input_ids"]


def greedy_reference(model, inputs: dict, steps: int, family: str) -> torch.Tensor:
    """:func:`greedy_no_cache` as the tests use it for ``family``: 1-D positions from the mask (all but
    Qwen's rope index) and :data:`SPECIAL_IDS` suppressed (random models must not emit image markers)."""
    return greedy_no_cache(model, inputs, steps, positions_from_mask=not family.startswith("qwen"),
                           suppress=SPECIAL_IDS)


def mask_keys(from_layer: int, dropped: list[list[int]], more: list[tuple[int, list[list[int]]]] = ()):
    """A reference intervention: in layers >= ``from_layer`` no query attends to the key positions
    ``dropped[b]`` of sample b (nothing is removed: the masking equivalent of dropping those tokens);
    ``more`` adds later stages ``(layer, dropped)`` for multi-stage pruners."""
    import dataclasses

    from attnkit.interventions.base import Intervention

    stages = [(from_layer, dropped), *more]

    @dataclasses.dataclass
    class MaskKeys(Intervention):
        name = "reference-mask-keys"

        def attention_layers(self, ctx):
            return range(min(layer for layer, _ in stages), ctx.adapter.num_layers)

        def on_attention(self, call):
            hidden = [d for layer, d in stages if layer <= call.layer_idx]

            def hide(rows, scores):
                scores = scores.clone()
                for d in hidden:
                    for b, cols in enumerate(d):
                        scores[b, :, :, list(cols)] = torch.finfo(torch.float32).min
                return scores

            call.edit_scores(hide)

    return MaskKeys()


def drop_stages(stats: dict, batch: int) -> list[dict]:
    """A pruner's ``stats()`` as its stages ``[{"from_layer", "kept_positions"}, ...]`` (vte: every visual token
    leaves at one layer)."""
    if "removed_from_layer" in stats:
        return [{"from_layer": stats["removed_from_layer"], "kept_positions": [[] for _ in range(batch)]}]
    return stats.get("stages") or [{"from_layer": stats["from_layer"], "kept_positions": stats["kept_positions"]}]


def assert_equals_mask_keys(model, inputs, pruned: torch.Tensor, masks: list[tuple[int, list[list[int]]]]) -> None:
    """``pruned`` logits == the unmodified model with each stage ``(layer, dropped)``'s dropped tokens masked as
    keys from its layer on (:func:`mask_keys`), on every kept row; and they differ from the unpruned model's."""
    import attnkit

    with torch.no_grad():
        with attnkit.intervene(model, mask_keys(*masks[0], more=masks[1:])):
            ref = model(**inputs).logits
        plain = model(**inputs).logits
    keep = inputs["attention_mask"].bool().clone()
    for b, cols in enumerate(masks[-1][1]):
        keep[b, cols] = False
    torch.testing.assert_close(pruned[keep], ref[keep], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(pruned[keep], plain[keep])


def visual_positions(model, inputs) -> list[list[int]]:
    """Per sample, the prompt positions of its visual (image placeholder) tokens."""
    ids = inputs["input_ids"]
    return [(ids[b] == model.config.image_token_id).nonzero().squeeze(1).tolist() for b in range(ids.shape[0])]


def original_positions(model, inputs) -> torch.Tensor:
    """Positions the unmodified model uses in a plain forward: arange (1-D) or Qwen's 3-D rope index."""
    ids = inputs["input_ids"]
    if "image_grid_thw" not in inputs:
        return torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
    embeds = model.get_input_embeddings()(ids)
    return model.model.compute_3d_position_ids(input_ids=ids, inputs_embeds=embeds,
                                               image_grid_thw=inputs["image_grid_thw"],
                                               attention_mask=inputs["attention_mask"],
                                               mm_token_type_ids=inputs["mm_token_type_ids"], video_grid_thw=None,
                                               past_key_values=None)


def image_feature_rows(model, inputs) -> list[torch.Tensor]:
    """The LLM input rows of each sample's visual tokens ([n_b, D], prompt order), from the model's own
    ``get_image_features``."""
    ids = inputs["input_ids"]
    feats_kw = {k: v for k, v in inputs.items() if k in ("pixel_values", "image_grid_thw", "image_sizes")}
    if "pixel_values" in feats_kw and "image_grid_thw" not in feats_kw:
        feats_kw.update(vision_feature_layer=model.config.vision_feature_layer,
                        vision_feature_select_strategy=model.config.vision_feature_select_strategy)
    with torch.no_grad():
        feats = model.model.get_image_features(**feats_kw, return_dict=True)
    return list(torch.cat(feats.pooler_output).split((ids == model.config.image_token_id).sum(1).tolist()))


def reference_on_kept(model, inputs, kept_positions: list[list[int]], compact: bool = False,
                      rows: list[dict[int, torch.Tensor]] | None = None, **forward_kw):
    """The UNWRAPPED model fed only the kept visual tokens (public kwargs: fewer placeholders, the kept
    feature rows, the ORIGINAL positions; ``compact``: positions 0..n-1, batch without padding).
    ``rows[b]`` maps a kept position to the row fed there instead of its own feature row (merged tokens).
    Returns the model output and the kept columns [B, Lk]."""
    ids, am = inputs["input_ids"], inputs["attention_mask"]
    image_id = model.config.image_token_id
    per_sample = image_feature_rows(model, inputs)
    cols, feed = [], []
    for b in range(ids.shape[0]):
        visual = (ids[b] == image_id).nonzero().squeeze(1).tolist()
        kept = kept_positions[b]
        keep_col = torch.tensor([(t not in visual) or (t in kept) for t in range(ids.shape[1])])
        cols.append(keep_col.nonzero().squeeze(1))
        sample_rows = [per_sample[b][visual.index(t)] for t in kept]
        if rows is not None and rows[b]:
            sample_rows = [rows[b].get(t, r).to(r) for t, r in zip(kept, sample_rows)]
        feed.append(torch.stack(sample_rows) if sample_rows else per_sample[b][:0])
    cols = torch.stack(cols)
    positions = original_positions(model, inputs)
    pos = torch.gather(positions, -1, cols.expand(*positions.shape[:-1], -1)) if positions.dim() == 3 else \
        torch.gather(positions, 1, cols)
    if compact:
        pos = torch.arange(cols.shape[1]).expand(cols.shape[0], -1)
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    encoded = BaseModelOutputWithPooling(pooler_output=feed)
    new = dict(input_ids=torch.gather(ids, 1, cols), attention_mask=torch.gather(am, 1, cols), position_ids=pos,
               mm_encoder_outputs={"image": encoded})
    with torch.no_grad():
        return model(**new, **forward_kw), cols


def replace_rows(layer: int, rows: list[dict[int, torch.Tensor]]):
    """A reference intervention: the residual stream entering decoder layer ``layer`` holds ``rows[b][t]`` at
    prompt position t of sample b (prefill; with :func:`mask_keys` for the dropped tokens this is what
    merging at layer ``layer`` means, nothing removed)."""
    import dataclasses

    from attnkit.interventions.base import Intervention

    @dataclasses.dataclass
    class ReplaceRows(Intervention):
        name = "reference-replace-rows"

        def attach(self, ctx):
            def pre(module, args, kwargs):
                hidden = args[0] if args else kwargs["hidden_states"]
                if ctx.state.step != 0 or hidden.shape[1] != ctx.state.spans.length:
                    return None
                hidden = hidden.clone()
                for b, sample_rows in enumerate(rows):
                    for t, r in sample_rows.items():
                        hidden[b, t] = r.to(hidden)
                if args:
                    return (hidden, *args[1:]), kwargs
                kwargs["hidden_states"] = hidden
                return args, kwargs

            ctx.installed.forward_pre_hook(ctx.adapter.decoder_layers[layer], pre, with_kwargs=True)

    return ReplaceRows()


def prefill_chunk_logits(model, inputs: dict, sequences: torch.Tensor, family: str) -> torch.Tensor:
    """The reference for ``generate()`` under methods that fix their choice at prefill: one prefill forward with
    a cache, then every generated token but the last as ONE cached chunk. Returns the logits that predicted
    each generated token, [B, T, V] (``sequences`` = generate's output, prompt included)."""
    prompt = inputs["input_ids"].shape[1]
    new = sequences[:, prompt:]
    kw = {} if family.startswith("qwen") else {"position_ids": (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)}
    with torch.no_grad():
        out = model(**inputs, use_cache=True, **kw)
        logits = [out.logits[:, -1:]]
        if new.shape[1] > 1:
            chunk = new[:, :-1]
            mask = torch.cat([inputs["attention_mask"], torch.ones_like(chunk)], 1)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -chunk.shape[1]:]
            if family.startswith("qwen"):   # text positions continue after the image's 3-D ones (rope deltas)
                positions = (positions + model.model.rope_deltas).expand(3, -1, -1)
            logits.append(model(input_ids=chunk, attention_mask=mask, past_key_values=out.past_key_values,
                                position_ids=positions, use_cache=True).logits)
    return torch.cat(logits, 1)


def padded_inputs(processor, batch: int, side: str, seed: int = 0, **kw):
    """:func:`tiny_inputs` padded on ``side`` ("left" or "right")."""
    tok = getattr(processor, "tokenizer", processor)
    before = tok.padding_side
    tok.padding_side = side
    try:
        return tiny_inputs(processor, batch=batch, seed=seed, **kw)
    finally:
        tok.padding_side = before


def pai_answer_rows(prompt_len: int, visual: torch.Tensor, alpha: float = 0.2, start_layer: int = 2):
    """A reference intervention for PAI's attention step in a no-cache loop: every query row at or after the
    last prompt row (the row that predicts the next token, in turn) gets ``z += alpha·|z|`` on the prompt's
    image keys (``visual`` [B, prompt_len]), in layers ``start_layer`` on."""
    import dataclasses

    from attnkit.interventions.base import Intervention

    @dataclasses.dataclass
    class AnswerRows(Intervention):
        name = "reference-pai-answer-rows"

        def attention_layers(self, ctx):
            return range(start_layer, ctx.adapter.num_layers)

        def on_attention(self, call):
            def edit(rows, scores):
                scores = scores.clone()
                for i in range(rows.start, rows.stop):
                    if i >= prompt_len - 1:
                        z = scores[:, :, i - rows.start, :prompt_len]
                        img = visual[:, None, :]
                        scores[:, :, i - rows.start, :prompt_len] = torch.where(img, z + alpha * z.abs(), z)
                return scores

            call.edit_scores(edit)

    return AnswerRows()


def fixed_heads(factors: dict):
    """A reference intervention: scale the per-head outputs of layer l by ``factors[l]`` (nothing else), e.g.
    VHR's heads chosen at prefill, fixed for a no-cache loop."""
    import dataclasses

    from attnkit.interventions.base import Intervention

    @dataclasses.dataclass
    class FixedHeads(Intervention):
        name = "reference-fixed-heads"

        def attention_layers(self, ctx):
            return list(factors)

        def on_attention(self, call):
            f = factors[call.layer_idx]
            call.edit_output(lambda out: out * f)

    return FixedHeads()


# --- llava_onevision / internvl references ---
def _pooled_features(model, inputs):
    kw = {k: v for k, v in inputs.items() if k in ("pixel_values", "image_sizes", "batch_num_images")}
    with torch.no_grad():
        return model.model.get_image_features(**kw, return_dict=True).pooler_output


def visual_rows_per_sample(model, inputs) -> list[torch.Tensor]:
    """The LLM input rows of each sample's visual tokens ([n_b, D], prompt order) from the model's own
    ``get_image_features``, for families whose features are per tile (InternVL: one [tiles, n, D] tensor) or
    depend on ``batch_num_images`` (LLaVA-OneVision's multi-image samples)."""
    ids = inputs["input_ids"]
    rows = torch.cat([f.reshape(-1, f.shape[-1]) for f in _pooled_features(model, inputs)])
    return list(rows.split((ids == model.config.image_token_id).sum(1).tolist()))


def reference_on_kept_rows(model, inputs, kept_positions: list[list[int]],
                           rows: list[dict[int, torch.Tensor]] | None = None, **forward_kw):
    """:func:`reference_on_kept` (1-D positions) on the rows of :func:`visual_rows_per_sample`, pre-encoded in the
    family's own form (InternVL: one [1, N, D] tensor; OneVision: a list). Returns (output, kept columns)."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    ids, am = inputs["input_ids"], inputs["attention_mask"]
    image_id = model.config.image_token_id
    per_sample = visual_rows_per_sample(model, inputs)
    cols, feed = [], []
    for b in range(ids.shape[0]):
        visual = (ids[b] == image_id).nonzero().squeeze(1).tolist()
        kept = kept_positions[b]
        cols.append(torch.tensor([(t not in visual) or (t in kept) for t in range(ids.shape[1])]).nonzero().squeeze(1))
        sample_rows = [per_sample[b][visual.index(t)] for t in kept]
        if rows is not None and rows[b]:
            sample_rows = [rows[b].get(t, r).to(r) for t, r in zip(kept, sample_rows)]
        feed.extend(sample_rows)
    cols = torch.stack(cols)
    positions = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
    stacked = torch.stack(feed)[None]
    as_tensor = isinstance(_pooled_features(model, inputs), torch.Tensor)
    encoded = BaseModelOutputWithPooling(pooler_output=stacked if as_tensor else list(stacked))
    new = dict(input_ids=torch.gather(ids, 1, cols), attention_mask=torch.gather(am, 1, cols),
               position_ids=torch.gather(positions, 1, cols), mm_encoder_outputs={"image": encoded})
    with torch.no_grad():
        return model(**new, **forward_kw), cols


# --- gemma3 references ---------------------------------------------------------------------------------------
def gemma3_reference_on_kept(model, inputs, stages: list[tuple[int, list[list[int]]]],
                             rows: list[list[dict[int, torch.Tensor]]] | None = None,
                             position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The UNWRAPPED Gemma 3 run layer by layer, each sample alone on its valid tokens: the decoder layers before
    stage ``(layer, kept[b])``'s layer on the sequence so far, from it on only the non-visual tokens and the
    stage's kept visual tokens (several stages: each a subset of the one before), at their ORIGINAL positions
    (``position_ids``, default 0..L-1), with the masks the model's own ``create_masks_for_vision_model`` builds
    for that shorter sequence from its ``token_type_ids`` (same-image blocks; the window counts the tokens it
    holds) and each layer type's rotary. ``rows[s][b]`` maps a kept position to the row it holds entering stage
    s's layer (merged tokens; stage 0 = LLM input rows). Returns logits [B, L, V], zero on rows not run."""
    from transformers.masking_utils import create_masks_for_generate
    from transformers.models.gemma3.modeling_gemma3 import (
        create_masks_for_vision_model,
        get_block_sequence_ids_for_mask,
    )

    ids, am = inputs["input_ids"], inputs["attention_mask"].bool()
    B, L = ids.shape
    inner, lm = model.model, model.model.language_model
    cfg = lm.config
    visual_all = ids == model.config.image_token_id
    with torch.no_grad():
        feats = inner.get_image_features(inputs["pixel_values"], return_dict=True).pooler_output
        feats = feats.reshape(-1, feats.shape[-1]).split(visual_all.sum(1).tolist())
        embeds = inner.get_input_embeddings()(ids)
    positions = torch.arange(L).expand(B, -1) if position_ids is None else position_ids
    types = inputs.get("token_type_ids")
    out = torch.zeros(B, L, model.config.text_config.vocab_size)
    for b in range(B):
        x = embeds[b].clone()
        x[visual_all[b]] = feats[b].to(x)
        cols = am[b].nonzero().squeeze(1)
        h = x[cols][None]
        masks = rotary = None
        with torch.no_grad():
            for i, layer in enumerate(lm.layers):
                for s, (at, kept) in enumerate(stages):
                    if at != i:
                        continue
                    keep = torch.tensor([(not visual_all[b, t]) or int(t) in kept[b] for t in cols.tolist()])
                    h, cols = h[:, keep], cols[keep]
                    for t, r in (rows[s][b] if rows is not None else {}).items():
                        h[0, (cols == t).nonzero().squeeze(1)] = r.to(h)
                    masks = None
                if masks is None:
                    pos = positions[b, cols][None]
                    kw = dict(config=cfg, inputs_embeds=h, attention_mask=torch.ones_like(pos), past_key_values=None,
                              position_ids=pos)
                    if types is not None:
                        masks = create_masks_for_vision_model(
                            **kw, block_sequence_ids=get_block_sequence_ids_for_mask(types[b, cols][None]))
                    else:
                        masks = create_masks_for_generate(**kw)
                    rotary = {kind: lm.rotary_emb(h, pos, kind) for kind in set(cfg.layer_types)}
                kind = cfg.layer_types[i]
                h = layer(h, attention_mask=masks[kind], position_embeddings=rotary[kind], position_ids=pos,
                          past_key_values=None)
            out[b, cols] = model.lm_head(lm.norm(h))[0].float()
    return out



# --- qwen3_vl references ---
def deepstack_feature_rows(model, inputs) -> list[list[torch.Tensor]]:
    """Qwen3-VL: per DeepStack level, each sample's rows ([n_b, D], prompt order), from the model's own
    ``get_image_features``."""
    counts = (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist()
    with torch.no_grad():
        feats = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
    return [list(torch.cat(level).split(counts)) for level in feats.deepstack_features]


def reference_on_kept_deepstack(model, inputs, kept_positions: list[list[int]],
                                rows: list[dict[int, torch.Tensor]] | None = None,
                                deepstack: list[list[dict[int, torch.Tensor]]] | None = None, **forward_kw):
    """:func:`reference_on_kept` for Qwen3-VL: the UNWRAPPED model fed only the kept visual tokens, each with its
    row AND its own DeepStack rows (one per level; nothing of a dropped token), at the ORIGINAL 3-D positions.
    ``rows[b]`` as there; ``deepstack[level][b]`` maps a kept position to the DeepStack row of that level fed
    there instead of its own (merged tokens). Returns the model output and the kept columns [B, Lk]."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

    ids, am = inputs["input_ids"], inputs["attention_mask"]
    image_id = model.config.image_token_id
    per_sample = image_feature_rows(model, inputs)
    levels = deepstack_feature_rows(model, inputs)
    cols, feed, stack = [], [], [[] for _ in levels]
    for b in range(ids.shape[0]):
        visual = (ids[b] == image_id).nonzero().squeeze(1).tolist()
        kept = kept_positions[b]
        cols.append(torch.tensor([(t not in visual) or (t in kept) for t in range(ids.shape[1])]).nonzero().squeeze(1))
        idx = torch.tensor([visual.index(t) for t in kept], dtype=torch.long)
        sample_rows = per_sample[b][idx].clone()
        for i, t in enumerate(kept):
            if rows is not None and t in rows[b]:
                sample_rows[i] = rows[b][t].to(sample_rows)
        feed.append(sample_rows)
        for level, level_rows in enumerate(levels):
            r = level_rows[b][idx].clone()
            for i, t in enumerate(kept):
                if deepstack is not None and t in deepstack[level][b]:
                    r[i] = deepstack[level][b][t].to(r)
            stack[level].append(r)
    cols = torch.stack(cols)
    positions = original_positions(model, inputs)
    pos = torch.gather(positions, -1, cols.expand(*positions.shape[:-1], -1))
    encoded = BaseModelOutputWithDeepstackFeatures(pooler_output=feed, deepstack_features=stack)
    new = dict(input_ids=torch.gather(ids, 1, cols), attention_mask=torch.gather(am, 1, cols), position_ids=pos,
               mm_encoder_outputs={"image": encoded})
    with torch.no_grad():
        return model(**new, **forward_kw), cols


def replace_deepstack(rows: dict[int, list[dict[int, torch.Tensor]]]):
    """A reference intervention for Qwen3-VL: the DeepStack add of level l (after decoder layer l) adds
    ``rows[l][b][t]`` at prompt position t of sample b instead of that token's own row (prefill; nothing else
    changes). With :func:`mask_keys` and :func:`replace_rows` this is what merging at a layer K <= l means."""
    import dataclasses

    from attnkit.interventions.base import Intervention

    @dataclasses.dataclass
    class ReplaceDeepstack(Intervention):
        name = "reference-replace-deepstack"

        def attach(self, ctx):
            lm = ctx.adapter.language_model
            original, calls = lm._deepstack_process, [0]

            def reset(module, args, kwargs):
                calls[0] = 0

            def process(hidden, mask, embeds):
                level, calls[0] = calls[0], calls[0] + 1
                if ctx.state.step != 0 or level not in rows:
                    return original(hidden, mask, embeds)
                embeds = embeds.clone()
                slot = mask.long().flatten().cumsum(0).view(mask.shape) - 1     # row of each visual position
                for b, sample_rows in enumerate(rows[level]):
                    for t, r in sample_rows.items():
                        embeds[slot[b, t]] = r.to(embeds)
                return original(hidden, mask, embeds)

            ctx.installed.forward_pre_hook(lm, reset, with_kwargs=True)
            ctx.installed.set_attr(lm, "_deepstack_process", process)

    return ReplaceDeepstack()
