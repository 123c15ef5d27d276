"""Bank folders, and interop with Hugging Face PEFT (the oracle): export one expert, build from many."""

import time
import warnings

import peft
import pytest
import torch

import peftkit
from peftkit.experts.bank_files import bank_from_folders, export_expert
from tests.conftest import tiny_model

IDS = [f"p{i:03d}" for i in range(4)]
INPUTS = {
    "input_ids": torch.tensor([[5, 9, 33, 17, 64, 3], [7, 8, 9, 10, 0, 0]]),
    "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]),
}
REAL = INPUTS["attention_mask"].bool()


def configs(kind):
    if kind == "prompt_tuning":
        return peftkit.PromptTuningConfig(num_virtual_tokens=3, expert_ids=IDS), peft.PromptTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=3
        )
    projection = {"prefix_projection": True, "encoder_hidden_size": 16} if kind == "prefix_projection" else {}
    return peftkit.PrefixTuningConfig(num_virtual_tokens=3, expert_ids=IDS), peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=3, **projection
    )


def peft_logits(peft_model, kind):
    logits = peft_model(**INPUTS).logits
    return logits[:, 3:] if kind == "prompt_tuning" else logits


def load_in_peft(arch, folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(tiny_model(arch), folder)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("kind", ["prompt_tuning", "prefix_tuning"])
def test_an_exported_expert_loads_in_peft_with_equal_logits(tmp_path, arch, kind):
    torch.manual_seed(0)
    ours = peftkit.get_peft_model(tiny_model(arch), configs(kind)[0], "persona")
    folder = export_expert(ours, "persona", "p002", tmp_path / "p002")
    assert "expert_ids" not in (folder / "adapter_config.json").read_text()
    theirs = load_in_peft(arch, folder)
    expected = ours(**INPUTS, experts=[{"persona": "p002"}] * 2).logits
    torch.testing.assert_close(expected[REAL], peft_logits(theirs, kind)[REAL], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["prompt_tuning", "prefix_tuning", "prefix_projection"])
def test_a_bank_built_from_peft_folders_equals_each_peft_adapter(tmp_path, kind):
    folders, theirs = {}, {}
    for seed, expert in enumerate(IDS):
        torch.manual_seed(seed)
        model = peft.get_peft_model(tiny_model("qwen2"), configs(kind)[1])
        with torch.no_grad():  # PEFT starts prefixes at N(0, 1) already; move prompts off their init
            for p in model.prompt_encoder.parameters():
                p.add_(torch.randn_like(p))
        model.save_pretrained(tmp_path / expert)
        folders[expert], theirs[expert] = tmp_path / expert, model
    ours = peftkit.PeftModel(tiny_model("qwen2"), None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's configs carry keys peftkit does not use
        bank = bank_from_folders(ours, "persona", folders)
    assert bank.experts.ids == IDS and bank.is_frozen
    routes = [{"persona": "p003"}, {"persona": "p001"}]
    logits = ours(**INPUTS, experts=routes).logits
    for row, route in enumerate(routes):
        expected = peft_logits(theirs[route["persona"]], kind)[row]
        torch.testing.assert_close(logits[row][REAL[row]], expected[REAL[row]], atol=1e-5, rtol=1e-5)


def test_building_refuses_mismatched_folders(tmp_path):
    bank_config = peftkit.PromptTuningConfig(num_virtual_tokens=3, expert_ids=IDS)
    model = peftkit.get_peft_model(tiny_model("llama"), bank_config)
    export_expert(model, "default", 0, tmp_path / "a")
    other = peftkit.get_peft_model(tiny_model("llama"), peftkit.PromptTuningConfig(num_virtual_tokens=5))
    other.save_pretrained(tmp_path / "b")
    with pytest.raises(ValueError, match="num_virtual_tokens=5 differs"):
        bank_from_folders(peftkit.PeftModel(tiny_model("llama"), None), "bank", [tmp_path / "a", tmp_path / "b"])
    model.save_pretrained(tmp_path / "bank")
    with pytest.raises(ValueError, match="is a bank itself"):
        bank_from_folders(peftkit.PeftModel(tiny_model("llama"), None), "bank", [tmp_path / "bank"])
    lora = peftkit.get_peft_model(tiny_model("llama"), peftkit.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(TypeError, match="not an expert bank"):
        export_expert(lora, "default", 0, tmp_path / "c")


def test_two_hundred_experts_load_fast(tmp_path):
    ids = [f"p{i:03d}" for i in range(200)]
    config = peftkit.PromptTuningConfig(num_virtual_tokens=8, expert_ids=ids)
    model = peftkit.get_peft_model(tiny_model("llama"), config, "persona")
    model.save_pretrained(tmp_path / "bank")
    for expert in ids:
        export_expert(model, "persona", expert, tmp_path / "single" / expert)
    start = time.perf_counter()
    loaded = peftkit.PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "bank" / "persona", "persona")
    from_bank = time.perf_counter() - start
    start = time.perf_counter()
    singles = [tmp_path / "single" / e for e in ids]
    built = bank_from_folders(peftkit.PeftModel(tiny_model("llama"), None), "persona", singles)
    from_folders = time.perf_counter() - start
    torch.testing.assert_close(loaded.adapters["persona"].table, model.adapters["persona"].table)
    torch.testing.assert_close(built.table, model.adapters["persona"].table)
    # the target is 2 s; the bound is generous for a shared 2-core machine (scripts/bench_experts.py measures)
    assert from_bank < 10 and from_folders < 10, (from_bank, from_folders)
