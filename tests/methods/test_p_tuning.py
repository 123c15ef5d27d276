"""P-tuning: MLP and LSTM encoders, validation, parameter counts, resumable files."""

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from peftkit import PeftConfig, PeftModel, PromptEncoder, PromptEncoderConfig, get_peft_model
from tests.conftest import tiny_model


def test_defaults():
    config = PromptEncoderConfig()
    assert config.encoder_reparameterization_type == "MLP"
    assert config.encoder_num_layers == 2
    assert config.encoder_dropout == 0.0


def test_lowercase_type_accepted():
    assert PromptEncoderConfig(encoder_reparameterization_type="lstm").encoder_reparameterization_type == "LSTM"


def test_fields_the_mlp_would_ignore_are_errors():
    with pytest.raises(ValidationError, match="encoder_num_layers=3 has no effect on the MLP encoder"):
        PromptEncoderConfig(encoder_num_layers=3)
    with pytest.raises(ValidationError, match="encoder_dropout=0.1 has no effect on the MLP encoder"):
        PromptEncoderConfig(encoder_dropout=0.1)
    PromptEncoderConfig(encoder_reparameterization_type="LSTM", encoder_num_layers=3, encoder_dropout=0.1)


def test_json_round_trip():
    config = PromptEncoderConfig(encoder_reparameterization_type="LSTM", encoder_hidden_size=9, num_virtual_tokens=4)
    assert PeftConfig.from_dict(config.to_dict()) == config


def test_mlp_parameter_count(model):
    dim = model.get_input_embeddings().weight.shape[1]
    h = 24
    adapter = PromptEncoder.create(model, PromptEncoderConfig(num_virtual_tokens=5, encoder_hidden_size=h))
    assert adapter.num_parameters() == 5 * dim + (dim * h + h) + (h * h + h) + (h * dim + dim)


@pytest.mark.parametrize("layers", [1, 2])
def test_lstm_parameter_count(layers):
    model = tiny_model("llama")
    dim, h = 32, 12
    config = PromptEncoderConfig(
        num_virtual_tokens=5, encoder_hidden_size=h, encoder_reparameterization_type="LSTM", encoder_num_layers=layers
    )
    adapter = PromptEncoder.create(model, config)
    lstm = 0
    for layer in range(layers):
        inputs = dim if layer == 0 else 2 * h
        lstm += 2 * (4 * h * inputs + 4 * h * h + 2 * 4 * h)  # two directions, two bias vectors each
    mlp = (2 * h * 2 * h + 2 * h) + (2 * h * dim + dim)
    assert adapter.num_parameters() == 5 * dim + lstm + mlp


@pytest.mark.parametrize("kind", ["MLP", "LSTM"])
def test_prompt_shape(kind):
    adapter = PromptEncoder.create(
        tiny_model("llama"), PromptEncoderConfig(num_virtual_tokens=6, encoder_reparameterization_type=kind)
    )
    assert adapter(3).shape == (3, 6, 32)


@pytest.mark.parametrize("kind", ["MLP", "LSTM"])
def test_saved_encoder_resumes_exactly(tmp_path, kind):
    torch.manual_seed(0)
    config = PromptEncoderConfig(num_virtual_tokens=4, encoder_reparameterization_type=kind)
    peft_model = get_peft_model(tiny_model("llama"), config)
    peft_model.save_pretrained(tmp_path)
    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert "prompt_embeddings" in keys and "peftkit_encoder.mlp_head.0.weight" in keys
    loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path, is_trainable=True)
    original, restored = peft_model.adapters["default"], loaded.adapters["default"]
    assert restored.has_encoder
    for (name, a), (_, b) in zip(original.named_parameters(), restored.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_output_only_file_loads_as_a_fixed_prompt(tmp_path, batch):
    torch.manual_seed(0)
    peft_model = get_peft_model(tiny_model("llama"), PromptEncoderConfig(num_virtual_tokens=4))
    peft_model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    save_file({"prompt_embeddings": weights["prompt_embeddings"]}, tmp_path / "adapter_model.safetensors")
    loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    assert not loaded.adapters["default"].has_encoder
    torch.testing.assert_close(loaded(**batch).logits, peft_model(**batch).logits)
    with pytest.warns(UserWarning, match="without its encoder weights"):
        PeftModel.from_pretrained(tiny_model("llama"), tmp_path, is_trainable=True)
