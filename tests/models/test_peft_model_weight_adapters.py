"""PeftModel with weight adapters: several at once, with soft prompts, frozen, per-row, in generation."""

from __future__ import annotations

import torch

from peftkit import LoraConfig, PeftModel, PromptTuningConfig, get_peft_model
from tests.conftest import tiny_model

BATCH = {
    "input_ids": torch.tensor([[5, 9, 33, 17, 64, 3], [7, 8, 9, 10, 11, 12]]),
    "attention_mask": torch.ones(2, 6, dtype=torch.long),
}
LABELS = torch.tensor([[-100, -100, 33, 17, 64, 3], [-100, 8, 9, 10, 11, 12]])


def train(model, steps: int = 3, lr: float = 1e-2) -> list[float]:
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(**BATCH, labels=LABELS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def snapshot(model, prefix: str = "") -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if prefix in n}


def test_soft_prompt_and_lora_train_jointly(llama):
    """Seed 002: a soft prompt and a LoRA active on the same model at once, trained together."""
    model = get_peft_model(llama, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), adapter_name="lora")
    model.add_adapter("prompt", PromptTuningConfig(num_virtual_tokens=3))
    model.set_adapter(["lora", "prompt"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_B.lora" in n for n in trainable) and "prompt_encoder.prompt.embedding.weight" in trainable
    before = snapshot(model)
    losses = train(model, steps=4)
    after = dict(model.named_parameters())
    prompt = "prompt_encoder.prompt.embedding.weight"
    assert not torch.equal(before[prompt], after[prompt])
    assert all(not torch.equal(before[n], after[n]) for n in trainable if "lora_B" in n)
    assert all(torch.equal(before[n], after[n]) for n in before if n not in trainable)
    assert losses[-1] < losses[0]
    # both really act: dropping either changes the output
    both = model(**BATCH).logits
    model.set_adapter("lora")
    assert not torch.allclose(model(**BATCH).logits, both)
    model.set_adapter("prompt")
    assert not torch.allclose(model(**BATCH).logits, both)


def test_prompt_on_a_frozen_lora_kept_or_merged(tmp_path):
    """Seed 001: a unified LoRA is loaded frozen and a new soft prompt is trained on top of it."""
    torch.manual_seed(0)
    get_peft_model(tiny_model("llama"), LoraConfig(r=4, init_lora_weights=False)).save_pretrained(tmp_path)

    kept = PeftModel.from_pretrained(tiny_model("llama"), tmp_path, adapter_name="unified")
    assert kept.adapters["unified"].is_frozen
    torch.manual_seed(1)
    kept.add_adapter("persona", PromptTuningConfig(num_virtual_tokens=3))
    kept.set_adapter(["unified", "persona"])
    lora_before = snapshot(kept, "lora_")
    prompt_before = kept.prompt_encoder["persona"].embedding.weight.detach().clone()
    train(kept)
    assert all(torch.equal(p, lora_before[n]) for n, p in kept.named_parameters() if "lora_" in n)
    prompt = kept.prompt_encoder["persona"].embedding.weight.detach()
    assert not torch.equal(prompt, prompt_before)

    merged_base = PeftModel.from_pretrained(tiny_model("llama"), tmp_path).merge_and_unload()
    on_merged = get_peft_model(merged_base, PromptTuningConfig(num_virtual_tokens=3))
    with torch.no_grad():
        on_merged.prompt_encoder["default"].embedding.weight.copy_(prompt)
        torch.testing.assert_close(on_merged(**BATCH).logits, kept(**BATCH).logits, atol=1e-5, rtol=1e-5)
    assert on_merged.get_nb_trainable_parameters()[0] == 3 * 32


def test_set_adapter_does_not_change_trainability(llama):
    model = get_peft_model(llama, LoraConfig(r=2), adapter_name="a")
    model.add_adapter("b", LoraConfig(r=2))
    count = model.get_nb_trainable_parameters()[0]
    model.set_adapter("b")
    assert model.get_nb_trainable_parameters()[0] == count
    model.adapters["a"].freeze()
    assert model.adapters["a"].is_frozen and not model.adapters["b"].is_frozen
    assert model.get_nb_trainable_parameters()[0] == count // 2


def test_mixed_batch_of_loras_and_a_soft_prompt(llama):
    torch.manual_seed(0)
    model = get_peft_model(llama, LoraConfig(r=4, init_lora_weights=False), adapter_name="a")
    model.add_adapter("b", LoraConfig(r=2, target_modules=["o_proj"], init_lora_weights=False))
    model.add_adapter("p", PromptTuningConfig(num_virtual_tokens=2))
    names = ["b", "p", "a", "__base__"]
    ids = torch.randint(3, 128, (4, 5), generator=torch.Generator().manual_seed(3))
    mixed = model(input_ids=ids, adapter_names=names).logits
    for row, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                alone = model(input_ids=ids[row : row + 1]).logits
        else:
            model.set_adapter(name)
            alone = model(input_ids=ids[row : row + 1]).logits
        torch.testing.assert_close(mixed[row : row + 1], alone, atol=1e-5, rtol=1e-5)


def test_generate_with_a_different_lora_per_row(llama):
    torch.manual_seed(0)
    model = get_peft_model(llama, LoraConfig(r=4, init_lora_weights=False), adapter_name="a")
    model.add_adapter("b", LoraConfig(r=4, init_lora_weights=False))
    ids = BATCH["input_ids"]
    mixed = model.generate(input_ids=ids, max_new_tokens=4, adapter_names=["a", "b"], eos_token_id=None)
    for row, name in enumerate(["a", "b"]):
        model.set_adapter(name)
        alone = model.generate(input_ids=ids[row : row + 1], max_new_tokens=4, eos_token_id=None)
        assert torch.equal(mixed[row : row + 1], alone)
    model.set_adapter("a")
    with model.disable_adapter():
        base = model.generate(input_ids=ids, max_new_tokens=4, eos_token_id=None)
    assert not torch.equal(base, mixed)


def test_gradient_checkpointing_replays_per_row_routing():
    """Checkpointed layers are recomputed after the forward's routing scope closed: same gradients."""
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, init_lora_weights=False), adapter_name="a")
        model.add_adapter("b", LoraConfig(r=4, init_lora_weights=False))
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        model(**BATCH, labels=LABELS, adapter_names=["a", "__base__"]).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert all(grads[1][n] is None for n in grads[1] if ".b." in n)  # no row used "b"
    for name, grad in grads[0].items():
        if grad is not None:
            torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-5)
