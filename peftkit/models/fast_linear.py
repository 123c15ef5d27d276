"""Frozen fp32 linear layers through oneDNN on CPU: the base model's matmuls, about 2x faster.

PyTorch's CPU build sends an fp32 ``F.linear`` to MKL's sgemm. On AMD processors MKL does not use
its AVX-512 kernels; measured on this project's 2-core AMD EPYC (AVX-512): MKL 60-80 GFLOP/s,
oneDNN 150-250 GFLOP/s for the base model's shapes (``(B*S, 576) x (576, 1536)`` and the like).
oneDNN is PyTorch's own bundled library (the one its bf16 matmuls already use), called in full
fp32 (IEEE) precision: only the summation order changes.

While :func:`frozen_linear_on_onednn` is active (``run_base_model`` holds it around the base
model's call), every ``F.linear`` whose weight and bias are frozen, fp32 and on CPU, with at least
:data:`MIN_ROWS` input rows, goes through oneDNN, and so does its backward (the input gradient
``grad @ W``; a frozen weight gets no gradient, so none is computed). Anything else (trainable
weights such as LoRA's, bf16, autocast, few rows as in decoding) takes PyTorch's usual path.

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
    try:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(MIN_ROWS, 3, 24, generator=generator)
        weight, bias = torch.randn(40, 24, generator=generator), torch.randn(40, generator=generator)
        grad = torch.randn(MIN_ROWS, 3, 40, generator=generator)
        ok = torch.allclose(_onednn(x, weight, bias), F.linear(x, weight, bias), rtol=1e-4, atol=1e-4)
        return ok and torch.allclose(_onednn(grad, weight.t(), None), grad @ weight, rtol=1e-4, atol=1e-4)
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def _routable(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    return (
        x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.device.type == "cpu"
        and weight.device.type == "cpu"
        and not weight.requires_grad
        and (bias is None or (not bias.requires_grad and bias.dtype == torch.float32))
        and x.dim() >= 2
        and x.numel() >= MIN_ROWS * weight.shape[1]
        and not torch.is_autocast_enabled("cpu")
    )


class _RouteFrozenLinear(TorchFunctionMode):
    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if _routable(x, weight, bias):
                return _FrozenLinear.apply(x, weight, bias)
        return func(*args, **kwargs)


@contextlib.contextmanager
def frozen_linear_on_onednn(hidden: Tensor | None = None) -> Iterator[None]:
    """Route frozen fp32 CPU linear layers through oneDNN inside this block (a no-op where unavailable).

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
    with _RouteFrozenLinear():
        yield
