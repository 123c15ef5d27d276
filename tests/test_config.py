"""PeftConfig: PEFT's JSON layout, dispatch on peft_type, and nothing silently ignored."""

import json

import pytest
from pydantic import ValidationError

from peftkit import PeftConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig
from peftkit.methods.registry import config_class_for, known_methods


def test_from_dict_dispatches_on_peft_type():
    config = PeftConfig.from_dict({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 3})
    assert isinstance(config, PrefixTuningConfig)
    assert config.num_virtual_tokens == 3


def test_minimal_peft_config_loads():
    config = PeftConfig.from_dict({"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 8})
    assert isinstance(config, PromptTuningConfig)


def test_unknown_peft_type_lists_known_methods():
    with pytest.raises(ValueError, match="known methods: .*PROMPT_TUNING"):
        PeftConfig.from_dict({"peft_type": "NOPE"})
    assert {"PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING"} <= set(known_methods())


def test_unknown_keys_in_a_file_warn_with_their_names():
    with pytest.warns(UserWarning, match=r"\['mystery_field'\]"):
        config = PeftConfig.from_dict({"peft_type": "PROMPT_TUNING", "mystery_field": 1})
    assert config.num_virtual_tokens == 20


def test_unknown_constructor_keyword_is_an_error():
    with pytest.raises(ValidationError, match="mystery_field"):
        PromptTuningConfig(mystery_field=1)


def test_other_task_types_are_rejected_clearly():
    with pytest.raises(ValidationError, match="task_type='SEQ_CLS' is not supported"):
        PromptTuningConfig(task_type="SEQ_CLS")
    assert PromptTuningConfig(task_type=None).task_type is None


def test_json_schema_exports():
    schema = PromptTuningConfig.model_json_schema()
    assert "num_virtual_tokens" in schema["properties"]


def test_save_and_read_back(tmp_path):
    config = PromptEncoderConfig(num_virtual_tokens=7, encoder_hidden_size=12)
    path = config.save_pretrained(tmp_path)
    data = json.loads(path.read_text())
    assert data["peft_type"] == "P_TUNING"
    assert data["encoder_reparameterization_type"] == "MLP"
    assert PeftConfig.from_pretrained(tmp_path) == config


def test_missing_config_file_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        PeftConfig.from_pretrained(tmp_path)


def test_config_class_lookup_is_case_insensitive():
    assert config_class_for("prompt_tuning") is PromptTuningConfig


def test_class_mismatch_is_an_error():
    with pytest.raises(ValueError, match="does not belong to PromptTuningConfig"):
        PromptTuningConfig.from_dict({"peft_type": "PREFIX_TUNING"})
