"""Analytic prefill FLOPs and KV-cache bytes: hand counts, FlopCounterMode on tiny LLMs, papers' figures."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from attnkit import testing
from attnkit.eval import costs

# hidden 8, 2 query heads of width 4, 1 key/value head, MLP width 16, 2 layers, fp16
SMALL = {"hidden_size": 8, "intermediate_size": 16, "num_attention_heads": 2, "num_key_value_heads": 1,
         "head_dim": 4, "num_hidden_layers": 2, "dtype_bytes": 2, "mlp_matrices": 3}
VICUNA_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 32,
             "head_dim": 128, "num_hidden_layers": 32, "dtype_bytes": 2, "mlp_matrices": 3}


def test_layer_flops_is_the_hand_count():
    n = 5
    q = 2 * n * 8 * 8          # [5, 8] @ [8, 2·4]
    kv = 2 * (2 * n * 8 * 4)   # two [5, 8] @ [8, 1·4]
    o = 2 * n * 8 * 8
    scores = 2 * n * n * 8     # per head [5, 4] @ [4, 5], 2 heads
    values = 2 * n * n * 8
    mlp = 3 * (2 * n * 8 * 16)
    assert costs.layer_flops(n, SMALL) == q + kv + o + scores + values + mlp == 6560
    triangle = 2 * 2 * (n * (n + 1) // 2) * 8
    assert costs.layer_flops(n, SMALL, causal=True) == q + kv + o + triangle + mlp
    assert costs.prefill_flops([5, 3], SMALL) == 6560 + costs.layer_flops(3, SMALL)
    with pytest.raises(ValueError, match="layer_tokens has 1 entries but the LLM has 2 layers"):
        costs.prefill_flops([5], SMALL)


def test_kv_cache_bytes_is_the_hand_count():
    # 2 layers keep 5 and 3 prompt tokens; 4 generated tokens, 3 of them fed back; K and V, 1 head of 4, fp16
    assert costs.kv_cache_bytes([5, 3], 4, SMALL) == ((5 + 3) + (3 + 3)) * 2 * 1 * 4 * 2 == 224
    assert costs.kv_cache_bytes([5, 3], 0, SMALL) == (5 + 3) * 16


def test_fastv_formula_and_the_papers_figures():
    """FastV's formula is ours with one FLOP per multiply-add, MHA and a 2-matrix MLP; FasterVLM's 43.58 T for
    LLaVA-NeXT-7B (2880 visual tokens + text) is our convention."""
    n = 7
    two_matrix = dict(SMALL, num_key_value_heads=2, mlp_matrices=2)
    assert 2 * costs.fastv_flops(n, 8, 16, 1) == costs.layer_flops(n, two_matrix)
    assert costs.prefill_flops([3000] * 32, VICUNA_7B) / 1e12 == pytest.approx(43.58, rel=1e-3)
    assert costs.fastv_flops(3000, 4096, 11008, 32) / 1e12 == pytest.approx(17.46, rel=1e-3)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_prefill_flops_equal_flop_counter_on_a_tiny_llm(family):
    """The LLM's decoder layers under FlopCounterMode (eager attention: every matmul is an aten op it counts;
    both have 4 query heads over 2 key/value heads; qwen2_vl's q/k/v have biases, which add no matmul)."""
    model = testing.tiny_model(family, attn_implementation="eager")
    dims = costs.text_dims(model)
    assert dims["num_key_value_heads"] < dims["num_attention_heads"]              # GQA widths are used
    n = 11
    embeds = torch.randn(1, n, dims["hidden_size"])
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model.model.language_model(inputs_embeds=embeds)
    layers = sum(sum(ops.values()) for name, ops in counter.get_flop_counts().items()
                 if name.rsplit(".", 1)[-1].isdigit() and ".layers." in name)
    assert layers == counter.get_total_flops()          # nothing outside the decoder layers is a matmul here
    assert costs.prefill_flops([n] * dims["num_hidden_layers"], dims) == layers


def test_text_dims_of_the_demo_and_of_a_config():
    model = testing.tiny_model("llava", dtype=torch.bfloat16)
    dims = costs.text_dims(model)
    assert dims["dtype_bytes"] == 2 and dims["mlp_matrices"] == 3
    assert costs.text_dims(model.config, dtype_bytes=4)["dtype_bytes"] == 4
    with pytest.raises(ValueError, match="has no hidden_size"):
        costs.text_dims(type("Cfg", (), {"num_attention_heads": 2})())


def test_sample_costs_and_spread():
    row = {"layer_tokens": [5, 3], "new_tokens": 4}
    out = costs.sample_costs(row, SMALL)
    assert out["prefill_tflops"] == costs.prefill_flops([5, 3], SMALL) / 1e12
    assert out["kv_cache_mb"] == 224 / 2 ** 20
    assert costs.sample_costs({"new_tokens": 4}, SMALL) == {"prefill_tflops": None, "kv_cache_mb": None}
    values = [float(v) for v in range(11)]           # 0..10
    assert costs.spread(values) == {"median": 5.0, "p10": 1.0, "p90": 9.0}
    assert costs.quantile([1.0, 2.0], 0.25) == 1.25
    assert costs.spread([]) == {"median": None, "p10": None, "p90": None}
