"""Defects found by reading the training code; each test failed before its fix."""

import json

import pytest
import torch

from peftkit import AdaLoraConfig, LoraConfig, get_peft_model
from peftkit.data.batching import collate, encode
from peftkit.data.pipeline import Batch
from peftkit.training import checkpoint as ckpt
from peftkit.training.callbacks import Callback
from peftkit.training.config import GradientHooksConfig, TrainingConfig
from peftkit.training.losses import CompositeLoss, LossInputs, build_loss, register_loss
from peftkit.training.trainer import Trainer
from tests.conftest import CharTokenizer, tiny_model
from tests.training.conftest import data, prompt_model, records


def sgd(**kwargs) -> TrainingConfig:
    return TrainingConfig(**{"lr": 1.0, "optimizer": "sgd", "warmup_steps": 0, "scheduler": "constant", **kwargs})


def rows(n: int = 4):
    tok = CharTokenizer()
    return collate([encode(tok, r["prompt"], r["completion"]) for r in records(n)], 0)


def test_adalora_orthogonality_penalty_reaches_the_update():
    """One SGD step (lr 1) moves each weight by minus the gradient of CE-mean + the penalty."""
    config = AdaLoraConfig(
        init_r=4, target_r=2, total_step=10, tinit=5, tfinal=3, orth_reg_weight=0.7, target_modules=["q_proj"]
    )
    torch.manual_seed(0)
    model = get_peft_model(tiny_model("llama"), config)
    batch = rows()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    out = model(**batch)  # PEFT's view: forward's loss = CE mean + penalty
    grads = dict(zip(params, torch.autograd.grad(out.loss, list(params.values())), strict=True))
    before = {n: p.detach().clone() for n, p in params.items()}
    Trainer(model, [batch], sgd(max_steps=1), progress=False).train()
    for name, param in params.items():
        torch.testing.assert_close(param.detach(), before[name] - grads[name], atol=1e-6, rtol=1e-5)
    # without the penalty the update differs: the test can fail
    penalty_grad = torch.autograd.grad(model.regularization_loss(), [params[n] for n in params if "lora_A" in n])
    assert max(float(g.abs().max()) for g in penalty_grad) > 1e-4


def test_the_training_forward_computes_no_loss_of_its_own():
    model = prompt_model()
    out = model(**rows(), return_logits="labelled")
    assert out.loss is None and out.logits.ndim == 2


def test_gradient_statistics_reach_the_log_when_cadences_are_equal(tmp_path):
    hooks = GradientHooksConfig(hooks=["norm"], every=2)
    trainer = Trainer(
        prompt_model(),
        data(),
        TrainingConfig(lr=0.01, max_steps=4, log_every=2),
        gradient_hooks=hooks,
        output_dir=tmp_path,
        progress=False,
    )
    trainer.train()
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    with_stats = [m["step"] for m in logged if any(k.startswith("grad/") for k in m)]
    assert with_stats == [2, 4]


def test_ready_made_batches_count_only_predicted_labels():
    batch = rows()
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    counted = Batch.from_tensors(batch).num_label_tokens
    assert counted == int((batch["labels"][:, 1:] != -100).sum())


def test_weight_adapter_loss_with_labels_equal_to_input_ids():
    torch.manual_seed(0)
    model = get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    batch = rows()
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        expected = model(**batch).loss.item()  # HF convention: mean over the shifted labels
    trainer = Trainer(model, [batch], sgd(max_steps=1, lr=1e-9), progress=False)
    trainer.train()
    assert trainer.result.losses[0] == pytest.approx(expected, rel=1e-5)


def test_without_epochs_the_run_stops_at_the_end_of_one_epoch():
    """10 batches, 3 per step: 4 steps, and the last one takes only the 10th batch."""
    trainer = Trainer(
        prompt_model(), data(n=40, batch_size=4), sgd(lr=0.01, gradient_accumulation_steps=3), progress=False
    )
    assert trainer.state.total_steps == 4
    trainer.train()
    assert trainer.state.micro_batches == 10 and trainer.state.epoch == 1


def test_a_step_that_ends_several_epochs_counts_them_all():
    seen = []

    class Epochs(Callback):
        def on_epoch_end(self, state):
            seen.append(state.epoch)

    # one batch per epoch, three micro-batches per step: the single step ends three epochs
    trainer = Trainer(
        prompt_model(),
        data(n=4, batch_size=4),
        sgd(lr=0.01, epochs=3, gradient_accumulation_steps=3),
        callbacks=[Epochs()],
        progress=False,
    )
    trainer.train()
    assert trainer.state.step == 1 and trainer.state.epoch == 3 and seen == [1, 2, 3]


def test_an_early_stopped_run_stays_stopped_when_resumed(tmp_path):
    class StopAtThree(Callback):
        def on_step_end(self, state, metrics):
            if state.step == 3:
                state.request_stop("enough")

    config = sgd(lr=0.01, max_steps=10, checkpoint_every=1)
    Trainer(prompt_model(), data(), config, callbacks=[StopAtThree()], output_dir=tmp_path, progress=False).train()
    resumed = Trainer(prompt_model(), data(), config, callbacks=[StopAtThree()], output_dir=tmp_path, progress=False)
    resumed.train(resume_from=ckpt.latest_checkpoint(tmp_path / "checkpoints"))
    assert resumed.state.step == 3 and resumed.state.stop_reason == "enough"


def test_class_losses_keep_needs_hidden_states():
    class LastHidden:
        def __call__(self, inputs: LossInputs):
            return inputs.hidden_states[-1].float().pow(2).mean(-1)

    register_loss("test_last_hidden_class", LastHidden, needs_hidden_states=True)
    loss = build_loss("test_last_hidden_class", {})
    assert getattr(loss, "needs_hidden_states", False)
    composite = CompositeLoss([("h", 1.0, loss)])
    assert composite.needs_hidden_states
    trainer = Trainer(prompt_model(), [rows()], sgd(lr=0.01, max_steps=1), loss=composite, progress=False)
    trainer.train()  # would fail on hidden_states=None before the fix
    assert trainer.result.losses[0] > 0


def test_resume_from_another_runs_checkpoint_into_a_new_folder(tmp_path):
    """Found while writing scripts/gpu_check.py: the metrics log assumed its folder existed."""
    config = sgd(lr=0.01, max_steps=4, checkpoint_every=2)
    Trainer(prompt_model(), data(), config, output_dir=tmp_path / "a", progress=False).train()
    resumed = Trainer(prompt_model(), data(), config, output_dir=tmp_path / "b", progress=False)
    resumed.train(resume_from=tmp_path / "a" / "checkpoints" / "step-000002")
    assert resumed.state.step == 4 and (tmp_path / "b" / "metrics.jsonl").is_file()
