"""LoKr: the factorisation rule (PEFT's as oracle), ΔW = (alpha/r) · W1 ⊗ W2, decomposition choices."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft.tuners.lokr.layer import factorization as peft_factorization

from peftkit import LoKrConfig, get_peft_model
from peftkit.methods.lokr.module import factorization

X = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("dimension", [1, 7, 16, 32, 96, 127, 128, 576, 640])
@pytest.mark.parametrize("factor", [-1, 2, 4, 8])
def test_factorization_matches_peft(dimension, factor):
    assert factorization(dimension, factor) == peft_factorization(dimension, factor)


def test_hand_checked_factorizations():
    assert factorization(256) == (16, 16)
    assert factorization(128) == (8, 16)
    assert factorization(127) == (1, 127)
    assert factorization(128, factor=4) == (4, 32)


def test_update_is_a_kronecker_product(llama):
    model = get_peft_model(llama, LoKrConfig(r=4, alpha=2, target_modules=["v_proj"], init_weights=False))
    layer = model.base_model.model.model.layers[0].self_attn.v_proj
    w1, w2 = layer.lokr_w1["default"], layer.lokr_w2["default"]
    assert w1.shape == (4, 4) and w2.shape == (4, 8)  # out 16 = 4·4, in 32 = 4·8
    delta = torch.kron(w1, w2) * (2 / 4)
    with torch.no_grad():
        torch.testing.assert_close(layer(X), F.linear(X, layer.base_layer.weight + delta), atol=1e-5, rtol=1e-5)


def test_small_rank_decomposes_w2_and_decompose_both_w1(llama):
    model = get_peft_model(llama, LoKrConfig(r=1, target_modules=["q_proj"], decompose_both=True))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    slots = {n for n, _ in layer.named_parameters() if n.startswith("lokr_")}
    assert slots == {"lokr_w1_a.default", "lokr_w1_b.default", "lokr_w2_a.default", "lokr_w2_b.default"}
    # per layer (r = 1): W1a 4×1 + W1b 1×4 + W2a 8×1 + W2b 1×8 = 24
    assert model.adapters["default"].num_parameters() == 2 * ((4 + 4) + (8 + 8))


def test_init_modes(llama):
    model = get_peft_model(llama, LoKrConfig(r=4, target_modules=["q_proj"]))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert torch.count_nonzero(layer.lokr_w1["default"]) == 0 and torch.count_nonzero(layer.lokr_w2["default"]) > 0
    lycoris = get_peft_model(model.unload(), LoKrConfig(r=4, target_modules=["q_proj"], init_weights="lycoris"))
    layer = lycoris.base_model.model.model.layers[0].self_attn.q_proj
    assert torch.count_nonzero(layer.lokr_w2["default"]) == 0 and torch.count_nonzero(layer.lokr_w1["default"]) > 0
    with pytest.raises(ValueError, match="init_weights='pissa' is not supported"):
        LoKrConfig(init_weights="pissa")
