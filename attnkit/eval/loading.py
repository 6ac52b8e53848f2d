"""Load a model and its processor from a local folder, as ``from_pretrained`` does, for the runner and the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

_DTYPES = {"auto": "auto", "float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
           "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
QUANTIZATIONS = ("4bit", "8bit")


def parse_dtype(dtype: str | torch.dtype) -> str | torch.dtype:
    """``"auto"``, ``"bf16"``, ``"float32"``, … or a ``torch.dtype`` -> what ``from_pretrained(dtype=)`` takes."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def quantization_config(quantization: str | None):
    """bitsandbytes ``BitsAndBytesConfig`` for ``"4bit"`` / ``"8bit"`` (None: no quantization)."""
    if quantization is None:
        return None
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}; use one of {', '.join(QUANTIZATIONS)} or none")
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16,
                                  bnb_4bit_quant_type="nf4")
    return BitsAndBytesConfig(load_in_8bit=True)


def model_class(config) -> type:
    """The class named in ``config.architectures`` if transformers has it, else ``AutoModelForImageTextToText``."""
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return transformers.AutoModelForImageTextToText


def _check_dir(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {str(path)!r} does not exist (attnkit loads local folders only)")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{str(path)!r} has no config.json; is it a saved transformers model folder?")
    return path


def load_model(path: str | Path, dtype: str | torch.dtype = "auto", device_map: str | dict | None = None,
               quantization: str | None = None, attn_implementation: str | None = None) -> torch.nn.Module:
    """``from_pretrained`` of a local folder, in eval mode (never pass attnkit's own attention names here)."""
    from transformers import AutoConfig

    path = _check_dir(path)
    config = AutoConfig.from_pretrained(path)
    kwargs: dict[str, Any] = {"dtype": parse_dtype(dtype)}
    if device_map is not None:
        kwargs["device_map"] = device_map
    qconfig = quantization_config(quantization)
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    return model_class(config).from_pretrained(path, **kwargs).eval()


def load_processor(path: str | Path, family: str | None = None):
    """``AutoProcessor.from_pretrained(path)``; without torchvision, the family's image-only processor.

    Without torchvision ``AutoProcessor`` of a Qwen-VL / Qwen3-VL / LLaVA-OneVision / InternVL folder silently
    returns the tokenizer (their stock processors build a video processor); then the image processor is read
    with ``AutoImageProcessor`` and joined to the tokenizer in
    :func:`attnkit.models.processors.image_only_processor_class` (same outputs as the stock processor).
    """
    from transformers import AutoImageProcessor, AutoProcessor
    from transformers.processing_utils import ProcessorMixin

    from attnkit.models.processors import IMAGE_ONLY_FAMILIES, image_only_processor_class

    path = _check_dir(path)
    processor = AutoProcessor.from_pretrained(path)
    if isinstance(processor, ProcessorMixin):
        return processor
    family = family or _family_of(path)
    if family not in IMAGE_ONLY_FAMILIES:
        raise ValueError(f"AutoProcessor.from_pretrained({str(path)!r}) gave a {type(processor).__name__}, not a "
                         f"multimodal processor; the folder needs processor_config.json / preprocessor_config.json")
    image_processor = AutoImageProcessor.from_pretrained(path)
    template = path / "chat_template.jinja"
    chat_template = template.read_text() if template.is_file() else getattr(processor, "chat_template", None)
    saved = path / "processor_config.json"   # the processor's own settings (e.g. InternVL's image_seq_length)
    options = json.loads(saved.read_text()) if saved.is_file() else {}
    options = {k: v for k, v in options.items() if k not in ("image_processor", "video_processor", "processor_class",
                                                             "chat_template", "tokenizer")}
    return image_only_processor_class(family)(image_processor=image_processor, tokenizer=processor,
                                              chat_template=chat_template, **options)


def _family_of(path: Path) -> str | None:
    from transformers import AutoConfig

    from attnkit.models.base import family_names

    families = family_names()
    for name in AutoConfig.from_pretrained(path).architectures or []:
        if name in families:
            return families[name]
    return None


def load_model_and_processor(path: str | Path, dtype: str | torch.dtype = "auto", device_map: str | dict | None = None,
                             quantization: str | None = None, attn_implementation: str | None = None):
    """``(model, processor)`` from a local folder; see :func:`load_model` and :func:`load_processor`."""
    model = load_model(path, dtype=dtype, device_map=device_map, quantization=quantization,
                       attn_implementation=attn_implementation)
    return model, load_processor(path, _family_of(Path(path).expanduser()))
