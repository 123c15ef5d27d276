"""Prefix tuning: grouped-query geometry, parameter counts, gradient checkpointing, resume."""

import pytest
import torch

from peftkit import PeftModel, PrefixTuning, PrefixTuningConfig, get_peft_model
from peftkit.methods.soft_prompt import model_geometry
from tests.conftest import tiny_model


def test_defaults():
    config = PrefixTuningConfig()
    assert config.num_virtual_tokens == 20
    assert config.prefix_projection is False
    assert config.is_prompt_learning


@pytest.mark.parametrize(
    ("arch", "token_dim", "heads"),
    [("llama", 16, 2), ("qwen2", 8, 1), ("gemma3", 16, 1), ("gpt2", 32, 4)],
)
def test_geometry_follows_key_value_heads(arch, token_dim, heads):
    config = PrefixTuningConfig(num_virtual_tokens=3).resolved_for(tiny_model(arch).config)
    assert (config.token_dim, config.num_attention_heads, config.num_layers) == (token_dim, heads, 2)
    assert config.encoder_hidden_size == token_dim


def test_key_values_match_the_attention_cache_layout(model):
    adapter = PrefixTuning.create(model, PrefixTuningConfig(num_virtual_tokens=3))
    geometry = model_geometry(model.config)
    layers = adapter(batch_size=2)
    assert len(layers) == geometry.num_layers
    for keys, values in layers:
        assert keys.shape == values.shape == (2, geometry.num_kv_heads, 3, geometry.head_dim)
    # PEFT layout: layer l's keys are slot 2l, values slot 2l+1 of the flat prefix
    flat = adapter.flat_prefix().view(3, 2 * geometry.num_layers, geometry.num_kv_heads, geometry.head_dim)
    torch.testing.assert_close(layers[1][0][0], flat[:, 2].permute(1, 0, 2))
    torch.testing.assert_close(layers[1][1][0], flat[:, 3].permute(1, 0, 2))


def test_parameter_count_without_projection(model):
    config = PrefixTuningConfig(num_virtual_tokens=4).resolved_for(model.config)
    adapter = PrefixTuning.create(model, config)
    assert adapter.num_parameters() == 4 * config.num_layers * 2 * config.token_dim


def test_parameter_count_with_projection(model):
    config = PrefixTuningConfig(num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=24)
    config = config.resolved_for(model.config)
    adapter = PrefixTuning.create(model, config)
    td, h, out = config.token_dim, 24, config.num_layers * 2 * config.token_dim
    assert adapter.num_parameters() == 4 * td + (td * h + h) + (h * out + out)


def test_zero_init():
    model = tiny_model("llama")
    adapter = PrefixTuning.create(model, PrefixTuningConfig(num_virtual_tokens=2, init_weights="zero"))
    assert adapter.flat_prefix().abs().sum() == 0


def test_zero_prefix_still_changes_attention(batch):
    """A zero key gives every prefix slot the same score: the values (zero) dilute attention."""
    model = tiny_model("llama")
    peft_model = get_peft_model(model, PrefixTuningConfig(num_virtual_tokens=2, init_weights="zero"))
    with peft_model.disable_adapter():
        base = peft_model(**batch).logits
    assert not torch.allclose(peft_model(**batch).logits, base)


@pytest.mark.parametrize("projection", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(batch, projection):
    """PEFT refuses prefix tuning with gradient checkpointing; here it works and changes nothing."""
    grads = []
    for checkpointing in (False, True):
        model = tiny_model("llama")
        torch.manual_seed(0)
        peft_model = get_peft_model(model, PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=projection))
        peft_model.train()
        if checkpointing:
            peft_model.gradient_checkpointing_enable()
            assert model.model.gradient_checkpointing
        loss = peft_model(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)).loss
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)


def test_projection_resumes_from_saved_mlp(tmp_path, batch):
    torch.manual_seed(0)
    peft_model = get_peft_model(tiny_model("llama"), PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True))
    peft_model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path, is_trainable=True)
    adapter = loaded.adapters["default"]
    assert adapter.transform is not None  # the MLP came back, not just its output
    for (name, a), (_, b) in zip(
        peft_model.adapters["default"].named_parameters(), adapter.named_parameters(), strict=True
    ):
        torch.testing.assert_close(a, b, msg=name)
    assert all(p.requires_grad for p in adapter.parameters())


def test_projection_output_only_file_trains_the_prefix_directly(tmp_path, batch):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    peft_model = get_peft_model(tiny_model("llama"), PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True))
    peft_model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    save_file({"prompt_embeddings": weights["prompt_embeddings"]}, tmp_path / "adapter_model.safetensors")
    with pytest.warns(UserWarning, match="without its MLP weights"):
        loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path, is_trainable=True)
    torch.testing.assert_close(loaded(**batch).logits, peft_model(**batch).logits)
    assert loaded.adapters["default"].num_parameters() == weights["prompt_embeddings"].numel()
