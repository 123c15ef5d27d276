"""Callbacks: event order, stopping, early stopping, the evaluator hook, state across a resume."""

import json

import pytest

from peftkit.training import checkpoint as ckpt
from peftkit.training.callbacks import Callback, EarlyStopping, TrainerState, build_callback, register_callback
from peftkit.training.config import TrainingConfig
from peftkit.training.trainer import Trainer
from tests.training.conftest import data, prompt_model


class Recorder(Callback):
    def __init__(self):
        self.events = []

    def on_train_begin(self, state):
        self.events.append(("train_begin", state.step))

    def on_step_end(self, state, metrics):
        self.events.append(("step_end", state.step))

    def on_epoch_end(self, state):
        self.events.append(("epoch_end", state.step))

    def on_evaluate(self, state, metrics):
        self.events.append(("evaluate", state.step))

    def on_checkpoint(self, state, path):
        self.events.append(("checkpoint", state.step))

    def on_train_end(self, state):
        self.events.append(("train_end", state.step))


def config(**kwargs):
    return TrainingConfig(**{"lr": 0.05, "warmup_steps": 0, **kwargs})


def test_events_in_order(tmp_path):
    recorder = Recorder()
    trainer = Trainer(
        prompt_model(), data(n=12, batch_size=4), config(epochs=2, eval_every=2, checkpoint_every=3),
        eval_data=data(n=4), callbacks=[recorder], output_dir=tmp_path, progress=False,
    )  # fmt: skip
    trainer.train()
    assert recorder.events == [
        ("train_begin", 0),
        ("step_end", 1),
        ("step_end", 2),
        ("evaluate", 2),
        ("step_end", 3),
        ("epoch_end", 3),
        ("checkpoint", 3),
        ("step_end", 4),
        ("evaluate", 4),
        ("step_end", 5),
        ("step_end", 6),
        ("epoch_end", 6),
        ("evaluate", 6),
        ("checkpoint", 6),
        ("train_end", 6),
    ]


def test_a_callback_can_stop_training(tmp_path):
    class StopAtThree(Callback):
        def on_step_end(self, state, metrics):
            if state.step == 3:
                state.request_stop("enough")

    trainer = Trainer(
        prompt_model(), data(), config(max_steps=10), callbacks=[StopAtThree()], output_dir=tmp_path, progress=False
    )
    result = trainer.train()
    assert result.state.step == 3 and result.state.stop_reason == "enough"
    assert ckpt.list_checkpoints(tmp_path / "checkpoints") == [3]  # a clean stop still writes a final checkpoint


def test_early_stopping_on_an_evaluator_metric(tmp_path):
    """The evaluator's scripted accuracies: 0.5, 0.6, 0.6, 0.55 → no improvement twice after step 4 → stop at 8."""
    scores = iter([0.5, 0.6, 0.6, 0.55, 0.9])
    stopper = EarlyStopping(metric="eval/accuracy", mode="max", patience=2)
    trainer = Trainer(
        prompt_model(), data(), config(max_steps=20, eval_every=2), evaluate=lambda model: {"accuracy": next(scores)},
        callbacks=[stopper], output_dir=tmp_path, progress=False,
    )  # fmt: skip
    result = trainer.train()
    assert result.state.step == 8
    assert "eval/accuracy has not improved for 2 report(s) (best 0.6 at step 4)" in result.state.stop_reason
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["eval/accuracy"] for m in logged if "eval/accuracy" in m] == [0.5, 0.6, 0.6, 0.55]
    assert stopper.state_dict() == {"best": 0.6, "best_step": 4, "bad_reports": 2}


def test_early_stopping_min_delta_and_state_round_trip():
    stopper = EarlyStopping(metric="train/loss", patience=2, min_delta=0.1)
    state = TrainerState()
    for step, loss in enumerate([1.0, 0.95, 0.8, 0.75], 1):
        state.step = step
        stopper.on_step_end(state, {"train/loss": loss})
    assert stopper.state_dict() == {"best": 0.8, "best_step": 3, "bad_reports": 1} and not state.should_stop
    again = EarlyStopping(metric="train/loss", patience=2, min_delta=0.1)
    again.load_state_dict(json.loads(json.dumps(stopper.state_dict())))
    again.on_step_end(state, {"train/loss": 0.79})
    assert state.should_stop


def test_early_stopping_refuses_a_metric_that_is_never_logged(tmp_path):
    """A misspelled metric must not silently never fire."""
    with pytest.raises(ValueError, match="train/... or eval/..."):
        EarlyStopping(metric="accuracy")
    stopper = EarlyStopping(metric="eval/acurracy", mode="max")
    trainer = Trainer(
        prompt_model(), data(), config(max_steps=4, eval_every=2), evaluate=lambda model: {"accuracy": 0.5},
        callbacks=[stopper], output_dir=tmp_path, progress=False,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"'eval/acurracy' is not among the eval metrics \(.*eval/accuracy"):
        trainer.train()
    with pytest.raises(ValueError, match="'train/lss' is not among the train metrics"):
        EarlyStopping(metric="train/lss").on_step_end(TrainerState(), {"train/loss": 1.0})


def test_callback_state_survives_a_resume(tmp_path):
    class Counter(Callback):
        def __init__(self):
            self.steps = 0

        def on_step_end(self, state, metrics):
            self.steps += 1

        def state_dict(self):
            return {"steps": self.steps}

        def load_state_dict(self, state):
            self.steps = state["steps"]

    Trainer(
        prompt_model(),
        data(),
        config(max_steps=4, checkpoint_every=4),
        callbacks=[Counter()],
        output_dir=tmp_path,
        progress=False,
    ).train()
    counter = Counter()
    resumed = Trainer(
        prompt_model(), data(), config(max_steps=6), callbacks=[counter], output_dir=tmp_path, progress=False
    )
    with pytest.warns(UserWarning, match="resuming with a different learning-rate schedule"):  # max_steps 4 -> 6
        resumed.train(resume_from=tmp_path / "checkpoints" / "step-000004")
    assert counter.steps == 6


def test_registry_and_options():
    @register_callback("test_noop")
    class Noop(Callback):
        def __init__(self, *, level: int = 1):
            self.level = level

    assert build_callback("test_noop", {"level": 3}).level == 3
    with pytest.raises(ValueError, match=r"callback 'test_noop' takes no option\(s\) \['volume'\]"):
        build_callback("test_noop", {"volume": 3})
    with pytest.raises(ValueError, match="patience must be an integer >= 1"):
        build_callback("early_stopping", {"patience": 0})
