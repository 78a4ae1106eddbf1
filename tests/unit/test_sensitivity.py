"""Sensitivity-guided mixed precision: names, int4 rounding, budget, calibration rows
(the ranking itself on a model: tests/e2e/test_quantizers.py)."""

from __future__ import annotations

import pytest

from slmflow.sensitivity import calibration_rows, int4_round_trip, onnx_matmul_names, within_budget


@pytest.mark.parametrize(("module", "nodes"), [
    ("lm_head", [("/lm_head/MatMul", 0, 1)]),
    ("model.layers.3.self_attn.q_proj", [("/model/layers.3/attn/qkv_proj/MatMul", 0, 1)]),
    ("model.layers.3.self_attn.v_proj", [("/model/layers.3/attn/qkv_proj/MatMul", 0, 1)]),
    ("model.layers.3.self_attn.qkv_proj", [("/model/layers.3/attn/qkv_proj/MatMul", 0, 1)]),
    ("model.layers.12.self_attn.o_proj", [("/model/layers.12/attn/o_proj/MatMul", 0, 1)]),
    ("model.layers.0.mlp.down_proj", [("/model/layers.0/mlp/down_proj/MatMul", 0, 1)]),
    ("model.layers.0.mlp.gate_up_proj", [("/model/layers.0/mlp/gate_proj/MatMul", 0, 2),
                                         ("/model/layers.0/mlp/up_proj/MatMul", 1, 2)]),
    ("model.embed_tokens", []),
    ("model.layers.0.input_layernorm", []),
])
def test_modules_map_to_the_builders_matmul_names(module, nodes):
    assert onnx_matmul_names(module) == nodes


def test_int4_round_trip_keeps_representable_blocks_and_rounds_the_rest():
    import torch

    exact = torch.tensor([[7.0, -7.0, 1.0, 0.0] * 8])  # scale 1: already on the int4 grid
    assert torch.equal(int4_round_trip(exact, 32), exact)
    weight = torch.tensor([[7.0] + [0.4] * 31])  # scale 1: 0.4 rounds to 0
    assert torch.equal(int4_round_trip(weight, 32), torch.tensor([[7.0] + [0.0] * 31]))
    odd = torch.randn(3, 40)  # a width the block does not divide: padded, then cut back
    assert int4_round_trip(odd, 32).shape == (3, 40)
    assert (int4_round_trip(odd, 32) - odd).abs().max() <= odd.abs().max() / 7 / 2 + 1e-6


def test_budget_takes_the_most_sensitive_that_fit_in_order():
    ranking = [{"node": "a", "label_kl": 0.9, "parameters": 600},
               {"node": "b", "label_kl": 0.5, "parameters": 300},
               {"node": "c", "label_kl": 0.2, "parameters": 100},
               {"node": "d", "label_kl": 0.0, "parameters": 1}]  # harmless: never worth bytes
    assert within_budget(ranking, 0.25, 2000) == ["b", "c"]  # 250 extra allowed: a does not fit
    assert within_budget(ranking, 1.0, 2000) == ["a", "b", "c"]
    assert within_budget(ranking, 0.0, 2000) == []


def test_calibration_rows_take_each_label_in_turn():
    rows = [{"label": lab, "i": i} for i, lab in enumerate("AAAABBC")]
    picked = calibration_rows(rows, 5)
    assert [r["label"] for r in picked] == ["A", "B", "C", "A", "B"]
    assert [r["i"] for r in picked] == [0, 4, 6, 1, 5]  # in the split's order within a label
    assert len(calibration_rows(rows, 100)) == 7
