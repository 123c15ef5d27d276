"""End-to-end checks on the real embedded model, SmolLM2-135M-Instruct (converted once per run)."""

import json
import warnings

import peft
import pytest
import torch

from peftkit import LoraConfig, PeftModel, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from peftkit.models import loading
from peftkit.models.loading import load_base
from tests.models.test_generation import argmax_without_cache

pytestmark = pytest.mark.smollm2


@pytest.fixture(scope="module")
def smollm2():
    return load_base("smollm2-135m-instruct")


def test_second_load_uses_the_cache(monkeypatch, smollm2):
    monkeypatch.setattr(loading, "convert_gguf", lambda *a: pytest.fail("converted again"))
    model, _ = load_base("smollm2-135m-instruct")
    assert model.config.model_type == "llama" and model.config.num_key_value_heads == 3


def test_answers_a_factual_question(smollm2):
    model, tokenizer = smollm2
    peft_model = get_peft_model(model, PromptTuningConfig(num_virtual_tokens=4))
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with peft_model.disable_adapter():
        out = peft_model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, inputs["input_ids"].shape[1] :])


@pytest.mark.parametrize(
    "config",
    [
        PromptTuningConfig(
            num_virtual_tokens=8,
            prompt_tuning_init="TEXT",
            prompt_tuning_init_text="Answer briefly.",
            tokenizer_name_or_path="smollm2-135m-instruct",
        ),
        PrefixTuningConfig(num_virtual_tokens=4),
    ],
    ids=["prompt_tuning", "prefix_tuning"],
)
def test_generate_equals_argmax_without_cache(smollm2, config):
    model, tokenizer = smollm2
    torch.manual_seed(0)
    peft_model = get_peft_model(model, config)
    tokenizer.padding_side = "left"
    batch = tokenizer(["The movie was", "A short story about a cat who"], return_tensors="pt", padding=True)
    generated = peft_model.generate(**batch, max_new_tokens=5, do_sample=False, eos_token_id=[])
    expected = argmax_without_cache(peft_model, batch["input_ids"], batch["attention_mask"], 5)
    assert torch.equal(generated, expected)


def test_demo_end_to_end_and_peft_loads_its_adapter(smollm2, tmp_path):
    """A short demo run; its saved adapter gives PEFT the same logits on the real model."""
    from rich.console import Console

    from peftkit.cli.demo import DemoSettings, run_demo

    with open(tmp_path / "log", "w") as log:
        summary = run_demo(DemoSettings(steps=3, batch_size=4, test_size=8, output=tmp_path), Console(file=log))
    assert json.loads((tmp_path / "demo.json").read_text())["tuned_accuracy"] == summary["tuned_accuracy"]
    for name in ("report.md", "report.json", "confusion_matrix.png", "training_curve.png"):
        assert (tmp_path / "eval" / name).is_file(), name
    assert "zero-shot" in (tmp_path / "eval" / "report.md").read_text()
    model, tokenizer = smollm2
    ids = tokenizer(["Review: fine.\nIs this movie review positive or negative? Answer:"], return_tensors="pt")
    ours = PeftModel.from_pretrained(model, tmp_path / "adapter")
    logits = ours(**ids).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(load_base("smollm2-135m-instruct")[0], tmp_path / "adapter")
    torch.testing.assert_close(logits, theirs(**ids).logits[:, 20:], atol=1e-4, rtol=1e-4)


def test_lora_files_move_between_peftkit_and_peft_on_smollm2(smollm2, tmp_path):
    model, tokenizer = smollm2
    torch.manual_seed(0)
    config = LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    batch = tokenizer(["The movie was great", "A dull film"], return_tensors="pt", padding=True)
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        ours = peft_model(**batch).logits
    peft_model.save_pretrained(tmp_path)
    peft_model.unload()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(load_base("smollm2-135m-instruct")[0], tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(ours[real], theirs(**batch).logits[real], atol=1e-4, rtol=1e-4)
