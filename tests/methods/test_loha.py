"""LoHa: ΔW = (alpha/r) · (W1a W1b) ⊙ (W2a W2b), dropout behaviour, ranks, Conv1D."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from peftkit import LoHaConfig, get_peft_model
from tests.conftest import tiny_model

X = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(0))


def test_update_is_a_hadamard_product(llama):
    model = get_peft_model(llama, LoHaConfig(r=3, alpha=6, target_modules=["v_proj"], init_weights=False))
    layer = model.base_model.model.model.layers[0].self_attn.v_proj
    p = {n: getattr(layer, n)["default"] for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
    assert p["hada_w1_a"].shape == (16, 3) and p["hada_w1_b"].shape == (3, 32)
    delta = (p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"]) * (6 / 3)
    with torch.no_grad():
        torch.testing.assert_close(layer(X), F.linear(X, layer.base_layer.weight + delta), atol=1e-5, rtol=1e-5)


def test_default_init_zeroes_one_factor(llama):
    model = get_peft_model(llama, LoHaConfig(target_modules=["q_proj"]))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert torch.count_nonzero(layer.hada_w2_b["default"]) == 0
    assert torch.count_nonzero(layer.hada_w1_a["default"]) > 0
    torch.testing.assert_close(layer(X), layer.base_layer(X))


def test_module_dropout_skips_the_adapter_in_training():
    model = get_peft_model(
        tiny_model("llama"), LoHaConfig(target_modules=["q_proj"], module_dropout=0.999, init_weights=False)
    )
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    model.train()
    torch.testing.assert_close(layer(X), layer.base_layer(X))
    model.eval()
    assert not torch.allclose(layer(X), layer.base_layer(X))


def test_rank_dropout_drops_output_rows_in_training():
    torch.manual_seed(0)
    model = get_peft_model(
        tiny_model("llama"), LoHaConfig(target_modules=["q_proj"], rank_dropout=0.5, init_weights=False)
    )
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    model.train()
    delta = layer(X) - layer.base_layer(X)
    dropped = (delta.abs().sum(dim=(0, 1)) == 0).sum()
    assert 0 < dropped < 32


def test_rank_larger_than_a_dimension_and_conv1d():
    model = get_peft_model(tiny_model("gpt2"), LoHaConfig(r=40, target_modules=["c_attn"], init_weights=False))
    assert model.adapters["default"].num_parameters() == 2 * 2 * 40 * (32 + 96)
    ids = torch.tensor([[4, 5, 6]])
    before = model(input_ids=ids).logits
    model.merge_adapter()
    torch.testing.assert_close(model(input_ids=ids).logits, before, atol=1e-4, rtol=1e-4)
