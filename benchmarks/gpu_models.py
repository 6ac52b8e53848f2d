"""The 7B architectures of the GPU run book with random weights, built on the target device.

Configs are written from the published ``config.json`` values of ``llava-hf/llava-1.5-7b-hf``,
``llava-hf/llava-v1.6-vicuna-7b-hf``, ``Qwen/Qwen2-VL-7B-Instruct`` and ``Qwen/Qwen2.5-VL-7B-Instruct``; the only
fields that differ are the special-token ids (image placeholder, pad, bos/eos, vision markers), which are those of
the offline word-level tokenizer of :mod:`attnkit.testing` (no hub). Latency and memory do not depend on the
weights, so random ones measure what the checkpoints would.

``build(family, device, dtype)`` creates the parameters on ``device`` directly (``with torch.device(...)``), so a
7B model is never materialised on the CPU. ``tiny=True`` keeps every published structural choice (activations,
feature layer, merge sizes, window attention, pinpoint grid) at toy widths and depths, for ``--dry-run`` on a CPU.
"""

from __future__ import annotations

import dataclasses

import torch

from attnkit import testing

FAMILIES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl")
CHECKPOINTS = {"llava": "llava-hf/llava-1.5-7b-hf", "llava_next": "llava-hf/llava-v1.6-vicuna-7b-hf",
               "qwen2_vl": "Qwen/Qwen2-VL-7B-Instruct", "qwen2_5_vl": "Qwen/Qwen2.5-VL-7B-Instruct"}
# the dtype each checkpoint ships in (config.json's torch_dtype)
DTYPES = {"llava": torch.float16, "llava_next": torch.float16, "qwen2_vl": torch.bfloat16,
          "qwen2_5_vl": torch.bfloat16}


@dataclasses.dataclass(frozen=True)
class Dims:
    """The dimensions that ``tiny`` scales down; everything else is the published value."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    vision_intermediate: int
    image: int        # CLIP input side (LLaVA) / the side of the test image (Qwen)
    patch: int


PUBLISHED = {
    "llava": Dims(4096, 32, 32, 32, 11008, 32064, 1024, 24, 16, 4096, 336, 14),
    "llava_next": Dims(4096, 32, 32, 32, 11008, 32064, 1024, 24, 16, 4096, 336, 14),
    "qwen2_vl": Dims(3584, 28, 28, 4, 18944, 152064, 1280, 32, 16, 5120, 672, 14),
    "qwen2_5_vl": Dims(3584, 28, 28, 4, 18944, 152064, 1280, 32, 16, 3420, 672, 14),
}
# toy widths for --dry-run: 64 visual tokens per LLaVA image (112 px / 14), 64 for Qwen (224 px / 14, merged 2x2)
TINY = {
    "llava": Dims(64, 4, 4, 4, 128, 512, 32, 3, 4, 64, 112, 14),
    "llava_next": Dims(64, 4, 4, 4, 128, 512, 32, 3, 4, 64, 112, 14),
    "qwen2_vl": Dims(64, 4, 4, 2, 128, 512, 32, 4, 4, 64, 224, 14),
    "qwen2_5_vl": Dims(64, 4, 4, 2, 128, 512, 32, 4, 4, 64, 224, 14),
}


def dims(family: str, tiny: bool = False) -> Dims:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; the run book has {', '.join(FAMILIES)}")
    return (TINY if tiny else PUBLISHED)[family]


def _pinpoints(side: int) -> list[list[int]]:
    """LLaVA-NeXT's published grid ([[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]] at 336)."""
    return [[side, 2 * side], [2 * side, side], [2 * side, 2 * side], [3 * side, side], [side, 3 * side]]


def config(family: str, tiny: bool = False):
    """The family's transformers config (published values, offline token ids; toy dimensions if ``tiny``)."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaNextConfig,
        Qwen2_5_VLConfig,
        Qwen2VLConfig,
    )

    d = dims(family, tiny)
    ids = {t: i for i, t in enumerate(testing._SPECIAL)}
    if family in ("llava", "llava_next"):
        text = LlamaConfig(vocab_size=d.vocab, hidden_size=d.hidden, intermediate_size=d.intermediate,
                           num_hidden_layers=d.layers, num_attention_heads=d.heads, num_key_value_heads=d.kv_heads,
                           max_position_embeddings=4096, rms_norm_eps=1e-5, hidden_act="silu",
                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                           pad_token_id=ids["<pad>"], bos_token_id=ids["<s>"], eos_token_id=ids["</s>"])
        vision = CLIPVisionConfig(hidden_size=d.vision_hidden, intermediate_size=d.vision_intermediate,
                                  num_hidden_layers=d.vision_layers, num_attention_heads=d.vision_heads,
                                  image_size=d.image, patch_size=d.patch, projection_dim=768, hidden_act="quick_gelu",
                                  layer_norm_eps=1e-5)
        common = dict(vision_config=vision, text_config=text, image_token_index=ids["<image>"],
                      projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default",
                      image_seq_length=(d.image // d.patch) ** 2, pad_token_id=ids["<pad>"], tie_word_embeddings=False)
        if family == "llava":
            return LlavaConfig(**common)
        return LlavaNextConfig(**common, image_grid_pinpoints=_pinpoints(d.image))
    mrope = testing._mrope_section(d.hidden // d.heads)   # the published [16, 24, 24] at head_dim 128
    text = dict(vocab_size=d.vocab, hidden_size=d.hidden, intermediate_size=d.intermediate, num_hidden_layers=d.layers,
                num_attention_heads=d.heads, num_key_value_heads=d.kv_heads, max_position_embeddings=128000,
                max_window_layers=d.layers, rms_norm_eps=1e-6, hidden_act="silu", use_sliding_window=False,
                sliding_window=32768, tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "mrope_section": mrope, "rope_theta": 1000000.0},
                pad_token_id=ids["<pad>"], bos_token_id=ids["<s>"], eos_token_id=ids["</s>"])
    tokens = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    if family == "qwen2_vl":
        vision = dict(depth=d.vision_layers, embed_dim=d.vision_hidden, hidden_size=d.hidden,
                      num_heads=d.vision_heads, mlp_ratio=d.vision_intermediate // d.vision_hidden,
                      hidden_act="quick_gelu", in_channels=3, patch_size=d.patch, spatial_merge_size=2,
                      temporal_patch_size=2)
        return Qwen2VLConfig(text_config=text, vision_config=vision, **tokens, tie_word_embeddings=False)
    # the published 112-px window is 8 patches of 14; four full-attention blocks in 32 (every 8th)
    every = max(d.vision_layers // 4, 1)
    vision = dict(depth=d.vision_layers, hidden_size=d.vision_hidden, intermediate_size=d.vision_intermediate,
                  num_heads=d.vision_heads, out_hidden_size=d.hidden, hidden_act="silu", in_channels=3,
                  patch_size=d.patch, spatial_merge_size=2, temporal_patch_size=2, window_size=8 * d.patch,
                  fullatt_block_indexes=list(range(every - 1, d.vision_layers, every)), tokens_per_second=2)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **tokens, tie_word_embeddings=False)


def build(family: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None, attn: str = "sdpa",
          tiny: bool = False, seed: int = 0):
    """A random-weight model of ``family`` with its parameters created on ``device`` in ``dtype`` (the
    checkpoint's dtype by default), in eval mode, with no end-of-sequence token (benchmarks decode a fixed count)."""
    import transformers

    cls = {"llava": transformers.LlavaForConditionalGeneration,
           "llava_next": transformers.LlavaNextForConditionalGeneration,
           "qwen2_vl": transformers.Qwen2VLForConditionalGeneration,
           "qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration}[family]
    cfg = config(family, tiny)
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    with torch.device(device):
        model = cls._from_config(cfg, attn_implementation=attn, dtype=dtype or DTYPES[family])
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = cfg.text_config.pad_token_id
    return model.eval()


def processor(family: str, tiny: bool = False):
    """An offline processor matching :func:`config` (the published image preprocessing sizes)."""
    from transformers import (
        CLIPImageProcessorPil,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
        LlavaProcessor,
        Qwen2VLImageProcessorPil,
    )

    from attnkit.models.processors import qwen_image_processor_class

    d = dims(family, tiny)
    tok = testing.tiny_tokenizer()
    if family in ("llava", "llava_next"):
        kw = dict(size={"shortest_edge": d.image}, crop_size={"height": d.image, "width": d.image}, do_center_crop=True)
        common = dict(patch_size=d.patch, vision_feature_select_strategy="default", num_additional_image_tokens=1,
                      chat_template=testing.LLAVA_TEMPLATE)
        if family == "llava":
            return LlavaProcessor(CLIPImageProcessorPil(**kw), tok, **common)
        return LlavaNextProcessor(LlavaNextImageProcessorPil(**kw, image_grid_pinpoints=_pinpoints(d.image)), tok,
                                  **common)
    ip = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 1280, patch_size=d.patch, merge_size=2,
                                  temporal_patch_size=2)
    return qwen_image_processor_class(family)(image_processor=ip, tokenizer=tok, chat_template=testing.QWEN_TEMPLATE)


def image_size(family: str, tiny: bool = False) -> tuple[int, int]:
    """The test image: LLaVA-1.5 one crop (576 visual tokens at 336 px); LLaVA-NeXT twice the side, the 2x2 grid
    (576 base + 4 x 576 crop tokens = 2880, FasterVLM's count, plus 48 newline tokens); Qwen 672 px (576 tokens)."""
    d = dims(family, tiny)
    if family == "llava_next":
        return 2 * d.image, 2 * d.image
    return d.image, d.image


def content_tokens(family: str, tiny: bool = False) -> int:
    """Image tokens of the test image without layout tokens: 576 (LLaVA-1.5, Qwen), 2880 (NeXT: 5 x 576)."""
    d = dims(family, tiny)
    if family.startswith("qwen"):
        return (d.image // d.patch // 2) ** 2
    return (d.image // d.patch) ** 2 * (5 if family == "llava_next" else 1)


def inputs(family: str, device: torch.device | str = "cpu", tiny: bool = False, batch: int = 1,
           prompt: str = "describe this image") -> dict:
    """Processor outputs for ``batch`` copies of one prompt with the test image, on ``device``."""
    proc = processor(family, tiny)
    w, h = image_size(family, tiny)
    text = testing.tiny_prompt(proc, prompt)
    images = [testing.tiny_image(i, w, h) for i in range(batch)]
    out = proc(images=images, text=[text] * batch, return_tensors="pt", padding=True)
    return {k: v.to(device) for k, v in out.items()}


def describe(family: str, tiny: bool = False) -> str:
    d = dims(family, tiny)
    name = "toy dims of " if tiny else ""
    return (f"{name}{CHECKPOINTS[family]} (LLM hidden {d.hidden}, {d.layers} layers, {d.heads}/{d.kv_heads} heads; "
            f"vision {d.vision_layers} layers, hidden {d.vision_hidden}; random weights)")
