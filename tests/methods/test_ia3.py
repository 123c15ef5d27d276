"""(IA)³: output scaling for attention targets, input scaling for feed-forward targets, products, merging."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peftkit import IA3Config, get_peft_model
from tests.conftest import tiny_model

X = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(0))


def layers(model):
    block = model.base_model.model.model.layers[0]
    return block.self_attn.k_proj, block.mlp.down_proj


def test_defaults_follow_peft_per_model_type(llama):
    model = get_peft_model(llama, IA3Config())
    config = model.peft_config["default"]
    assert config.target_modules == ["k_proj", "v_proj", "down_proj"] and config.feedforward_modules == ["down_proj"]
    gpt2 = get_peft_model(tiny_model("gpt2"), IA3Config()).peft_config["default"]
    assert gpt2.target_modules == ["c_attn", "mlp.c_proj"] and gpt2.fan_in_fan_out is True


def test_attention_targets_scale_outputs_and_feedforward_targets_scale_inputs(llama):
    model = get_peft_model(llama, IA3Config(init_ia3_weights=False))
    k_proj, down_proj = layers(model)
    assert k_proj.ia3_l["default"].shape == (16, 1) and down_proj.ia3_l["default"].shape == (1, 64)
    x = X[..., :32]
    with torch.no_grad():
        torch.testing.assert_close(k_proj(x), F.linear(x, k_proj.base_layer.weight) * k_proj.ia3_l["default"].view(-1))
        expected = F.linear(X * down_proj.ia3_l["default"].view(-1), down_proj.base_layer.weight)
        torch.testing.assert_close(down_proj(X), expected, atol=1e-6, rtol=1e-5)


def test_default_init_is_the_identity(llama):
    model = get_peft_model(llama, IA3Config())
    ids = torch.tensor([[3, 4, 5]])
    torch.testing.assert_close(model(input_ids=ids).logits, tiny_model("llama")(input_ids=ids).logits)


def test_two_adapters_multiply(llama):
    model = get_peft_model(llama, IA3Config(init_ia3_weights=False))
    model.add_adapter("b", IA3Config(init_ia3_weights=False))
    model.set_adapter(["default", "b"])
    k_proj, down_proj = layers(model)
    x = X[..., :32]
    scale = k_proj.ia3_l["default"].view(-1) * k_proj.ia3_l["b"].view(-1)
    with torch.no_grad():
        torch.testing.assert_close(k_proj(x), F.linear(x, k_proj.base_layer.weight) * scale, atol=1e-6, rtol=1e-5)
        scale = down_proj.ia3_l["default"].view(-1) * down_proj.ia3_l["b"].view(-1)
        expected = F.linear(X * scale, down_proj.base_layer.weight)
        torch.testing.assert_close(down_proj(X), expected, atol=1e-6, rtol=1e-5)


def test_merge_scales_rows_and_bias_or_columns():
    """GPT-2: c_attn scales weight columns (out) and bias; mlp.c_proj scales weight rows (in), not the bias."""
    model = get_peft_model(tiny_model("gpt2"), IA3Config(init_ia3_weights=False))
    block = model.base_model.transformer.h[0]
    attn, mlp = block.attn.c_attn, block.mlp.c_proj
    w_attn, b_attn, w_mlp, b_mlp = (t.detach().clone() for t in (attn.weight, attn.bias, mlp.weight, mlp.bias))
    model.merge_adapter()
    l_attn, l_mlp = attn.ia3_l["default"].detach(), mlp.ia3_l["default"].detach()
    torch.testing.assert_close(attn.base_layer.weight, w_attn * l_attn.view(1, -1))  # Conv1D: (in, out)
    torch.testing.assert_close(attn.base_layer.bias, b_attn * l_attn.view(-1))
    torch.testing.assert_close(mlp.base_layer.weight, w_mlp * l_mlp.view(-1, 1))
    torch.testing.assert_close(mlp.base_layer.bias, b_mlp)


def test_unmerge_refuses_zero_scales(llama):
    model = get_peft_model(llama, IA3Config(init_ia3_weights=False))
    with torch.no_grad():
        layers(model)[0].ia3_l["default"][0] = 0.0
    model.merge_adapter()
    with pytest.raises(ValueError, match="its vector has zeros"):
        model.unmerge_adapter()


def test_feedforward_modules_must_be_targets():
    with pytest.raises(ValueError, match=r"feedforward_modules \['down_proj'\] are not in target_modules \['k_proj'\]"):
        IA3Config(target_modules=["k_proj"], feedforward_modules=["down_proj"])
