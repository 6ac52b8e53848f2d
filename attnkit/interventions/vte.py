"""``vte``: DyVTE — once text has absorbed the image, remove all visual tokens from the rest of the LLM."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from attnkit.hooks.drop import Decision
from attnkit.interventions.base import param, register
from attnkit.interventions.pruning import Pruner

POLICIES = ("layer", "calibrated", "learned")
ROUTER_WEIGHTS, ROUTER_CONFIG = "router.safetensors", "router.json"


class Router(torch.nn.Module):
    """DyVTE's exit head for one layer: ``p = softmax(W2 · GELU(W1 · [mean(T_1..t-1), T_t]))`` (no biases);
    ``T`` are the text states after the image, ``T_t`` the last prompt token; class 1 = exit."""

    def __init__(self, hidden_size: int, router_hidden: int):
        super().__init__()
        self.w1 = torch.nn.Linear(2 * hidden_size, router_hidden, bias=False)
        self.w2 = torch.nn.Linear(router_hidden, 2, bias=False)
        # input standardisation fitted on the training features (hidden-state scales differ by layer)
        self.register_buffer("mean", torch.zeros(2 * hidden_size))
        self.register_buffer("scale", torch.ones(2 * hidden_size))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.w2(torch.nn.functional.gelu(self.w1((features - self.mean) / self.scale)))


def router_features(hidden: torch.Tensor, spans) -> torch.Tensor:
    """[B, 2d]: mean of each sample's text states after its image (its last real prompt token excluded), and
    that last token's state (each sample's own last real token: left or right padding alike)."""
    valid = spans.valid.to(hidden.device)
    positions = torch.arange(valid.shape[1], device=hidden.device).expand_as(valid)
    last = torch.where(valid, positions, -1).max(1).values                                   # [B]
    text = spans.text_after_image().to(hidden.device) & (positions != last[:, None])
    weights = text.float() / text.sum(1, keepdim=True).clamp(min=1)
    mean = torch.einsum("bl,bld->bd", weights, hidden.float())
    final = hidden[torch.arange(hidden.shape[0], device=hidden.device), last.clamp(min=0)]
    return torch.cat([mean, final.float()], dim=-1)


def choose_exit_layer(kl_per_layer: list[float], max_kl: float) -> int:
    """The calibrated rule: the earliest exit layer L with mean KL <= ``max_kl`` at L and at every deeper layer
    (exiting later never worse than the tolerance); the last layer (no exit) if none qualifies."""
    layer = len(kl_per_layer) - 1
    for i in range(len(kl_per_layer) - 1, -1, -1):
        if kl_per_layer[i] > max_kl:
            break
        layer = i
    return layer


@register
@dataclasses.dataclass
class VisualTokenExit(Pruner):
    """Dynamic visual-token exit (DyVTE, "Accelerating Multimodal Large Language Models via Dynamic
    Visual-Token Exit and the Empirical Findings", arXiv 2411.19628).

    After the exit layer E, all visual tokens leave the sequence: layers 0..E run on the full prompt,
    layers E+1.. on the text alone (original positions kept), their KV cache never holds visual entries,
    for the rest of prefill and every decode step. The exit layer comes from:

    - ``policy="layer"``: a fixed ``exit_layer``.
    - ``policy="calibrated"`` (training-free, default): a per-model exit layer from a JSON made by
      :meth:`calibrate` (``attnkit calibrate vte --out exit.json``): the earliest layer E at which the mean
      KL(full ‖ exited) of the first answer token's distribution over a calibration set stays within
      ``max_kl`` for E and every deeper exit (in the spirit of VTW, "Visual Tokens Withdrawal").
    - ``policy="learned"``: the paper's per-layer routers (:class:`Router`, trained with the MLLM frozen by
      ``attnkit calibrate vte --out DIR``), evaluated on each layer's output at prefill; the first layer whose
      router says exit (argmax, as the released code) is the sample's exit.

    Batch > 1: each sample may exit at its own layer. The removal itself is shared: visual tokens leave
    the sequence after the LAST sample's exit; between a sample's own exit and that layer its visual
    keys are masked (same outputs as removal, no savings). A sample that never exits keeps the whole
    batch's visual tokens (the others stay masked). Exits are decided at prefill and reused in decode.
    """

    name = "vte"
    files = ("calibration", "router")
    policy: str = param("calibrated", choices=POLICIES, doc="where the exit layer comes from")
    exit_layer: int | None = param(None, low=0, doc="policy=layer: the last layer that sees visual tokens")
    calibration: str | None = param(None, doc="policy=calibrated: JSON written by `attnkit calibrate vte`")
    router: str | None = param(None, doc="policy=learned: folder written by `attnkit calibrate vte`")

    def __post_init__(self):
        super().__post_init__()
        needs = {"layer": "exit_layer", "calibrated": "calibration", "learned": "router"}[self.policy]
        if getattr(self, needs) is None:
            hint = {"exit_layer": "e.g. vte:policy=layer,exit_layer=8",
                    "calibration": "make it with `attnkit calibrate vte --model PATH --data DIR --out exit.json`",
                    "router": "train one with `attnkit calibrate vte --model PATH --data DIR --out router_dir`"}
            raise ValueError(f"vte: policy={self.policy!r} needs {needs}=...; {hint[needs]}")
        self._exits: list[int | None] = []
        self._routers: torch.nn.ModuleList | None = None

    # --- installation ------------------------------------------------------------------------------
    def check(self, ctx) -> None:
        n = ctx.adapter.num_layers
        if self.policy == "calibrated":
            data = json.loads(Path(self.calibration).read_text())
            if data.get("num_layers") != n:
                raise ValueError(f"vte: {self.calibration} was calibrated for {data.get('num_layers')} layers, "
                                 f"this model has {n}")
            self._fixed = int(data["exit_layer"])
        elif self.policy == "layer":
            if self.exit_layer > n - 1:
                raise ValueError(f"vte: exit_layer={self.exit_layer} is out of range; this model has layers "
                                 f"0..{n - 1}")
            self._fixed = self.exit_layer
        else:
            self._fixed = None
            self._routers = load_routers(self.router, ctx.adapter).eval()

    def stages(self, num_layers: int) -> tuple[int, ...] | None:
        if self._fixed is None:
            return None                              # the routers decide after any layer
        return (self._fixed + 1,) if self._fixed < num_layers - 1 else ()

    def attention_layers(self, ctx) -> list[int]:
        # per-sample exits mask the early exiters' visual keys until the batch's common removal
        return list(range(1, ctx.adapter.num_layers)) if self.policy == "learned" else []

    def reset(self) -> None:
        super().reset()
        self._exits = []

    # --- decisions ---------------------------------------------------------------------------------
    def decide(self, layer: int, hidden: torch.Tensor) -> Decision | None:
        """Asked by the dropper with the output of layer ``layer - 1``: exit there (all visual tokens leave)?"""
        spans = self._ctx.state.spans
        if not self._exits:
            self._exits = [None] * spans.batch_size
        with_image = spans.visual.any(1).tolist()
        if self._fixed is not None:
            says_exit = [layer - 1 == self._fixed] * spans.batch_size
        else:
            with torch.no_grad():
                feats = router_features(hidden, spans).to(self._router_dtype())
                logits = self._routers[layer - 1](feats)
            says_exit = (logits[:, 1] > logits[:, 0]).tolist()
        for b in range(spans.batch_size):
            if says_exit[b] and with_image[b] and self._exits[b] is None:
                self._exits[b] = layer - 1
        if all(e is not None for e, img in zip(self._exits, with_image) if img):
            return Decision(torch.zeros_like(spans.visual))
        return None

    def _router_dtype(self) -> torch.dtype:
        return next(self._routers.parameters()).dtype

    def on_attention(self, call) -> None:
        spans = call.state.spans
        if spans is None or not self._exits or not any(e is not None for e in self._exits):
            return
        if call.state.plan_at(call.layer_idx) is not None:
            return
        masked = [b for b, e in enumerate(self._exits) if e is not None and e < call.layer_idx]
        if not masked:
            return
        columns = torch.zeros(spans.batch_size, call.kv_len, dtype=torch.bool, device=call.query.device)
        columns[masked, : spans.length] = spans.visual[masked].to(call.query.device)

        def hide(rows, scores):
            return scores.masked_fill(columns[:, None, None, :], torch.finfo(torch.float32).min)

        call.edit_scores(hide)

    # --- report ------------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        spans = self._ctx.state.spans if self._ctx else None
        if spans is None or not spans.has_images():
            return {"note": "no image in the input: nothing to exit"}
        plan = self._dropper.plan if self._dropper is not None else None
        cfg = self._ctx.adapter.text_config
        n_layers, heads = self._ctx.adapter.num_layers, cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        elem = next(self._ctx.model.parameters()).element_size()
        kv_saved, flops_saved = [], []
        valid = spans.valid.sum(1).tolist()
        for b, n_vis in enumerate(spans.counts()):
            removed_layers = 0 if plan is None else n_layers - plan.from_layer
            kv_saved.append(removed_layers * n_vis * 2 * cfg.num_key_value_heads * head_dim * elem)
            pairs = valid[b] * (valid[b] + 1) // 2 - (valid[b] - n_vis) * (valid[b] - n_vis + 1) // 2
            flops_saved.append(removed_layers * 4 * heads * head_dim * pairs)
        exits = list(self._exits) or [None] * spans.batch_size
        if self._fixed == n_layers - 1:  # exiting after the last layer: nothing to remove
            exits = [self._fixed if v else None for v in spans.visual.any(1).tolist()]
        return {"policy": self.policy, "exit_layer": exits,
                "removed_from_layer": None if plan is None else plan.from_layer,
                "visual_tokens": spans.counts(),
                "kv_cache_bytes_saved": kv_saved, "prefill_attention_flops_saved": flops_saved}

    # --- calibration ----------------------------------------------------------------------------
    @classmethod
    def calibrate(cls, model, processor, samples, out_path, max_kl: float = 0.05, max_new_tokens: int = 8,
                  router_hidden: int = 256, epochs: int = 200, seed: int = 0):
        """Write what ``policy="calibrated"`` (``out_path`` ends in ``.json``: the exit layer) or
        ``policy="learned"`` (any other ``out_path``: a folder with trained routers) needs."""
        from attnkit.interventions.vte_calibration import calibrate_exit_layer, train_routers

        out_path = Path(out_path)
        if out_path.suffix == ".json":
            return calibrate_exit_layer(model, processor, samples, out_path, max_kl=max_kl)
        return train_routers(model, processor, samples, out_path, router_hidden=router_hidden,
                             max_new_tokens=max_new_tokens, epochs=epochs, seed=seed)


def load_routers(path: str | Path, adapter) -> torch.nn.ModuleList:
    """Routers saved by :func:`attnkit.interventions.vte_calibration.train_routers` (safetensors + JSON)."""
    from safetensors.torch import load_file

    path = Path(path)
    config = json.loads((path / ROUTER_CONFIG).read_text())
    hidden = adapter.text_config.hidden_size
    if config["hidden_size"] != hidden or config["num_layers"] != adapter.num_layers:
        raise ValueError(f"vte: the router in {path} is for hidden size {config['hidden_size']} and "
                         f"{config['num_layers']} layers; this model has {hidden} and {adapter.num_layers}")
    routers = torch.nn.ModuleList(Router(hidden, config["router_hidden"]) for _ in range(adapter.num_layers))
    routers.load_state_dict(load_file(path / ROUTER_WEIGHTS))
    device = next(adapter.language_model.parameters()).device
    return routers.to(device)
