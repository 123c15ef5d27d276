"""Prompt tuning: the behaviours listed in seed 000, checked against formulas."""

import pytest
import torch
from pydantic import ValidationError

from peftkit import PeftConfig, PromptTuning, PromptTuningConfig, get_peft_model
from peftkit.methods.prompt_tuning.module import text_init_ids
from tests.conftest import VOCAB


class TestConfig:
    def test_defaults(self):
        config = PromptTuningConfig()
        assert config.peft_type == "PROMPT_TUNING"
        assert config.num_virtual_tokens == 20
        assert config.prompt_tuning_init == "RANDOM"
        assert config.is_prompt_learning

    def test_accepts_num_virtual_tokens(self):
        assert PromptTuningConfig(num_virtual_tokens=50).num_virtual_tokens == 50

    @pytest.mark.parametrize("value", ["text", "TEXT", "Text"])
    def test_init_in_any_case(self, value):
        config = PromptTuningConfig(prompt_tuning_init=value, prompt_tuning_init_text="x", tokenizer_name_or_path="t")
        assert config.prompt_tuning_init == "TEXT"

    def test_text_init_requires_init_text(self):
        with pytest.raises(ValidationError, match="prompt_tuning_init_text required"):
            PromptTuningConfig(prompt_tuning_init="text")

    def test_text_init_requires_tokenizer(self):
        with pytest.raises(ValidationError, match="tokenizer_name_or_path required"):
            PromptTuningConfig(prompt_tuning_init="text", prompt_tuning_init_text="Classify this text:")

    @pytest.mark.parametrize("n", [0, -3])
    def test_num_virtual_tokens_must_be_positive(self, n):
        with pytest.raises(ValidationError, match=f"num_virtual_tokens must be > 0, got {n}"):
            PromptTuningConfig(num_virtual_tokens=n)

    def test_unknown_init_is_rejected(self):
        with pytest.raises(ValidationError, match="prompt_tuning_init"):
            PromptTuningConfig(prompt_tuning_init="zeros")

    def test_json_round_trip(self):
        config = PromptTuningConfig(num_virtual_tokens=30, prompt_tuning_init="random", token_dim=768)
        decoded = PeftConfig.from_dict(config.to_dict())
        assert decoded == config
        assert decoded.token_dim == 768


class TestModule:
    def test_shape_and_identical_rows(self, llama):
        adapter = PromptTuning.create(llama, PromptTuningConfig(num_virtual_tokens=10))
        assert adapter.embedding.weight.shape == (10, 32)
        out = adapter(4)
        assert out.shape == (4, 10, 32)
        torch.testing.assert_close(out[0], out[3])

    def test_only_trainable_tensor_is_the_embedding(self, llama):
        adapter = PromptTuning.create(llama, PromptTuningConfig(num_virtual_tokens=10))
        assert [name for name, _ in adapter.named_parameters()] == ["embedding.weight"]
        assert adapter.num_parameters() == 10 * 32

    def test_parameter_count_formula(self, model):
        peft_model = get_peft_model(model, PromptTuningConfig(num_virtual_tokens=7))
        dim = model.get_input_embeddings().weight.shape[1]
        assert peft_model.get_nb_trainable_parameters()[0] == 7 * dim

    def test_random_init_matches_word_embedding_statistics(self, model):
        torch.manual_seed(0)
        adapter = PromptTuning.create(model, PromptTuningConfig(num_virtual_tokens=2000))
        reference = model.get_input_embeddings()(torch.arange(VOCAB)).float().detach()
        prompt = adapter.embedding.weight
        # per-dimension mean and spread follow the vocabulary (not N(0, 1))
        tolerance = 4 * float(reference.std(0).max()) / 2000**0.5  # 4 standard errors of a mean of 2000
        torch.testing.assert_close(prompt.mean(0), reference.mean(0), atol=tolerance, rtol=0)
        torch.testing.assert_close(prompt.std(0), reference.std(0), rtol=0.1, atol=0)

    def test_random_init_is_seedable(self, llama):
        a = PromptTuning.create(llama, PromptTuningConfig(num_virtual_tokens=4, init_seed=3))
        b = PromptTuning.create(llama, PromptTuningConfig(num_virtual_tokens=4, init_seed=3))
        torch.testing.assert_close(a.embedding.weight, b.embedding.weight)

    def test_sample_vocab_rows_are_word_embeddings(self, llama):
        adapter = PromptTuning.create(
            llama, PromptTuningConfig(num_virtual_tokens=5, prompt_tuning_init="sample_vocab")
        )
        table = llama.get_input_embeddings().weight
        for row in adapter.embedding.weight:
            assert torch.isclose(table, row).all(-1).any()

    @pytest.mark.parametrize(("n", "expected"), [(7, [1, 2, 3, 1, 2, 3, 1]), (2, [1, 2])])
    def test_text_init_tiles_or_truncates(self, n, expected):
        class Tokenizer:
            def __call__(self, text):
                return {"input_ids": [1, 2, 3]}

        config = PromptTuningConfig(
            num_virtual_tokens=n, prompt_tuning_init="text", prompt_tuning_init_text="abc", tokenizer_name_or_path="t"
        )
        assert text_init_ids(config, Tokenizer()) == expected

    def test_text_init_uses_the_init_text_embeddings(self, llama, char_tokenizer):
        config = PromptTuningConfig(
            num_virtual_tokens=4, prompt_tuning_init="TEXT", prompt_tuning_init_text="ab", tokenizer_name_or_path="t"
        )
        adapter = PromptTuning.create(llama, config, tokenizer=char_tokenizer)
        ids = char_tokenizer("abab")["input_ids"]
        torch.testing.assert_close(adapter.embedding.weight, llama.get_input_embeddings()(torch.tensor(ids)))

    def test_missing_weights_are_reported(self, llama):
        adapter = PromptTuning.create(llama, PromptTuningConfig(num_virtual_tokens=4))
        with pytest.raises(KeyError, match="prompt_embeddings"):
            adapter.load_adapter_state_dict({"other": torch.zeros(1)}, trainable=False)
        with pytest.raises(ValueError, match=r"shape \(3, 32\), expected \(4, 32\)"):
            adapter.load_adapter_state_dict({"prompt_embeddings": torch.zeros(3, 32)}, trainable=False)
