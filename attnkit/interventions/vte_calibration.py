"""Calibration for ``vte``: the training-free exit layer (KL criterion) and DyVTE's learned routers."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from attnkit.interventions.vte import ROUTER_CONFIG, ROUTER_WEIGHTS, Router, choose_exit_layer, router_features


def _prepared(model, processor, samples) -> list[dict]:
    from attnkit.models.prompts import build_inputs

    device = next(model.parameters()).device
    prepared, failed = [], 0
    for s in samples:
        try:
            inputs = build_inputs(processor, s.question, s.image)
        except Exception:  # noqa: BLE001 - an unreadable image is skipped and counted
            failed += 1
            continue
        prepared.append({k: v.to(device) for k, v in inputs.items()})
    if not prepared:
        raise ValueError(f"vte calibration: none of the {len(samples)} samples could be prepared")
    return prepared


def _exited(model, layer: int):
    from attnkit.hooks.handle import installed
    from attnkit.interventions.vte import VisualTokenExit

    return installed(model, VisualTokenExit(policy="layer", exit_layer=layer))


def calibrate_exit_layer(model, processor, samples: Sequence, out_path: Path, max_kl: float = 0.05) -> dict:
    """Mean KL(full ‖ exited after layer E) of the first answer token's distribution, for every E; the exit
    layer by :func:`~attnkit.interventions.vte.choose_exit_layer`; written to ``out_path`` as JSON."""
    from attnkit.models import get_adapter

    n = get_adapter(model).num_layers
    prepared = _prepared(model, processor, samples)
    with torch.no_grad():
        full = [torch.log_softmax(model(**x).logits[:, -1].float(), -1) for x in prepared]
        kl = []
        for layer in tqdm(range(n - 1), desc="vte: KL per exit layer"):
            total = 0.0
            with _exited(model, layer):
                for x, ref in zip(prepared, full):
                    out = torch.log_softmax(model(**x).logits[:, -1].float(), -1)
                    total += float((ref.exp() * (ref - out)).sum(-1).mean())
            kl.append(total / len(prepared))
    kl.append(0.0)  # exiting after the last layer changes nothing
    result = {"intervention": "vte", "policy": "calibrated", "model_class": type(model).__name__,
              "num_layers": n, "criterion": "mean KL(full || exited) of the first answer token", "max_kl": max_kl,
              "kl_per_layer": kl, "exit_layer": choose_exit_layer(kl, max_kl), "n_samples": len(prepared),
              "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2))
    return result


def exit_labels(model, processor, samples: Sequence, max_new_tokens: int = 8,
                agreement: float = 0.99, loss_ratio: float = 1.03) -> tuple[list[torch.Tensor], torch.Tensor]:
    """DyVTE's labelling with the MLLM frozen. For each sample, its greedy answer a; for each layer E, exit
    (1) iff teacher-forced predictions on a after exiting at E agree with the full model's on more than
    ``agreement`` of the tokens and the answer loss is below ``loss_ratio`` × the full one.
    Returns per-layer router features [N, 2d] (from the full model's prefill) and labels [N, layers]."""
    from attnkit.models import get_adapter

    adapter = get_adapter(model)
    n = adapter.num_layers
    prepared = _prepared(model, processor, samples)
    features = [[] for _ in range(n)]
    labels = torch.zeros(len(prepared), n, dtype=torch.long)
    labels[:, n - 1] = 1
    for i, x in enumerate(tqdm(prepared, desc="vte: labelling exits")):
        with torch.no_grad():
            out = model.generate(**x, max_new_tokens=max_new_tokens, do_sample=False)
        prompt_len = x["input_ids"].shape[1]
        full_inputs = _with_answer(x, out)
        with torch.no_grad():
            full = model(**full_inputs, output_hidden_states=True)
        spans = adapter.visual_spans(x["input_ids"], x.get("attention_mask"))
        for layer in range(n):
            features[layer].append(router_features(full.hidden_states[layer + 1][:, :prompt_len], spans)[0])
        target = out[:, prompt_len:]
        ref_pred, ref_loss = _answer_scores(full.logits, target, prompt_len)
        for layer in range(n - 1):
            with _exited(model, layer), torch.no_grad():
                logits = model(**full_inputs).logits
            pred, loss = _answer_scores(logits, target, prompt_len)
            agree = float((pred == ref_pred).float().mean())
            labels[i, layer] = int(agree > agreement and loss < loss_ratio * ref_loss)
    return [torch.stack(f) for f in features], labels


def _with_answer(inputs: dict, output_ids: torch.Tensor) -> dict:
    x = dict(inputs)
    extra = output_ids.shape[1] - inputs["input_ids"].shape[1]
    x["input_ids"] = output_ids
    ones = torch.ones(output_ids.shape[0], extra, dtype=inputs["attention_mask"].dtype, device=output_ids.device)
    x["attention_mask"] = torch.cat([inputs["attention_mask"], ones], 1)
    if "mm_token_type_ids" in x:
        x["mm_token_type_ids"] = torch.cat([x["mm_token_type_ids"], torch.zeros_like(ones)], 1)
    return x


def _answer_scores(logits: torch.Tensor, target: torch.Tensor, prompt_len: int) -> tuple[torch.Tensor, float]:
    pred_logits = logits[:, prompt_len - 1: prompt_len - 1 + target.shape[1]].float()
    loss = torch.nn.functional.cross_entropy(pred_logits.flatten(0, 1), target.flatten())
    return pred_logits.argmax(-1), float(loss)


def fit_routers(features: list[torch.Tensor], labels: torch.Tensor, router_hidden: int, epochs: int = 200,
                lr: float = 1e-3, seed: int = 0) -> torch.nn.ModuleList:
    """One :class:`Router` per layer, trained with cross-entropy (class weights [1, 1]) on its layer's samples."""
    torch.manual_seed(seed)
    hidden = features[0].shape[1] // 2
    routers = torch.nn.ModuleList(Router(hidden, router_hidden) for _ in features)
    for layer, (x, y) in enumerate(zip(features, labels.T)):
        router, x = routers[layer], x.float()
        if len(x) > 1:
            router.mean.copy_(x.mean(0))
            router.scale.copy_(x.std(0) + 1e-6)
        opt = torch.optim.Adam([router.w1.weight, router.w2.weight], lr=lr)
        for _ in range(epochs):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(router(x), y)
            loss.backward()
            opt.step()
    return routers


def train_routers(model, processor, samples: Sequence, out_dir: Path, router_hidden: int = 256,
                  max_new_tokens: int = 8, epochs: int = 200, seed: int = 0) -> dict:
    """Label exits on ``samples``, fit the routers, save ``router.safetensors`` + ``router.json`` in ``out_dir``."""
    from attnkit.models import get_adapter

    adapter = get_adapter(model)
    features, labels = exit_labels(model, processor, samples, max_new_tokens=max_new_tokens)
    routers = fit_routers(features, labels, router_hidden, epochs=epochs, seed=seed)
    with torch.no_grad():
        fitted = torch.stack([(r(f.float()).argmax(-1) == y).float().mean() for r, f, y in
                              zip(routers, features, labels.T)])
    return save_routers(routers, out_dir, adapter, {
        "model_class": type(model).__name__, "n_samples": len(labels), "max_new_tokens": max_new_tokens,
        "exit_rate_per_layer": labels.float().mean(0).tolist(), "train_accuracy_per_layer": fitted.tolist(),
        "labelling": "exit iff teacher-forced answer predictions agree > 99 % and loss < 1.03x (DyVTE)"})


def save_routers(routers: torch.nn.ModuleList, out_dir: Path, adapter, extra: dict | None = None) -> dict:
    """``router.safetensors`` (weights and input standardisation) + ``router.json`` (shapes, provenance)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in routers.state_dict().items()}, out_dir / ROUTER_WEIGHTS)
    config = {"intervention": "vte", "policy": "learned", "hidden_size": adapter.text_config.hidden_size,
              "num_layers": adapter.num_layers, "router_hidden": routers[0].w1.out_features, **(extra or {})}
    (out_dir / ROUTER_CONFIG).write_text(json.dumps(config, indent=2))
    return config
