"""Losses against direct computations from full logits and hidden states."""

import pytest
import torch
import torch.nn.functional as F

from peftkit.data.batching import collate, encode
from peftkit.training.config import LossComponent
from peftkit.training.losses import CompositeLoss, LossInputs, build_loss, known_losses, register_loss
from tests.conftest import VOCAB, CharTokenizer, tiny_model
from tests.training.conftest import prompt_model


@pytest.fixture
def batch():
    tok = CharTokenizer()
    return collate([encode(tok, "abcdef", "xy"), encode(tok, "abc", "z"), encode(tok, "ab", "xyz")], 0)


def labelled_inputs(model, batch, hidden=False, teachers=None):
    out = model(**batch, return_logits="labelled", output_hidden_states=hidden)
    following = batch["labels"][:, 1:]
    return LossInputs(model, batch, out.logits, following[following != -100], out.hidden_states, teachers or {})


def full_positions(batch):
    """``(row, position)`` of every user position whose next token is labelled, row-major."""
    labelled = batch["labels"][:, 1:] != -100
    return labelled.nonzero(as_tuple=True)


def test_labelled_logits_are_the_full_logits_at_labelled_positions(batch):
    model = prompt_model()
    full = model(**batch).logits  # (B, L, V), aligned with the user's tokens
    rows, positions = full_positions(batch)
    fast = model(**batch, return_logits="labelled")
    torch.testing.assert_close(fast.logits, full[rows, positions], atol=1e-5, rtol=1e-5)
    assert fast.logits.shape == (6, VOCAB)


def test_cross_entropy_per_token(batch):
    model = prompt_model()
    inputs = labelled_inputs(model, batch)
    full = model(**batch).logits
    rows, positions = full_positions(batch)
    expected = F.cross_entropy(full[rows, positions], batch["labels"][:, 1:][rows, positions], reduction="none")
    torch.testing.assert_close(build_loss("cross_entropy", {})(inputs), expected, atol=1e-5, rtol=1e-5)
    smoothed = build_loss("cross_entropy", {"label_smoothing": 0.1})(inputs)
    log_p = full[rows, positions].log_softmax(-1)
    targets = batch["labels"][:, 1:][rows, positions]
    by_hand = -(0.9 * log_p.gather(-1, targets[:, None])[:, 0] + 0.1 * log_p.mean(-1))
    torch.testing.assert_close(smoothed, by_hand, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_kl_to_the_frozen_base_matches_a_direct_computation(batch, temperature):
    model = prompt_model()
    base = model.get_base_model()
    inputs = labelled_inputs(model, batch)
    rows, positions = full_positions(batch)
    with torch.no_grad():
        mask = batch["attention_mask"]
        ref = base(
            input_ids=batch["input_ids"], attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0)
        ).logits[rows, positions]
    student = model(**batch).logits[rows, positions]
    p = torch.softmax(ref / temperature, -1)
    q = torch.softmax(student / temperature, -1)
    expected = temperature**2 * (p * (p.log() - q.log())).sum(-1)
    value = build_loss("kl_divergence", {"temperature": temperature})(inputs)
    torch.testing.assert_close(value, expected, atol=1e-5, rtol=1e-4)
    assert (value > 0).all()
    with model.disable_adapter():  # the adapted model against itself: zero
        same = labelled_inputs(model, batch)
        torch.testing.assert_close(build_loss("kl_divergence", {})(same), torch.zeros(6), atol=1e-6, rtol=0)


def test_kl_to_a_teacher_and_gradients_flow(batch):
    model = prompt_model()
    teacher = tiny_model("llama", seed=7)
    inputs = labelled_inputs(model, batch, teachers={"t": teacher})
    value = build_loss("kl_divergence", {"teacher": "t"})(inputs)
    rows, positions = full_positions(batch)
    mask = batch["attention_mask"]
    positions_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    t_logits = teacher(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions_ids)
    p = torch.softmax(t_logits.logits[rows, positions], -1)
    q = torch.softmax(model(**batch).logits[rows, positions], -1)
    torch.testing.assert_close(value, (p * (p.log() - q.log())).sum(-1), atol=1e-5, rtol=1e-4)
    value.sum().backward()
    assert model.adapters["default"].embedding.weight.grad.abs().sum() > 0


def test_mse_on_logits_and_hidden_states(batch):
    model = prompt_model()
    rows, positions = full_positions(batch)
    inputs = labelled_inputs(model, batch, hidden=True)
    with model.disable_adapter():
        base_full = model(**batch, output_hidden_states=True)
    student_full = model(**batch).logits
    expected_logits = (student_full[rows, positions] - base_full.logits[rows, positions]).pow(2).mean(-1)
    torch.testing.assert_close(build_loss("mse", {})(inputs), expected_logits, atol=1e-5, rtol=1e-4)

    loss = build_loss("mse", {"target": "hidden_states"})
    assert loss.needs_hidden_states
    # independent: the prompt-tuned sequence puts 4 virtual tokens before the user's tokens, after padding
    adapted = model(**batch, output_hidden_states=True).hidden_states[-1]  # (B, 4 + L, D)
    pads = (batch["attention_mask"] == 0).sum(-1)
    shifted = torch.stack([torch.cat([h[:p], h[p + 4 :]]) for h, p in zip(adapted, pads, strict=True)])
    expected = (shifted[rows, positions] - base_full.hidden_states[-1][rows, positions]).pow(2).mean(-1)
    torch.testing.assert_close(loss(inputs), expected, atol=1e-5, rtol=1e-4)


def test_composite_weights_and_components(batch):
    @register_loss("test_logit_norm")
    def logit_norm(inputs, *, scale=1.0):
        return scale * inputs.logits.float().pow(2).mean()  # a scalar: read as a per-token mean

    model = prompt_model()
    inputs = labelled_inputs(model, batch)
    composite = CompositeLoss.from_config(
        [LossComponent(name="cross_entropy", weight=1.0), LossComponent(name="test_logit_norm", weight=0.5, scale=2.0)]
    )
    total, parts = composite(inputs)
    ce = F.cross_entropy(inputs.logits, inputs.targets, reduction="sum")
    norm = 2.0 * inputs.logits.pow(2).mean() * 6
    torch.testing.assert_close(parts["cross_entropy"], ce.detach())
    torch.testing.assert_close(parts["test_logit_norm"], norm.detach())
    torch.testing.assert_close(total, ce + 0.5 * norm)
    assert "test_logit_norm" in known_losses()


def test_unknown_loss_and_option():
    with pytest.raises(ValueError, match="unknown loss 'hinge'; known losses: cross_entropy, kl_divergence, mse"):
        build_loss("hinge", {})
    with pytest.raises(ValueError, match=r"loss 'mse' takes no option\(s\) \['tmp'\]; it takes: \['target', 'layer'"):
        build_loss("mse", {"tmp": 1})
    with pytest.raises(ValueError, match="target must be 'logits' or 'hidden_states'"):
        build_loss("mse", {"target": "probs"})
