"""VeRA: one pair of frozen projections shared by all layers, drawn from the saved seed."""

from __future__ import annotations

import warnings

import peft
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from peftkit import PeftModel, VeraConfig, get_peft_model
from tests.conftest import tiny_model

IDS = torch.tensor([[5, 6, 7, 8]])


def test_projections_are_shared_frozen_and_sized_for_the_largest_layer(llama):
    model = get_peft_model(llama, VeraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    layers = [m for n, m in model.base_model.named_modules() if n.endswith(("q_proj", "v_proj"))]
    shared = {id(layer.vera_projection["default"]) for layer in layers}
    assert len(shared) == 1
    projection = layers[0].vera_projection["default"]
    assert projection.vera_A.shape == (8, 32) and projection.vera_B.shape == (32, 8)  # max out: q_proj 32
    assert not projection.vera_A.requires_grad
    assert all("vera_A" not in n for n, _ in model.named_parameters())


def test_projections_follow_the_prng_key_like_peft(llama):
    """PEFT draws Kaiming-uniform from a CPU generator seeded with projection_prng_key."""
    model = get_peft_model(llama, VeraConfig(r=8, projection_prng_key=7, target_modules=["q_proj"]))
    generator = torch.Generator().manual_seed(7)
    a = torch.empty(8, 32)
    b = torch.empty(32, 8)
    from peft.tuners.vera.model import _kaiming_init

    torch.testing.assert_close(model.adapters["default"].projections.vera_A, _kaiming_init(a, generator=generator))
    torch.testing.assert_close(model.adapters["default"].projections.vera_B, _kaiming_init(b, generator=generator))


def test_forward_scales_the_shared_projections(llama):
    """y = W x + λ_b ⊙ B (λ_d ⊙ A x)."""
    torch.manual_seed(0)
    model = get_peft_model(llama, VeraConfig(r=8, target_modules=["v_proj"], init_weights=False))
    layer = model.base_model.model.model.layers[0].self_attn.v_proj
    projection = layer.vera_projection["default"]
    a, b = projection.vera_A[:, :32], projection.vera_B[:16]
    x = torch.randn(2, 3, 32)
    d, lb = layer.vera_lambda_d["default"], layer.vera_lambda_b["default"]
    expected = F.linear(x, layer.base_layer.weight) + lb * ((d * (x @ a.T)) @ b.T)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_default_init(llama):
    model = get_peft_model(llama, VeraConfig(r=8, d_initial=0.3, target_modules=["q_proj"]))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert torch.all(layer.vera_lambda_b["default"] == 0) and torch.all(layer.vera_lambda_d["default"] == 0.3)


def test_without_saved_projections_they_are_regenerated_from_the_key(tmp_path):
    torch.manual_seed(0)
    config = VeraConfig(
        r=8, target_modules=["q_proj"], save_projection=False, projection_prng_key=3, init_weights=False
    )
    model = get_peft_model(tiny_model("llama"), config)
    model.save_pretrained(tmp_path)
    assert not any("vera_A" in k for k in load_file(tmp_path / "adapter_model.safetensors"))
    loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    torch.testing.assert_close(loaded(input_ids=IDS).logits, model(input_ids=IDS).logits, atol=0, rtol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    torch.testing.assert_close(theirs(input_ids=IDS).logits, model(input_ids=IDS).logits, atol=1e-5, rtol=1e-5)


def test_saved_projections_are_read_back(tmp_path):
    model = get_peft_model(tiny_model("llama"), VeraConfig(r=4, target_modules=["q_proj"], init_weights=False))
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert tensors["base_model.vera_A"].shape == (4, 32)
    tensors["base_model.vera_A"] = tensors["base_model.vera_A"] * 2  # a file's projection wins over the seed
    loaded = get_peft_model(tiny_model("llama"), VeraConfig(r=4, target_modules=["q_proj"]))
    loaded.adapters["default"].load_adapter_state_dict(tensors, trainable=True)
    torch.testing.assert_close(loaded.adapters["default"].projections.vera_A, tensors["base_model.vera_A"])


def test_rank_larger_than_the_layers(llama):
    model = get_peft_model(llama, VeraConfig(r=64, target_modules=["v_proj"], init_weights=False))
    assert model.adapters["default"].num_parameters() == 2 * (16 + 64)
    before = model(input_ids=IDS).logits
    model.merge_adapter()
    torch.testing.assert_close(model(input_ids=IDS).logits, before, atol=1e-4, rtol=1e-4)
