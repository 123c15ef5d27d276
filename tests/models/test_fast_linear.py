"""Frozen fp32 linear layers through oneDNN: the same values and input gradients as ``F.linear``; under
bf16 autocast, cached bf16 weights and fp32 attention."""

from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F

from peftkit import PromptTuningConfig, get_peft_model
from peftkit.models import fast_linear
from peftkit.models.fast_linear import MIN_ROWS, frozen_linear_on_onednn, onednn_linear_available
from tests.conftest import tiny_model

pytestmark = pytest.mark.skipif(not onednn_linear_available(), reason="oneDNN routing unavailable here")


def routed_name(y: torch.Tensor) -> str:
    return type(y.grad_fn).__name__


def test_values_and_input_gradient_match_f_linear():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, MIN_ROWS, 48, generator=gen, dtype=torch.float64).float().requires_grad_()
    weight, bias = torch.randn(80, 48, generator=gen), torch.randn(80, generator=gen)
    grad = torch.randn(2, MIN_ROWS, 80, generator=gen)
    with frozen_linear_on_onednn():
        y = F.linear(x, weight, bias)
    assert "FrozenLinear" in routed_name(y)
    (gx,) = torch.autograd.grad(y, x, grad)
    torch.testing.assert_close(y, (x.double() @ weight.double().T + bias.double()).float(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gx, (grad.double() @ weight.double()).float(), rtol=1e-5, atol=1e-4)


def test_trainable_bf16_and_few_row_calls_keep_the_default_path():
    x = torch.randn(MIN_ROWS, 8, requires_grad=True)
    trainable = torch.randn(4, 8, requires_grad=True)
    with frozen_linear_on_onednn():
        y_trainable = F.linear(x, trainable)
        y_bf16 = F.linear(x.bfloat16(), torch.randn(4, 8).bfloat16())
        y_few = F.linear(x[: MIN_ROWS - 1], torch.randn(4, 8))
    for y in (y_trainable, y_bf16, y_few):
        assert "FrozenLinear" not in routed_name(y)
    y_trainable.sum().backward()
    assert trainable.grad is not None  # a trainable weight still gets its gradient


def test_a_soft_prompt_trains_to_the_same_gradient(monkeypatch):
    """The routing sits in every PeftModel forward; with it off, the prompt gradient is the same."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_model("llama"), PromptTuningConfig(num_virtual_tokens=4))
    ids = torch.randint(3, 60, (4, 12))
    labels = ids.clone()
    calls = []
    onednn = fast_linear._onednn
    monkeypatch.setattr(fast_linear, "_onednn", lambda *a: calls.append(1) or onednn(*a))
    grads = []
    for enabled in (True, False):
        monkeypatch.setattr(fast_linear, "onednn_linear_available", lambda e=enabled: e)
        model.zero_grad()
        model(input_ids=ids, labels=labels).loss.backward()
        grads.append(model.prompt_encoder["default"].embedding.weight.grad.clone())
        assert bool(calls) == enabled  # forward and backward of every projection went through oneDNN
        calls.clear()
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_a_decoding_step_or_a_bf16_call_is_not_intercepted():
    x = torch.randn(MIN_ROWS, 8, requires_grad=True)
    weight = torch.randn(4, 8)
    for hidden in (torch.zeros(1, 1, 8), torch.zeros(2, MIN_ROWS, 8, dtype=torch.bfloat16)):
        with frozen_linear_on_onednn(hidden):
            assert "FrozenLinear" not in routed_name(F.linear(x, weight))
    with frozen_linear_on_onednn(torch.zeros(1, MIN_ROWS, 8)):
        assert "FrozenLinear" in routed_name(F.linear(x, weight))


def test_under_bf16_autocast_a_frozen_linear_uses_its_cached_bf16_copy():
    """Same values and input gradients as autocast's own cast-per-call path; the copy is made once and
    remade when the weight changes in place (a LoRA merge, say)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, MIN_ROWS, 48, generator=gen).requires_grad_()
    weight, bias = torch.randn(80, 48, generator=gen), torch.randn(80, generator=gen)
    grad = torch.randn(2, MIN_ROWS, 80, generator=gen, dtype=torch.bfloat16)
    outputs = []
    for routed in (True, False):
        with torch.autocast("cpu", torch.bfloat16), frozen_linear_on_onednn() if routed else nullcontext():
            y = F.linear(x, weight, bias)
        assert ("FrozenLinearBF16" in routed_name(y)) == routed
        outputs.append((y, *torch.autograd.grad(y, x, grad)))
    (y, gx), (y_ref, gx_ref) = outputs
    assert y.dtype == y_ref.dtype == torch.bfloat16 and gx.dtype == torch.float32
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-6, atol=1e-6)
    copy = fast_linear.bf16_copy(weight)
    assert fast_linear.bf16_copy(weight) is copy
    weight.add_(1.0)
    torch.testing.assert_close(fast_linear.bf16_copy(weight), weight.bfloat16(), rtol=0, atol=0)


def test_under_bf16_autocast_attention_with_gradients_runs_in_fp32():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 20, 16, generator=gen).requires_grad_() for _ in range(3))
    with torch.autocast("cpu", torch.bfloat16), frozen_linear_on_onednn():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        with torch.no_grad():  # inference keeps autocast's path
            assert F.scaled_dot_product_attention(q, k, v, is_causal=True).grad_fn is None
    assert out.dtype == torch.bfloat16 and "ToCopy" in routed_name(out)
    reference = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, reference.bfloat16(), rtol=0, atol=0)
    grads = torch.autograd.grad(out.float().sum(), (q, k, v))
    for grad, expected in zip(grads, torch.autograd.grad(reference.sum(), (q, k, v)), strict=True):
        torch.testing.assert_close(grad, expected, rtol=1e-6, atol=1e-6)


def test_a_soft_prompt_trains_to_nearly_the_same_gradient_under_bf16(monkeypatch):
    """The bf16 routes change only where rounding happens: the prompt gradient stays within bf16's error."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_model("llama"), PromptTuningConfig(num_virtual_tokens=4))
    ids = torch.randint(3, 60, (4, 12))
    grads = []
    for enabled in (True, False):
        monkeypatch.setattr(fast_linear, "onednn_linear_available", lambda e=enabled: e)
        model.zero_grad()
        with torch.autocast("cpu", torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads.append(model.prompt_encoder["default"].embedding.weight.grad.clone())
    scale = grads[1].abs().max()
    assert (grads[0] - grads[1]).abs().max() <= 0.05 * scale
