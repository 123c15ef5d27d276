"""BOFT: butterfly permutations (PEFT's as oracle), orthogonality, scaling, geometry checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft.tuners.boft.layer import BOFTLayer

from peftkit import BOFTConfig, get_peft_model
from peftkit.methods.boft.module import butterfly_permutation

X = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    ("n", "blocks", "half", "factors"), [(32, 8, 2, 1), (64, 16, 2, 2), (64, 8, 4, 1), (32, 4, 4, 0)]
)
def test_butterfly_permutation_matches_peft(n, blocks, half, factors):
    assert torch.equal(
        butterfly_permutation(n, blocks, half, factors), BOFTLayer.block_butterfly_perm(None, n, blocks, half, factors)
    )


def test_forward_is_scaled_rotated_weight(llama):
    torch.manual_seed(0)
    model = get_peft_model(llama, BOFTConfig(boft_block_size=8, target_modules=["down_proj"], init_weights=False))
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    adapter = model.adapters["default"]
    rotation = adapter.rotation(layer)
    torch.testing.assert_close(rotation @ rotation.T, torch.eye(64), atol=1e-5, rtol=0)
    scale = layer.boft_s["default"].view(-1)
    with torch.no_grad():
        torch.testing.assert_close(
            layer(X), F.linear(X @ rotation, layer.base_layer.weight) * scale, atol=1e-5, rtol=1e-5
        )


def test_butterfly_factors_build_an_orthogonal_product(llama):
    torch.manual_seed(0)
    config = BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, target_modules=["down_proj"], init_weights=False)
    model = get_peft_model(llama, config)
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    assert layer.boft_R["default"].shape == (2, 16, 4, 4)
    rotation = model.adapters["default"].rotation(layer)
    torch.testing.assert_close(rotation @ rotation.T, torch.eye(64), atol=1e-5, rtol=0)
    # with two factors the rotation mixes features across the first factor's blocks
    assert torch.count_nonzero(rotation[:4, 4:]) > 0
    before = model(input_ids=torch.tensor([[3, 4, 5]])).logits
    model.merge_adapter()
    torch.testing.assert_close(model(input_ids=torch.tensor([[3, 4, 5]])).logits, before, atol=1e-4, rtol=1e-4)


def test_peft_cpu_files_with_silently_dropped_factors_are_refused(llama):
    model = get_peft_model(
        llama, BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, target_modules=["down_proj"])
    )
    state = {
        k: (v[:1] if k.endswith("boft_R") else v) for k, v in model.adapters["default"].adapter_state_dict().items()
    }
    with pytest.raises(ValueError, match="silently trains with 1 factor"):
        model.adapters["default"].load_adapter_state_dict(state, trainable=False)


def test_geometry_errors_name_the_layer(llama):
    with pytest.raises(ValueError, match=r"q_proj has 32 inputs, not divisible by boft_block_size=12"):
        get_peft_model(llama, BOFTConfig(boft_block_size=12, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="exactly one of boft_block_size"):
        BOFTConfig(boft_block_size=4, boft_block_num=8)


def test_block_num_gives_the_block_size(llama):
    model = get_peft_model(llama, BOFTConfig(boft_block_size=0, boft_block_num=4, target_modules=["q_proj"]))
    assert model.base_model.model.model.layers[0].self_attn.q_proj.boft_R["default"].shape == (1, 4, 8, 8)
    assert model.adapters["default"].num_parameters() == 2 * (4 * 8 * 8 + 32)
