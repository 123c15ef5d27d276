"""CPU kernel choices for the frozen base model: its matmuls through oneDNN, about 2x faster.

PyTorch's CPU build sends an fp32 ``F.linear`` to MKL's sgemm. On AMD processors MKL does not use
its AVX-512 kernels; measured on this project's 2-core AMD EPYC (AVX-512): MKL 60-80 GFLOP/s,
oneDNN 150-250 GFLOP/s for the base model's shapes (``(B*S, 576) x (576, 1536)`` and the like).
oneDNN is PyTorch's own bundled library (the one its bf16 matmuls already use), called in full
fp32 (IEEE) precision: only the summation order changes.

While :func:`frozen_linear_on_onednn` is active (``run_base_model`` holds it around the base
model's call), every ``F.linear`` whose weight and bias are frozen, fp32 and on CPU, with at least
:data:`MIN_ROWS` input rows, goes through oneDNN, and so does its backward (the input gradient
``grad @ W``; a frozen weight gets no gradient, so none is computed). Anything else (trainable
weights such as LoRA's, bf16 inputs, few rows as in decoding) takes PyTorch's usual path.

Under CPU bfloat16 autocast (``precision: bf16``) the same block does two more things, both measured
on this CPU (AVX-512 BF16), which autocast alone does badly:

* a frozen fp32 weight is cast to bfloat16 once and the copy kept on the weight (recast when the
  weight changes in place, e.g. a LoRA merge), instead of autocast's cast on every call: the copies
  cost 2 bytes per frozen parameter;
* attention (``F.scaled_dot_product_attention``) with gradients runs in fp32: PyTorch's bfloat16
  flash-attention backward on CPU is 2-3x slower than its fp32 one at these short lengths, and the
  attention matmuls are a small part of the work. Its output is cast back to bfloat16, as autocast
  would give it.

``PEFTKIT_ONEDNN_LINEAR=0`` turns the routing off. It is also off where oneDNN is missing, or if a
one-time check against ``F.linear`` on a small input fails.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

MIN_ROWS = 16
"""Fewer input rows than this (token-by-token decoding) keep PyTorch's default path."""


def _onednn(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``x @ weight.T + bias`` through oneDNN; ``weight`` is ``(out, in)`` (any strides)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _FrozenLinear(torch.autograd.Function):
    """``F.linear`` with a frozen weight: the backward returns the input gradient only."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(weight)
        return _onednn(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None]:
        (weight,) = ctx.saved_tensors
        grad_x = _onednn(grad, weight.t(), None) if ctx.needs_input_grad[0] else None  # (..., in)
        return grad_x, None, None


@functools.cache
def onednn_linear_available() -> bool:
    """Whether the routing is allowed here and computes what ``F.linear`` computes (checked once)."""
    if os.environ.get("PEFTKIT_ONEDNN_LINEAR", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    try:  # (the first call may come under autocast, which would change what F.linear returns)
        with torch.autocast("cpu", enabled=False):
            return _agrees_with_f_linear()
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def _agrees_with_f_linear() -> bool:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(MIN_ROWS, 3, 24, generator=generator)
    weight, bias = torch.randn(40, 24, generator=generator), torch.randn(40, generator=generator)
    grad = torch.randn(MIN_ROWS, 3, 40, generator=generator)
    ok = torch.allclose(_onednn(x, weight, bias), F.linear(x, weight, bias), rtol=1e-4, atol=1e-4)
    return ok and torch.allclose(_onednn(grad, weight.t(), None), grad @ weight, rtol=1e-4, atol=1e-4)


class _FrozenLinearBF16(torch.autograd.Function):
    """``F.linear`` under bf16 autocast with a frozen fp32 weight, through its cached bf16 copy."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        weight16 = bf16_copy(weight)
        ctx.save_for_backward(weight16)
        ctx.input_dtype = x.dtype
        return F.linear(x.to(torch.bfloat16), weight16, None if bias is None else bf16_copy(bias))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None]:
        (weight16,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        return (grad.to(torch.bfloat16) @ weight16).to(ctx.input_dtype), None, None  # (..., in)


def bf16_copy(tensor: Tensor) -> Tensor:
    """A bfloat16 copy of a frozen ``tensor``, kept on it until the tensor changes in place."""
    key = (tensor._version, tensor.data_ptr())
    cached = getattr(tensor, "_peftkit_bf16", None)
    if cached is None or cached[0] != key:
        cached = (key, tensor.detach().to(torch.bfloat16))
        tensor._peftkit_bf16 = cached
    return cached[1]


def _frozen_fp32_cpu(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    return (
        weight.dtype == torch.float32
        and x.device.type == "cpu"
        and weight.device.type == "cpu"
        and not weight.requires_grad
        and (bias is None or (not bias.requires_grad and bias.dtype == torch.float32))
        and x.dim() >= 2
    )


def _bf16_autocast() -> bool:
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def _linear(args: tuple, kwargs: dict) -> Tensor | None:
    x, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    if not _frozen_fp32_cpu(x, weight, bias):
        return None
    if _bf16_autocast():  # any number of rows (the output head sees only the labelled ones)
        return _FrozenLinearBF16.apply(x, weight, bias)
    many_rows = x.numel() >= MIN_ROWS * weight.shape[1]
    if many_rows and x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu"):
        return _FrozenLinear.apply(x, weight, bias)
    return None


def _attention(args: tuple, kwargs: dict) -> Tensor | None:
    """fp32 attention for bf16 query/key/value on CPU that need gradients (see the module docstring)."""
    q, k, v = args[:3]
    lower = q.dtype == torch.bfloat16 or (_bf16_autocast() and q.dtype == torch.float32)  # bf16 either way
    if not (q.device.type == "cpu" and lower and torch.is_grad_enabled()):
        return None
    if not (q.requires_grad or k.requires_grad or v.requires_grad):
        return None
    rest = list(args[3:])
    mask = rest.pop(0) if rest else kwargs.pop("attn_mask", None)
    if mask is not None and mask.is_floating_point():
        mask = mask.float()
    with torch.autocast("cpu", enabled=False):
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), mask, *rest, **kwargs)
    return out.to(torch.bfloat16)


_ROUTES = {F.linear: _linear, F.scaled_dot_product_attention: _attention}


class _RouteFrozenBase(TorchFunctionMode):
    """Sends ``F.linear`` and ``F.scaled_dot_product_attention`` calls to :data:`_ROUTES`' choices."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        route = _ROUTES.get(func)
        if route is not None:
            out = route(args, kwargs)
            if out is not None:
                return out
        return func(*args, **kwargs)


@contextlib.contextmanager
def frozen_linear_on_onednn(hidden: Tensor | None = None) -> Iterator[None]:
    """Route frozen fp32 CPU linear layers through oneDNN inside this block, and under bf16 autocast
    use cached bf16 weights and fp32 attention (a no-op where oneDNN is unavailable).

    ``hidden``: the ``(B, S, D)`` input of the call, if known; when it is not fp32 on CPU or has
    fewer than :data:`MIN_ROWS` positions (a decoding step), nothing would be routed and the block
    does not even intercept calls (intercepting costs a few microseconds per torch call).
    """
    small = hidden is not None and (
        hidden.dtype != torch.float32 or hidden.device.type != "cpu" or hidden.numel() < MIN_ROWS * hidden.shape[-1]
    )
    if small or not onednn_linear_available():
        yield
        return
    with _RouteFrozenBase():
        yield
