"""Expert banks: a soft-prompt adapter holding a table of experts, one row each."""

import json

import pytest
import torch

import peftkit
from peftkit.experts.bank import ExpertBank, ExpertIndex, expert_row
from tests.conftest import tiny_model

IDS = [f"p{i:03d}" for i in range(5)]


def bank_model(config, arch="llama", **context):
    return peftkit.get_peft_model(tiny_model(arch), config, "persona", **context)


@pytest.fixture(params=["prompt_tuning", "prefix_tuning"])
def bank_config(request):
    if request.param == "prompt_tuning":
        return peftkit.PromptTuningConfig(num_virtual_tokens=3, expert_ids=IDS)
    return peftkit.PrefixTuningConfig(num_virtual_tokens=3, expert_ids=IDS)


def test_the_bank_is_one_parameter_table(bank_config):
    model = bank_model(bank_config)
    bank = model.adapters["persona"]
    assert isinstance(bank, ExpertBank)
    width = 32 if bank_config.peft_type == "PROMPT_TUNING" else 2 * 2 * 16  # layers * (K, V) * kv_dim
    assert [name for name, _ in bank.named_parameters()] == ["embedding.weight"]
    assert bank.embedding.weight.shape == (5 * 3, width)
    assert bank.table.shape == (5, 3, width)
    assert bank.table.data_ptr() == bank.embedding.weight.data_ptr()  # a view, not a copy
    assert bank.num_parameters() == 5 * 3 * width
    assert bank.experts.ids == IDS and expert_row(bank, "p003") == 3


def test_ids_are_validated():
    with pytest.raises(ValueError, match="repeated"):
        peftkit.PromptTuningConfig(expert_ids=["a", "a"])
    with pytest.raises(ValueError, match="at least one id"):
        peftkit.PromptTuningConfig(expert_ids=[])
    with pytest.raises(ValueError, match="prefix_projection"):
        peftkit.PrefixTuningConfig(num_virtual_tokens=2, prefix_projection=True, expert_ids=["a", "b"])
    with pytest.raises(ValueError, match="not supported by p-tuning"):
        peftkit.PromptEncoderConfig(num_virtual_tokens=2, expert_ids=["a"])
    projected = bank_model(peftkit.PrefixTuningConfig(num_virtual_tokens=2, prefix_projection=True))
    with pytest.raises(ValueError, match="cannot hold a bank"):
        projected.adapters["persona"].add_experts(["b"])
    index = ExpertIndex(["a"])
    with pytest.raises(KeyError, match="no expert 'b'"):
        index.row("b")


def test_a_single_prompt_config_stays_pefts_json():
    data = peftkit.PromptTuningConfig(num_virtual_tokens=3).to_dict()
    assert "expert_ids" not in data
    bank = peftkit.PromptTuningConfig(num_virtual_tokens=3, expert_ids=IDS)
    assert bank.to_dict()["expert_ids"] == IDS
    assert peftkit.PeftConfig.from_dict(json.loads(bank.to_json_string())).expert_ids == IDS


def test_seeded_or_text_init_starts_every_expert_where_it_starts_alone(char_tokenizer):
    for extra in ({"init_seed": 7}, {"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": "hello"}):
        if "prompt_tuning_init" in extra:
            extra = {**extra, "tokenizer_name_or_path": "unused"}
        alone = bank_model(peftkit.PromptTuningConfig(num_virtual_tokens=3, **extra), tokenizer=char_tokenizer)
        config = peftkit.PromptTuningConfig(num_virtual_tokens=3, expert_ids=IDS, **extra)
        bank = bank_model(config, tokenizer=char_tokenizer)
        for row in range(5):
            torch.testing.assert_close(bank.adapters["persona"].table[row], alone.adapters["persona"].table[0])


def test_unseeded_random_init_draws_distinct_experts():
    bank = bank_model(peftkit.PromptTuningConfig(num_virtual_tokens=3, expert_ids=IDS)).adapters["persona"]
    assert not torch.allclose(bank.table[0], bank.table[1])


def test_adding_experts_keeps_existing_rows(bank_config):
    model = bank_model(bank_config)
    bank = model.adapters["persona"]
    before = bank.table.detach().clone()
    new = torch.randn(2, *before.shape[1:])
    rows = bank.add_experts(["x", "y"], new)
    assert list(rows) == [5, 6] and bank.num_experts == 7
    torch.testing.assert_close(bank.table[:5], before)
    torch.testing.assert_close(bank.table[5:], new)
    assert model.peft_config["persona"].expert_ids == [*IDS, "x", "y"]  # the saved config follows
    bank.add_experts(["z"])  # default init
    assert torch.isfinite(bank.table[7]).all() and bank.table.requires_grad
    with pytest.raises(ValueError, match="already in the bank"):
        bank.add_experts(["x"])
    with pytest.raises(ValueError, match="expected"):
        bank.add_experts(["w"], torch.zeros(1, 1, 1))


def test_a_single_prompt_grows_into_a_bank():
    model = bank_model(peftkit.PromptTuningConfig(num_virtual_tokens=3))
    adapter = model.adapters["persona"]
    first = adapter.table[0].detach().clone()
    adapter.add_experts(["b"])
    assert adapter.experts.ids == ["0", "b"] and model.peft_config["persona"].expert_ids == ["0", "b"]
    torch.testing.assert_close(adapter.table[0], first)


def test_bank_files_round_trip(tmp_path, bank_config):
    model = bank_model(bank_config)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "persona" / "adapter_config.json").read_text())
    assert saved["expert_ids"] == IDS
    loaded = peftkit.PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "persona", "persona")
    torch.testing.assert_close(loaded.adapters["persona"].table, model.adapters["persona"].table)
    assert loaded.adapters["persona"].experts.ids == IDS


def test_expert_state_dict_is_pefts_single_layout(bank_config):
    bank = bank_model(bank_config).adapters["persona"]
    state = bank.expert_state_dict("p002")
    torch.testing.assert_close(state["prompt_embeddings"], bank.table[2])
    bank.load_expert_state_dict("p004", state)
    torch.testing.assert_close(bank.table[4], bank.table[2])


def test_ten_thousand_experts_cost_the_table_and_nothing_per_expert():
    ids = [f"u{i:05d}" for i in range(10_000)]
    model = bank_model(peftkit.PromptTuningConfig(num_virtual_tokens=4, expert_ids=ids))
    bank = model.adapters["persona"]
    tensors = list(bank.parameters()) + list(bank.buffers())
    assert len(tensors) == 1 and len(list(bank.modules())) == 2  # the adapter and its one table
    assert sum(t.numel() for t in tensors) == 10_000 * 4 * 32
    # one forward over rows that use experts spread across the bank
    rows = [{"persona": ids[i]} for i in (0, 4_999, 9_999)]
    input_ids = torch.randint(3, 100, (3, 5))
    logits = model(input_ids=input_ids, experts=rows).logits
    assert logits.shape == (3, 5, 128)
    alone = model(input_ids=input_ids[2:], experts=rows[2:]).logits
    torch.testing.assert_close(logits[2:], alone, atol=1e-5, rtol=1e-5)
