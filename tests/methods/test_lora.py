"""LoRA / rsLoRA / DoRA: the maths against hand-written formulas, init options, dropout, bias modes."""

from __future__ import annotations

import math
import warnings

import peft
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from peftkit import LoraConfig, PeftModel, get_peft_model
from tests.conftest import tiny_model

X = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(0))
IDS = torch.tensor([[5, 6, 7, 8, 9], [9, 8, 7, 6, 5]])


def q_proj(model):
    return model.base_model.model.model.layers[0].self_attn.q_proj


def test_forward_is_w_x_plus_scaled_b_a_x(llama):
    model = get_peft_model(llama, LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj"], init_lora_weights=False))
    layer = q_proj(model)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = F.linear(X, layer.base_layer.weight) + (12 / 4) * X @ a.T @ b.T
    with torch.no_grad():
        torch.testing.assert_close(layer(X), expected, atol=1e-5, rtol=1e-5)


def test_rslora_scales_by_alpha_over_sqrt_r(llama):
    model = get_peft_model(
        llama, LoraConfig(r=16, lora_alpha=8, use_rslora=True, target_modules=["q_proj"], init_lora_weights=False)
    )
    layer = q_proj(model)
    delta = layer(X) - layer.base_layer(X)
    expected = (8 / math.sqrt(16)) * X @ layer.lora_A["default"].weight.T @ layer.lora_B["default"].weight.T
    torch.testing.assert_close(delta, expected, atol=1e-5, rtol=1e-4)


def test_default_init_starts_at_the_base_model(llama):
    model = get_peft_model(llama, LoraConfig(r=4, target_modules=["q_proj"]))
    layer = q_proj(model)
    a = layer.lora_A["default"].weight
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
    assert a.abs().max() <= 1 / math.sqrt(32) and a.std() > 0  # Kaiming-uniform(a=√5): bound 1/√fan_in
    torch.testing.assert_close(model(input_ids=IDS).logits, tiny_model("llama")(input_ids=IDS).logits)


def test_gaussian_init(llama):
    torch.manual_seed(0)
    model = get_peft_model(llama, LoraConfig(r=8, target_modules="all-linear", init_lora_weights="gaussian"))
    weights = torch.cat([p.flatten() for n, p in model.named_parameters() if "lora_A" in n])
    assert abs(weights.std().item() - 1 / 8) < 0.01
    assert all(torch.count_nonzero(p) == 0 for n, p in model.named_parameters() if "lora_B" in n)


def test_dropout_acts_on_the_adapter_input_in_training_only(llama):
    torch.manual_seed(0)
    model = get_peft_model(llama, LoraConfig(r=4, lora_dropout=0.5, target_modules=["q_proj"], init_lora_weights=False))
    layer = q_proj(model)
    model.train()
    assert not torch.allclose(layer(X), layer(X))
    model.eval()
    torch.testing.assert_close(layer(X), layer(X))
    with torch.no_grad():
        layer.lora_B["default"].weight.zero_()
    model.train()
    torch.testing.assert_close(layer(X), layer.base_layer(X))  # the base path never sees dropout


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_bias_modes_train_and_save_base_biases_like_peft(tmp_path, bias):
    """GPT-2 has biases everywhere: ``all`` trains each of them, ``lora_only`` only the adapted layers'."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_model("gpt2"), LoraConfig(r=2, target_modules=["c_attn"], bias=bias))
    trainable_biases = [n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")]
    # all: per block ln_1, c_attn, attn.c_proj, ln_2, c_fc, mlp.c_proj (6 × 2) + ln_f = 13
    assert len(trainable_biases) == (13 if bias == "all" else 2)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and n.endswith("bias"):
                p.add_(0.1)
    model.save_pretrained(tmp_path)
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert "base_model.model.transformer.h.0.attn.c_attn.base_layer.bias" in keys
    assert ("base_model.model.transformer.ln_f.bias" in keys) == (bias == "all")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(tiny_model("gpt2"), tmp_path)
    torch.testing.assert_close(model(input_ids=IDS).logits, theirs(input_ids=IDS).logits, atol=1e-5, rtol=1e-5)
    loaded = PeftModel.from_pretrained(tiny_model("gpt2"), tmp_path)
    torch.testing.assert_close(loaded(input_ids=IDS).logits, model(input_ids=IDS).logits)


def test_lora_bias_is_trained_and_merged():
    model = get_peft_model(tiny_model("gpt2"), LoraConfig(r=2, target_modules=["c_attn"], lora_bias=True))
    assert model.adapters["default"].num_parameters() == 2 * (2 * (32 + 96) + 96)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    before = model(input_ids=IDS).logits
    model.merge_adapter()
    torch.testing.assert_close(model(input_ids=IDS).logits, before, atol=1e-4, rtol=1e-4)


def test_rank_and_alpha_patterns_match_peft(tmp_path, llama):
    config = {
        "r": 4,
        "target_modules": ["q_proj", "v_proj"],
        "rank_pattern": {"v_proj": 2},
        "alpha_pattern": {r"layers\.1\.self_attn\.q_proj": 3},
    }
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(init_lora_weights=False, **config))
        theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(llama, tmp_path)
    assert ours.base_model.model.model.layers[1].self_attn.v_proj.lora_A["default"].weight.shape == (2, 32)
    assert ours.adapters["default"].scaling["model.layers.1.self_attn.q_proj"] == 3 / 4
    torch.testing.assert_close(ours(input_ids=IDS).logits, theirs(input_ids=IDS).logits, atol=1e-5, rtol=1e-5)


def test_dora_magnitude_and_forward_follow_the_paper(llama):
    """m starts as the row norms of W + sBA; y = m / ‖W + sBA‖_row ⊙ (W + sBA) x."""
    torch.manual_seed(0)
    model = get_peft_model(llama, LoraConfig(r=4, use_dora=True, target_modules=["q_proj"], init_lora_weights=False))
    layer = q_proj(model)
    w = layer.base_layer.weight
    merged = w + 2 * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    magnitude = layer.lora_magnitude_vector["default"]
    torch.testing.assert_close(magnitude, merged.norm(dim=1), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        magnitude.mul_(1.5)
        expected = F.linear(X, (magnitude / merged.norm(dim=1)).unsqueeze(1) * merged)
        torch.testing.assert_close(layer(X), expected, atol=1e-5, rtol=1e-5)


def test_rank_larger_than_the_layer(llama, tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(llama, LoraConfig(r=64, target_modules=["v_proj"], init_lora_weights=False))
    assert model.adapters["default"].num_parameters() == 2 * 64 * (32 + 16)
    before = model(input_ids=IDS).logits
    model.merge_adapter()
    torch.testing.assert_close(model(input_ids=IDS).logits, before, atol=1e-4, rtol=1e-4)
    model.unmerge_adapter()
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    torch.testing.assert_close(theirs(input_ids=IDS).logits, before, atol=1e-5, rtol=1e-5)


def test_gpt2_conv1d_layout_is_resolved():
    model = get_peft_model(tiny_model("gpt2"), LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False))
    assert model.peft_config["default"].fan_in_fan_out is True
    layer = model.base_model.transformer.h[0].attn.c_attn
    assert layer.lora_A["default"].weight.shape == (2, 32) and layer.lora_B["default"].weight.shape == (96, 2)
    x = torch.randn(1, 3, 32)
    update = x @ layer.lora_A["default"].weight.T @ layer.lora_B["default"].weight.T
    expected = x @ layer.base_layer.weight + layer.base_layer.bias + (8 / 2) * update  # Conv1D stores (in, out)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
