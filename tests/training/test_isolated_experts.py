"""Many experts in one run end exactly where each would end trained alone (issue: isolated training).

The oracle is the ordinary single-adapter run: torch's own AdamW / SGD, ``clip_grad_norm_`` and the
schedule, on one expert's rows only, in the order a run of its own reads them.
"""

import pytest
import torch

from peftkit import PromptTuningConfig, get_peft_model
from peftkit.data.experts import ExpertData
from peftkit.data.formatters import get_formatter
from peftkit.data.pipeline import TokenizedData
from peftkit.data.sources import MemorySource
from peftkit.training import checkpoint as ckpt
from peftkit.training.config import TrainingConfig
from peftkit.training.trainer import Trainer
from tests.conftest import CharTokenizer, tiny_model
from tests.training.conftest import records

SIZES = {"ann": 5, "bob": 8, "cy": 3}  # rows per expert: different numbers of steps per epoch
TOKENS = 4


def expert_records() -> list[dict]:
    rows = []
    for k, (expert, n) in enumerate(SIZES.items()):
        rows += [{**r, "expert": expert} for r in records(n, seed=k)]
    return rows


def initial_table() -> torch.Tensor:
    return torch.randn(len(SIZES), TOKENS, 32, generator=torch.Generator().manual_seed(7)) * 0.5


def config(optimizer: str, **changes) -> TrainingConfig:
    settings = {
        "optimizer": optimizer, "lr": 0.05, "epochs": 2, "warmup_steps": 2, "scheduler": "linear",
        "max_grad_norm": 0.05, "weight_decay": 0.1, "momentum": 0.9, "batch_size": 2, **changes,
    }  # fmt: skip
    return TrainingConfig(**settings)


def alone(expert: str, row: int, training: TrainingConfig) -> torch.Tensor:
    torch.manual_seed(0)
    model = get_peft_model(tiny_model("llama"), PromptTuningConfig(num_virtual_tokens=TOKENS))
    with torch.no_grad():
        model.adapters["default"].embedding.weight.copy_(initial_table()[row])
    mine = [r for r in expert_records() if r["expert"] == expert]
    data = TokenizedData(MemorySource(mine), get_formatter("prompt_completion"), CharTokenizer(), batch_size=2, seed=3)
    Trainer(model, data, training, progress=False).train()
    return model.adapters["default"].embedding.weight.detach().clone()


def together(training: TrainingConfig, micro_batch_size: int = 3, output=None, resume=None):
    torch.manual_seed(0)
    bank = PromptTuningConfig(num_virtual_tokens=TOKENS, expert_ids=list(SIZES))
    model = get_peft_model(tiny_model("llama"), bank)
    with torch.no_grad():
        model.adapters["default"].table.copy_(initial_table())
    data = ExpertData(
        MemorySource(expert_records()), get_formatter("prompt_completion"), CharTokenizer(),
        route=lambda r: {"default": r["expert"]}, expert_field="expert", batch_size=2,
        micro_batch_size=micro_batch_size, seed=3,
    )  # fmt: skip
    trainer = Trainer(model, data, training, progress=False, output_dir=output)
    trainer.train(resume_from=resume)
    return trainer, model.adapters["default"].table.detach().clone()


@pytest.mark.parametrize("optimizer", ["sgd", "adamw", "adam"])
def test_each_expert_ends_where_it_would_alone(optimizer):
    training = config(optimizer)
    trainer, table = together(training)
    assert trainer.state.total_steps == max(2 * -(-n // 2) for n in SIZES.values())  # the longest expert's run
    worst = 0.0
    for row, expert in enumerate(SIZES):
        solo = alone(expert, row, training)
        assert not torch.equal(solo, initial_table()[row])  # it trained
        worst = max(worst, float((table[row] - solo).abs().max()))
        torch.testing.assert_close(table[row], solo, atol=1e-5, rtol=0)
    print(f"{optimizer}: largest |Δw| {worst:.2e}")


def test_an_expert_absent_from_a_step_is_untouched():
    """cy has 2 steps per epoch × 2 epochs; bob has 8: after step 4 cy must not move (no decay, no momentum)."""
    trainer, table = together(config("adamw", epochs=2))
    cy = list(SIZES).index("cy")
    assert int(trainer.update.steps[cy]) == 4 and int(trainer.update.steps[list(SIZES).index("bob")]) == 8
    torch.testing.assert_close(table[cy], alone("cy", cy, config("adamw", epochs=2)), atol=1e-5, rtol=0)


def test_micro_batch_size_does_not_change_the_result():
    _, small = together(config("adamw"), micro_batch_size=1)
    _, large = together(config("adamw"), micro_batch_size=16)
    torch.testing.assert_close(small, large, atol=1e-5, rtol=0)


def test_resume_is_exact_and_state_is_keyed_by_expert(tmp_path):
    training = config("adamw", checkpoint_every=3, keep_checkpoints=5)
    _, straight = together(training, output=tmp_path / "a")
    meta = ckpt.read_checkpoint(tmp_path / "a" / "checkpoints" / "step-000003").meta
    assert meta["optimizer"]["experts"] == list(SIZES)
    _, resumed = together(training, output=tmp_path / "b", resume=tmp_path / "a" / "checkpoints" / "step-000003")
    torch.testing.assert_close(resumed, straight, atol=0, rtol=0)


def test_a_steps_micro_batches_hold_rows_of_similar_length():
    """Rows of one step are grouped by length (padding), whatever the expert they come from."""
    data = ExpertData(
        MemorySource(expert_records()), get_formatter("prompt_completion"), CharTokenizer(),
        route=lambda r: {"default": r["expert"]}, expert_field="expert", batch_size=2, micro_batch_size=2, seed=3,
    )  # fmt: skip
    first_step = [b for b in data.batches(data.steps(1, None)) if b.position.batch == 1]
    lengths = [int(n) for b in first_step for n in b.tensors["attention_mask"].sum(-1)]
    assert len(lengths) == 6 and lengths == sorted(lengths)  # 3 experts × 2 rows, shortest first
