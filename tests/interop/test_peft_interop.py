"""Files move between peftkit and Hugging Face PEFT (the oracle) with equal outputs, both ways.

For soft prompts PEFT returns logits for the virtual positions too; peftkit returns only the
user's positions, so PEFT's logits are sliced before comparing. Inputs are unpadded or
right-padded, where both libraries give real tokens the same positions.
"""

import warnings

import peft
import pytest
import torch

import peftkit
from tests.conftest import tiny_model

METHODS = {
    "prompt_tuning": (
        lambda: peftkit.PromptTuningConfig(num_virtual_tokens=4),
        lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    ),
    "prefix_tuning": (
        lambda: peftkit.PrefixTuningConfig(num_virtual_tokens=4),
        lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    ),
    "prefix_projection": (
        lambda: peftkit.PrefixTuningConfig(num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=16),
        lambda: peft.PrefixTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=16
        ),
    ),
    "p_tuning_mlp": (
        lambda: peftkit.PromptEncoderConfig(num_virtual_tokens=4, encoder_hidden_size=16),
        lambda: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=16),
    ),
    "p_tuning_lstm": (
        lambda: peftkit.PromptEncoderConfig(
            num_virtual_tokens=4, encoder_hidden_size=16, encoder_reparameterization_type="LSTM"
        ),
        lambda: peft.PromptEncoderConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=16, encoder_reparameterization_type="LSTM"
        ),
    ),
}
INPUTS = {
    "input_ids": torch.tensor([[5, 9, 33, 17, 64, 3], [7, 8, 9, 10, 0, 0]]),
    "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]),
}
LABELS = torch.tensor([[-100, -100, 33, 17, 64, 3], [-100, 8, 9, 10, -100, -100]])


@pytest.fixture(params=list(METHODS))
def method(request):
    return request.param


def peft_logits(peft_model, config):
    logits = peft_model(**INPUTS).logits
    virtual = 0 if config.peft_type == "PREFIX_TUNING" else config.num_virtual_tokens
    return logits[:, virtual:]


def assert_same_outputs(ours, theirs, theirs_config):
    real = INPUTS["attention_mask"].bool()
    ours_logits = ours(**INPUTS).logits
    theirs_logits = peft_logits(theirs, theirs_config)
    torch.testing.assert_close(ours_logits[real], theirs_logits[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        ours(**INPUTS, labels=LABELS).loss, theirs(**INPUTS, labels=LABELS).loss, atol=1e-5, rtol=1e-5
    )


def test_peftkit_files_load_in_peft(tmp_path, arch, method):
    torch.manual_seed(0)
    ours = peftkit.get_peft_model(tiny_model(arch), METHODS[method][0]())
    ours.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(tiny_model(arch), tmp_path)
    assert_same_outputs(ours, theirs, theirs.peft_config["default"])


def test_peft_files_load_in_peftkit(tmp_path, arch, method):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(tiny_model(arch), METHODS[method][1]())
        theirs.save_pretrained(tmp_path)
    ours = peftkit.PeftModel.from_pretrained(tiny_model(arch), tmp_path)
    assert_same_outputs(ours, theirs, theirs.peft_config["default"])


def test_peft_written_configs_read_without_warnings(tmp_path, method):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(tiny_model("llama"), METHODS[method][1]())
        theirs.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every PEFT field is known to peftkit
        config = peftkit.PeftConfig.from_pretrained(tmp_path)
    assert config.num_virtual_tokens == 4


def test_peftkit_configs_read_in_peft_without_unknown_keys(tmp_path, method):
    peftkit.get_peft_model(tiny_model("llama"), METHODS[method][0]()).save_pretrained(tmp_path)
    data = peftkit.PeftConfig.from_pretrained(tmp_path).to_dict()
    peft_fields = set(peft.PeftConfig.from_pretrained(tmp_path).to_dict())
    assert set(data) <= peft_fields, set(data) - peft_fields
