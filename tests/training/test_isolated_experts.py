"""Many experts in one run end exactly where each would end trained alone (issue: isolated training).

The oracle is the ordinary single-adapter run: torch's own AdamW / SGD, ``clip_grad_norm_`` and the
schedule, on one expert's rows only, in the order a run of its own reads them.
"""

import re

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


# ---------------------------------------------------------------------- the command line, and torchrun
def write_expert_run(folder, tiny, output):
    import json

    rows = [json.loads(line) for line in (tiny / "train.jsonl").read_text().splitlines()][:30]
    with open(folder / "experts.jsonl", "w") as handle:
        for i, row in enumerate(rows):
            handle.write(json.dumps({**row, "user": f"u{i % 4}"}) + "\n")  # 4 experts, 7-8 rows each
    config = folder / "experts.yaml"
    config.write_text(
        f"model: {{name: {tiny}}}\n"
        "adapters:\n  persona: {peft_type: PROMPT_TUNING, num_virtual_tokens: 3}\n"
        f"data:\n  train: {folder / 'experts.jsonl'}\n"
        "training: {lr: 0.05, epochs: 2, batch_size: 2, warmup_steps: 1, max_grad_norm: 0.5, weight_decay: 0.01}\n"
        "experts: {field: user, micro_batch_size: 6}\n"
        f"output_dir: {output}\n"
    )
    return config


@pytest.mark.slow
def test_train_command_and_two_processes_keep_experts_isolated(tiny_folder, tmp_path):
    import subprocess
    import sys

    from safetensors.torch import load_file

    from tests.training.test_distributed import environment

    config = write_expert_run(tmp_path, tiny_folder, tmp_path / "unused")
    train = ["-m", "peftkit.cli.main", "train", str(config), "--no-progress"]
    one, two = tmp_path / "one", tmp_path / "two"
    single = subprocess.run(
        [sys.executable, *train, f"output_dir={one}"], env=environment(), capture_output=True, text=True, timeout=300
    )
    assert single.returncode == 0, single.stdout + single.stderr
    assert "experts 4 in bank 'persona' by field 'user'" in single.stdout
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    double = subprocess.run(
        [*launcher, *train, f"output_dir={two}"], env=environment(), capture_output=True, text=True, timeout=300
    )
    assert double.returncode == 0, double.stdout + double.stderr
    a = load_file(one / "adapter" / "persona" / "adapter_model.safetensors")["prompt_embeddings"]
    b = load_file(two / "adapter" / "persona" / "adapter_model.safetensors")["prompt_embeddings"]
    assert a.shape == (4, 3, 32)
    difference = float((a - b).abs().max())
    assert difference <= 1e-5, difference
    print(f"experts, 1 vs 2 processes: max |dw| {difference:.2e}")


def test_optimizer_state_follows_expert_ids_into_a_grown_bank(tmp_path):
    """A checkpoint's optimiser rows are keyed by expert id: loaded into a bank that gained an expert
    (and holds the old ones in another order), each old expert gets its own moments and step count."""
    from peftkit.training.experts import ExpertUpdate

    training = config("adamw", checkpoint_every=3, keep_checkpoints=5)
    trainer, table = together(training, output=tmp_path / "a")
    saved = ckpt.read_checkpoint(tmp_path / "a" / "checkpoints" / "step-000003")

    grown_ids = ["dee", "cy", "ann", "bob"]
    model = get_peft_model(tiny_model("llama"), PromptTuningConfig(num_virtual_tokens=TOKENS, expert_ids=grown_ids))
    update = ExpertUpdate("default", model.adapters["default"], training, dict.fromkeys(grown_ids, 8))
    update.load_state(saved.meta, saved.tensors)
    old = {e: i for i, e in enumerate(SIZES)}
    for row, expert in enumerate(grown_ids):
        if expert == "dee":
            fresh = update.moments["embedding.weight"]["exp_avg"].view(4, -1)[row]
            assert int(update.steps[row]) == 0 and not fresh.any()
            continue
        assert int(update.steps[row]) == 3
        before = saved.tensors["param/embedding.weight"].view(3, TOKENS, -1)[old[expert]]
        torch.testing.assert_close(model.adapters["default"].table[row].detach(), before)
        moments = saved.tensors["expert_optim/embedding.weight/exp_avg"][old[expert]]
        torch.testing.assert_close(update.moments["embedding.weight"]["exp_avg"].view(4, -1)[row], moments)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"adapters": {"a": {"peft_type": "PROMPT_TUNING"}, "b": {"peft_type": "LORA"}}}, "experts.bank: name"),
        ({"experts": {"bank": "nope"}}, "experts.bank = 'nope': no such adapter"),
        ({"experts": {"routes": {"cluster": "c"}}}, "experts.routes names no adapter ['cluster']"),
        ({"training": {"gradient_accumulation_steps": 2}}, "gradient_accumulation_steps must be 1"),
    ],
)
def test_experts_config_errors_name_the_field(changes, message):
    from peftkit.training.config import ConfigError
    from peftkit.training.overrides import validate_config

    tree = {
        "adapters": {"persona": {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 2}},
        "data": {"train": "rotten_tomatoes"},
        "experts": {"field": "user"},
    }
    for key, value in changes.items():
        tree[key] = {**tree.get(key, {}), **value} if key == "experts" else value
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_config(tree)


def test_a_steps_micro_batches_hold_rows_of_similar_length():
    """Rows of one step are grouped by length (padding), whatever the expert they come from."""
    data = ExpertData(
        MemorySource(expert_records()), get_formatter("prompt_completion"), CharTokenizer(),
        route=lambda r: {"default": r["expert"]}, expert_field="expert", batch_size=2, micro_batch_size=2, seed=3,
    )  # fmt: skip
    first_step = [b for b in data.batches(data.steps(1, None)) if b.position.batch == 1]
    lengths = [int(n) for b in first_step for n in b.tensors["attention_mask"].sum(-1)]
    assert len(lengths) == 6 and lengths == sorted(lengths)  # 3 experts × 2 rows, shortest first


def test_only_a_labelled_row_without_an_expert_is_an_error():
    """A row routed to no expert of the bank is fine while it carries no label; labelled, it is an error."""
    from types import SimpleNamespace

    from peftkit.training.distributed import Distributed
    from peftkit.training.experts import ExpertUpdate

    model = get_peft_model(tiny_model("llama"), PromptTuningConfig(num_virtual_tokens=TOKENS, expert_ids=list(SIZES)))
    update = ExpertUpdate("default", model.adapters["default"], config("adamw"), dict.fromkeys(SIZES, 4))
    labels = torch.tensor([[-100, 5, 6], [-100, -100, -100]])
    fine = SimpleNamespace(rows=2, tensors={"labels": labels}, routes=[{"default": "ann"}, {}])
    update.count([fine], Distributed())
    assert update.counts.tolist() == [2.0, 0.0, 0.0]
    bad = SimpleNamespace(rows=2, tensors={"labels": labels.flip(0)}, routes=[{"default": "ann"}, {}])
    with pytest.raises(ValueError, match="a labelled row of the batch names no expert"):
        update.count([bad], Distributed())
