"""The demo model's architecture, tokenizer and processor (LLaVA-1.5 layout at toy size).

A CLIP vision tower (96 px, 8 px patches: 144 visual tokens + [CLS]) and a Llama decoder, joined by
LLaVA's two-layer MLP projector; ``vision_feature_layer=-2`` and the "default" select strategy as in
LLaVA-1.5. The tokenizer is word-level over :func:`attnkit.synth.text.vocabulary`, lower-cases its
input, adds ``<s>`` and pads on the left.
"""

from __future__ import annotations

from dataclasses import dataclass

from attnkit.synth.text import vocabulary

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: {% for c in message['content'] %}{{ c['text'] }}{% endfor %}</s>"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


@dataclass(frozen=True)
class DemoModelConfig:
    image: int = 96
    patch: int = 8
    vision_hidden: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    intermediate: int = 512
    vocab: int = 128          # rounded up from the word list


def build_tokenizer():
    """Word-level fast tokenizer: lower-cases, splits words and punctuation, ``<s>`` first, left padding."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + vocabulary())}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces, "a ." -> "a."
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>", padding_side="left", model_max_length=512)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_processor(cfg: DemoModelConfig | None = None):
    """``LlavaProcessor`` with the PIL CLIP image processor (no torchvision needed)."""
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    cfg = cfg or DemoModelConfig()
    ip = CLIPImageProcessorPil(size={"shortest_edge": cfg.image}, crop_size={"height": cfg.image, "width": cfg.image},
                               do_center_crop=True)
    return LlavaProcessor(ip, build_tokenizer(), patch_size=cfg.patch, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)


def build_config(cfg: DemoModelConfig | None = None):
    """A ``LlavaConfig`` (CLIP vision + Llama text) with ids matching :func:`build_tokenizer`."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    cfg = cfg or DemoModelConfig()
    n_words = len(SPECIAL) + len(vocabulary())
    if n_words > cfg.vocab:
        raise ValueError(f"vocab={cfg.vocab} is smaller than the {n_words} tokens of the tokenizer")
    vision = CLIPVisionConfig(hidden_size=cfg.vision_hidden, intermediate_size=4 * cfg.vision_hidden,
                              num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads,
                              image_size=cfg.image, patch_size=cfg.patch, projection_dim=cfg.vision_hidden)
    text = LlamaConfig(hidden_size=cfg.hidden, num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                       num_key_value_heads=cfg.heads, intermediate_size=cfg.intermediate, vocab_size=cfg.vocab,
                       max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                       tie_word_embeddings=False)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=SPECIAL.index("<image>"),
                       vision_feature_layer=-2, vision_feature_select_strategy="default",
                       image_seq_length=(cfg.image // cfg.patch) ** 2, pad_token_id=0, projector_hidden_act="gelu")


def prompt(processor, text: str) -> str:
    """The LLaVA-1.5 chat prompt for one image and ``text``: ``"USER: <image>\\n{text} ASSISTANT:"``."""
    content = [{"type": "image"}, {"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
