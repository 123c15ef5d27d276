"""OFT: block-diagonal rotations of the input, Cayley(-Neumann), block sharing, COFT, size adjustment."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peftkit import OFTConfig, get_peft_model
from peftkit.methods.oft.module import cayley

X = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(0))


def q_proj(model):
    return model.base_model.model.model.layers[0].self_attn.q_proj


def skew(b: int, seed: int = 0) -> torch.Tensor:
    a = torch.randn(2, b, b, generator=torch.Generator().manual_seed(seed)) * 0.02
    return a - a.transpose(1, 2)


def test_exact_cayley_is_orthogonal_and_neumann_approximates_it():
    q = skew(6)
    exact = cayley(q, neumann=False, terms=5)
    torch.testing.assert_close(exact @ exact.transpose(1, 2), torch.eye(6).expand(2, 6, 6), atol=1e-5, rtol=0)
    eye = torch.eye(6)
    torch.testing.assert_close(exact, (eye - q) @ torch.linalg.inv(eye + q), atol=1e-5, rtol=0)
    # Neumann: I + 2Q + 2Q² + 2Q³ + Q⁴ (PEFT's five terms), the series of (I + Q)(I - Q)^-1 = exactᵀ:
    # PEFT's two modes are mirror images of each other, and peftkit keeps both as PEFT computes them.
    series = eye + 2 * q + 2 * q @ q + 2 * q @ q @ q + q @ q @ q @ q
    torch.testing.assert_close(cayley(q, neumann=True, terms=5), series, atol=1e-6, rtol=0)
    assert (cayley(q, neumann=True, terms=5) - exact.transpose(1, 2)).abs().max() < 1e-4


def test_forward_rotates_the_input_block_by_block(llama):
    torch.manual_seed(0)
    model = get_peft_model(llama, OFTConfig(oft_block_size=8, target_modules=["q_proj"], init_weights=False))
    layer = q_proj(model)
    module = layer.oft_R["default"]
    assert module.weight.shape == (4, 28)
    blocks = cayley(module.skew(module.weight), neumann=True, terms=5)
    rotation = torch.block_diag(*blocks)
    with torch.no_grad():
        torch.testing.assert_close(layer(X), F.linear(X @ rotation, layer.base_layer.weight), atol=1e-5, rtol=1e-5)


def test_r_gives_the_number_of_blocks_and_block_share_one_block(llama):
    model = get_peft_model(llama, OFTConfig(r=2, oft_block_size=0, target_modules=["q_proj"]))
    assert q_proj(model).oft_R["default"].weight.shape == (2, 16 * 15 // 2)
    shared = get_peft_model(model.unload(), OFTConfig(oft_block_size=8, block_share=True, target_modules=["q_proj"]))
    assert shared.adapters["default"].num_parameters() == 2 * 28


def test_block_size_is_adjusted_with_a_warning(llama):
    # nearest divisors of 32 are 8 and 16, equally far: PEFT (and peftkit) take the smaller
    with pytest.warns(UserWarning, match=r"oft_block_size=12 does not divide .* 32 inputs; using 8"):
        model = get_peft_model(llama, OFTConfig(oft_block_size=12, target_modules=["q_proj"]))
    assert q_proj(model).oft_R["default"].weight.shape == (4, 28)
    with pytest.warns(UserWarning, match="using 32"):  # larger than the layer: one block
        get_peft_model(model.unload(), OFTConfig(oft_block_size=64, target_modules=["q_proj"]))


def test_coft_keeps_generators_within_eps(llama):
    torch.manual_seed(0)
    model = get_peft_model(
        llama, OFTConfig(oft_block_size=8, coft=True, eps=1e-3, target_modules=["q_proj"], init_weights=False)
    )
    layer = q_proj(model)
    layer(X)
    module = layer.oft_R["default"]
    norms = torch.linalg.norm(module.skew(module.weight), dim=(1, 2))
    assert torch.all(norms <= 1e-3 / 2 + 1e-7)  # eps / √blocks


def test_config_needs_exactly_one_of_r_and_block_size():
    with pytest.raises(ValueError, match=r"exactly one of r \(4\) and oft_block_size \(8\)"):
        OFTConfig(r=4, oft_block_size=8)
    with pytest.raises(ValueError, match="exactly one"):
        OFTConfig(r=0, oft_block_size=0)


def test_old_cayley_neumann_files_are_refused():
    with pytest.raises(ValueError, match="written by PEFT 0.17.0"):
        OFTConfig(peft_version="0.17.0")
    assert OFTConfig(peft_version="0.21.2").to_dict()["peft_version"] == "0.21.2"
    assert OFTConfig().to_dict()["peft_version"] == "0.18.0"
