"""The compact training loop: schedule, loss goes down, only the adapter trains."""

import pytest
import torch

from peftkit import PromptTuningConfig, get_peft_model
from peftkit.data.batching import batches_forever, encode
from peftkit.training.loop import fit, warmup_linear_decay
from tests.conftest import tiny_model


def test_schedule():
    factor = warmup_linear_decay(warmup_steps=4, total_steps=12)
    assert [factor(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert factor(8) == pytest.approx(0.5)
    assert factor(12) == 0.0


def test_fit_lowers_the_loss_and_trains_only_the_prompt(char_tokenizer):
    torch.manual_seed(0)
    base = tiny_model("llama")
    peft_model = get_peft_model(base, PromptTuningConfig(num_virtual_tokens=4))
    frozen = {n: p.clone() for n, p in base.named_parameters()}
    examples = [encode(char_tokenizer, f"q{i}", "z") for i in range(16)]
    result = fit(peft_model, batches_forever(examples, 4, 0), steps=30, lr=0.1, warmup_steps=2, progress=False)
    assert len(result.losses) == 30 and result.tokens > 0
    assert sum(result.losses[-5:]) / 5 < result.losses[0] - 0.1  # near-uniform random model: ~4.86 at start
    assert all(torch.equal(frozen[n], p) for n, p in base.named_parameters())


def test_fit_needs_trainable_parameters(char_tokenizer):
    peft_model = get_peft_model(tiny_model("llama"), PromptTuningConfig(num_virtual_tokens=4))
    peft_model.adapters["default"].freeze()
    with pytest.raises(ValueError, match="no trainable parameters"):
        fit(peft_model, iter([]), steps=1, lr=0.1, progress=False)
