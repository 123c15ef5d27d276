"""The training loop: normalisation, accumulation, schedule, divergence, checkpoints and exact resume."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from peftkit.data.batching import collate, encode
from peftkit.training import checkpoint as ckpt
from peftkit.training.callbacks import Callback
from peftkit.training.config import TrainingConfig
from peftkit.training.losses import CompositeLoss, CrossEntropy, register_loss
from peftkit.training.optim import LRSchedule
from peftkit.training.trainer import Trainer, TrainingDivergedError
from tests.conftest import CharTokenizer
from tests.training.conftest import data, prompt_model, records


def quiet(**kwargs) -> TrainingConfig:
    return TrainingConfig(**{"lr": 0.05, "warmup_steps": 0, **kwargs})


def eight_rows():
    tok = CharTokenizer()
    return [encode(tok, r["prompt"], r["completion"]) for r in records(8)]


def prompt_weights(model):
    return model.adapters["default"].embedding.weight.detach().clone()


def test_step_loss_is_the_mean_over_label_tokens():
    model = prompt_model()
    batch = collate(eight_rows(), 0)
    with torch.no_grad():
        logits = model(**batch).logits[:, :-1]
    expected = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1))
    trainer = Trainer(model, [batch], quiet(max_steps=1), progress=False)
    trainer.train()
    assert trainer.result.losses[0] == pytest.approx(expected.item(), rel=1e-5)


def test_accumulating_four_by_two_equals_one_batch_of_eight():
    rows = eight_rows()
    assert len({sum(label != -100 for label in r.labels) for r in rows}) > 1  # label counts differ per row
    one = prompt_model()
    whole = Trainer(one, [collate(rows, 0)] * 3, quiet(max_steps=3), progress=False).train()
    four = prompt_model()
    micro = [collate(rows[i : i + 2], 0) for i in range(0, 8, 2)] * 3
    accumulated = Trainer(four, micro, quiet(max_steps=3, gradient_accumulation_steps=4), progress=False).train()
    assert accumulated.losses == pytest.approx(whole.losses, rel=1e-5)
    torch.testing.assert_close(prompt_weights(four), prompt_weights(one), atol=1e-6, rtol=1e-5)
    # averaging the micro-batches' own means would give another number: the token normalisation matters
    with torch.no_grad():
        means = [prompt_model()(**collate(rows[i : i + 2], 0)).loss.item() for i in range(0, 8, 2)]
    assert abs(sum(means) / 4 - whole.losses[0]) > 1e-3


COSINE_AT_8 = 0.5 * (1 + math.cos(0.4 * math.pi))


@pytest.mark.parametrize(("kind", "at_8"), [("constant", 1.0), ("linear", 0.6), ("cosine", COSINE_AT_8)])
def test_schedules(kind, at_8):
    schedule = LRSchedule(lr=2.0, total=14, warmup=4, kind=kind)
    assert [schedule.lr_at(s) for s in range(4)] == [0.5, 1.0, 1.5, 2.0]
    assert schedule.lr_at(8) == pytest.approx(2.0 * at_8)
    floor = LRSchedule(lr=1.0, total=10, kind="linear", min_lr_ratio=0.1)
    assert floor.lr_at(10) == pytest.approx(0.1) and floor.lr_at(0) == 1.0


def test_the_optimizer_applies_the_scheduled_rate_and_the_adapter_hook_runs():
    model = prompt_model()
    calls = []
    model.adapters["default"].after_optimizer_step = calls.append
    trainer = Trainer(model, data(), quiet(max_steps=5, warmup_steps=2, scheduler="linear"), progress=False)
    trainer.train()
    assert calls == [0, 1, 2, 3, 4]
    lrs = [LRSchedule(0.05, 5, 2, "linear").lr_at(s) for s in range(5)]
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(lrs[-1])


def test_only_the_adapter_changes():
    model = prompt_model()
    frozen = {n: p.clone() for n, p in model.get_base_model().named_parameters()}
    before = prompt_weights(model)
    Trainer(model, data(), quiet(max_steps=3), progress=False).train()
    assert all(torch.equal(frozen[n], p) for n, p in model.get_base_model().named_parameters())
    assert not torch.equal(before, prompt_weights(model))


def test_epochs_set_the_step_count_and_fire_epoch_end():
    seen = []

    class Epochs(Callback):
        def on_epoch_end(self, state):
            seen.append((state.step, state.epoch))

    trainer = Trainer(
        prompt_model(), data(n=30, batch_size=4), quiet(epochs=2, gradient_accumulation_steps=3), callbacks=[Epochs()],
        progress=False,
    )  # fmt: skip
    assert trainer.state.total_steps == 6  # 2 epochs × 8 batches / 3 per step, rounded up
    trainer.train()
    assert trainer.state.micro_batches == 16 and seen == [(3, 1), (6, 2)]


def test_bf16_autocast_trains():
    fp32, bf16 = prompt_model(), prompt_model()
    a = Trainer(fp32, data(), quiet(max_steps=2), progress=False).train()
    b = Trainer(bf16, data(), quiet(max_steps=2, precision="bf16"), progress=False).train()
    assert b.losses[0] == pytest.approx(a.losses[0], rel=2e-2)
    assert bf16.adapters["default"].embedding.weight.dtype == torch.float32


# ---------------------------------------------------------------------- divergence and checkpoints
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    calls = {"n": 0}

    @register_loss("test_nan_at_step_6")
    def nan_later(inputs):
        calls["n"] += 1
        value = F.cross_entropy(inputs.logits.float(), inputs.targets, reduction="none")
        return value * float("nan") if calls["n"] > 5 else value

    loss = CompositeLoss([("ce", 1.0, nan_later)])
    trainer = Trainer(
        prompt_model(), data(), quiet(max_steps=10, checkpoint_every=2), loss=loss, output_dir=tmp_path, progress=False
    )
    with pytest.raises(TrainingDivergedError) as info:
        trainer.train()
    message = str(info.value)
    assert "training stopped at step 6: the loss became nan" in message
    assert f"the last good checkpoint is {tmp_path / 'checkpoints' / 'step-000004'}" in message
    assert ckpt.list_checkpoints(tmp_path / "checkpoints") == [2, 4]
    saved = load_file(tmp_path / "checkpoints" / "step-000004" / ckpt.STATE_TENSORS)
    assert torch.isfinite(saved["param/prompt_encoder.default.embedding.weight"]).all()
    assert trainer.state.step == 5
    assert not (tmp_path / "adapter").exists()  # no final adapter from a diverged run


def test_a_failed_checkpoint_write_leaves_the_previous_one(tmp_path, monkeypatch):
    trainer = Trainer(
        prompt_model(), data(), quiet(max_steps=4, checkpoint_every=2), output_dir=tmp_path, progress=False
    )
    real = ckpt.save_file

    def failing(tensors, path, *args, **kwargs):
        if trainer.state.step == 4:
            real(tensors, path)
            raise OSError("disk full")
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", failing)
    with pytest.raises(OSError, match="disk full"):
        trainer.train()
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-000002"]  # no half-written step-000004, no temp folder
    assert ckpt.read_checkpoint(root / "step-000002").step == 2


def test_checkpoint_contents(tmp_path):
    trainer = Trainer(
        prompt_model(), data(), quiet(max_steps=3, checkpoint_every=3), output_dir=tmp_path, config_text="x: 1\n",
        progress=False,
    )  # fmt: skip
    trainer.train()
    folder = tmp_path / "checkpoints" / "step-000003"
    assert sorted(p.name for p in folder.iterdir()) == ["adapter", "config.yaml", ckpt.STATE_JSON, ckpt.STATE_TENSORS]
    adapter_files = sorted(p.name for p in (folder / "adapter").iterdir())
    assert adapter_files == ["README.md", "adapter_config.json", "adapter_model.safetensors"]  # PEFT's layout
    meta = json.loads((folder / ckpt.STATE_JSON).read_text())
    assert meta["trainer"]["step"] == 3 and meta["trainer"]["data_position"] == {"epoch": 0, "record": 0, "batch": 3}
    assert meta["param_names"] == ["prompt_encoder.default.embedding.weight"]
    assert meta["schedule"]["total"] == 3 and len(meta["rng"][0]["python"][1]) == 625
    tensors = load_file(folder / ckpt.STATE_TENSORS)
    assert {"optim/0/exp_avg", "optim/0/exp_avg_sq", "optim/0/step", "rng/rank0/torch"} <= set(tensors)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file() and (tmp_path / "loss_curve.png").is_file()


class Crash(Callback):
    def __init__(self, at):
        self.at = at

    def on_step_end(self, state, metrics):
        if state.step == self.at:
            raise KeyboardInterrupt


def test_resume_in_process_is_bit_identical(tmp_path):
    """Crash between checkpoints, resume from the last one: same weights, optimiser and metrics."""
    config = quiet(max_steps=9, checkpoint_every=3, gradient_accumulation_steps=2, warmup_steps=2, eval_every=4)

    def make(output, crash_at):
        return Trainer(
            prompt_model(), data(n=20), config, eval_data=data(n=6), callbacks=[Crash(crash_at)], output_dir=output,
            progress=False,
        )  # fmt: skip

    torch.manual_seed(123)
    straight = make(tmp_path / "a", crash_at=-1)
    straight.train()
    torch.manual_seed(123)
    with pytest.raises(KeyboardInterrupt):
        make(tmp_path / "b", crash_at=5).train()
    resumed = make(tmp_path / "b", crash_at=-1)
    resumed.train(resume_from=ckpt.latest_checkpoint(tmp_path / "b" / "checkpoints"))
    assert torch.equal(prompt_weights(resumed.model), prompt_weights(straight.model))
    for key, value in straight.optimizer.state_dict()["state"][0].items():
        assert torch.equal(value, resumed.optimizer.state_dict()["state"][0][key])

    def metrics(path):
        lines = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in m.items() if k != "train/tokens_per_second"} for m in lines]

    assert metrics(tmp_path / "a") == metrics(tmp_path / "b")


@pytest.mark.parametrize("crash_at", [5, 9], ids=["while-allocating", "final-phase"])
def test_adalora_resume_is_bit_identical(tmp_path, crash_at):
    """AdaLoRA's allocator state travels in the checkpoint: resumed at step 4 the smoothed sensitivities
    decide the next pruning; resumed at step 8 (final phase) the kept-rank pattern must be re-applied."""
    from peftkit import AdaLoraConfig, get_peft_model
    from tests.conftest import tiny_model

    config = quiet(max_steps=10, checkpoint_every=2, lr=0.01)

    def make(output, crash_at):
        torch.manual_seed(0)
        # a fresh config per model: as in PEFT, the model keeps the object and AdaLoRA writes its rank_pattern
        adalora = AdaLoraConfig(
            init_r=4, target_r=2, total_step=10, tinit=1, tfinal=3, deltaT=1, target_modules=["q_proj"]
        )
        model = get_peft_model(tiny_model("llama"), adalora)
        return Trainer(model, data(n=20), config, callbacks=[Crash(crash_at)], output_dir=output, progress=False)

    straight = make(tmp_path / "a", crash_at=-1)
    straight.train()
    with pytest.raises(KeyboardInterrupt):
        make(tmp_path / "b", crash_at=crash_at).train()
    resumed = make(tmp_path / "b", crash_at=-1)
    resumed.train(resume_from=ckpt.latest_checkpoint(tmp_path / "b" / "checkpoints"))
    ours, theirs = straight.model.adapters["default"], resumed.model.adapters["default"]
    assert ours.ranks() == theirs.ranks()
    assert sum(ours.ranks().values()) == 2 * len(ours.ranks())  # pruned to target_r
    theirs_tensors = theirs.named_tensors()
    for name, value in ours.named_tensors().items():
        assert torch.equal(value, theirs_tensors[name]), name


def test_resuming_with_different_adapters_is_refused(tmp_path):
    Trainer(prompt_model(), data(), quiet(max_steps=2, checkpoint_every=2), output_dir=tmp_path, progress=False).train()
    other = Trainer(prompt_model(tokens=6), data(), quiet(max_steps=4), progress=False)
    other.output_dir = None
    with pytest.raises(Exception, match="size|shape"):
        other.load_checkpoint(tmp_path / "checkpoints" / "step-000002")


def test_needs_trainable_parameters_and_known_length():
    model = prompt_model()
    model.adapters["default"].freeze()
    with pytest.raises(ValueError, match="no trainable parameters"):
        Trainer(model, data(), quiet(max_steps=1))
    with pytest.raises(ValueError, match="training.max_steps is required"):
        Trainer(prompt_model(), iter([]), quiet())


def test_cross_entropy_default():
    trainer = Trainer(prompt_model(), data(), quiet(max_steps=1), progress=False)
    assert isinstance(trainer.loss.components[0][2], CrossEntropy)


def test_streamed_data_stops_after_its_epochs(tmp_path):
    from peftkit.data.formatters import get_formatter
    from peftkit.data.pipeline import TokenizedData
    from peftkit.data.sources import FileSource

    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records(10)))
    stream = TokenizedData(
        FileSource(path, streaming=True), get_formatter("prompt_completion"), CharTokenizer(), batch_size=4
    )
    config = quiet(max_steps=100, epochs=2, gradient_accumulation_steps=2)
    result = Trainer(prompt_model(), stream, config, progress=False).train()
    # 3 batches per epoch (4 + 4 + 2 rows), 2 per step: steps may span an epoch boundary, never the end of the last
    assert (result.state.step, result.state.micro_batches, result.state.epoch) == (3, 6, 2)


def test_cadences_that_cannot_run_are_errors():
    with pytest.raises(ValueError, match="training.eval_every=2 needs eval data or an evaluate function"):
        Trainer(prompt_model(), data(), quiet(max_steps=4, eval_every=2))
    with pytest.raises(ValueError, match="training.checkpoint_every=2 needs an output_dir"):
        Trainer(prompt_model(), data(), quiet(max_steps=4, checkpoint_every=2))
