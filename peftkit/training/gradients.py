"""Gradient hooks: statistics of the real gradients, once per optimiser step (opt-in).

They run after the step's gradients are complete (all micro-batches accumulated, all processes
summed) and before clipping, on exactly the tensors the optimiser is about to apply. Results go
to the metrics log under ``grad/``:

==============  ===========================================================================
hook            metrics
==============  ===========================================================================
``norm``        ``grad/norm/<module>``: L2 norm of each module's gradients; ``grad/norm/total``
``distribution`` ``grad/dist/<module>/{mean,std,min,max,sparsity}`` over all gradient elements of
                the module (``std`` is the population standard deviation; ``sparsity`` the
                fraction of elements exactly zero)
``flow``        ``grad/flow/layer_<i>``: L2 norm of the gradients inside decoder layer ``i``
                (gradient flow by depth); ``grad/flow/outside_layers`` for the rest
``health``      ``grad/health/{vanishing,exploding,none,zero,nonfinite}``: how many trainable
                parameters have a gradient norm below / above the thresholds, no gradient at
                all, an all-zero gradient, or a NaN/inf; the names go in ``..._params``
==============  ===========================================================================

A module is a parameter's name without its last component (``...q_proj.lora_A.default``).

Register your own: ``register_gradient_hook("name", fn)`` with
``fn(grads: list[tuple[str, Tensor | None]], settings) -> dict[str, float | list[str]]``.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

NamedGrads = list[tuple[str, Tensor | None]]
GradientHook = Callable[[NamedGrads, Any], dict[str, Any]]
_HOOKS: dict[str, GradientHook] = {}
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


def register_gradient_hook(name: str, fn: GradientHook | None = None) -> Any:
    """Register ``fn(named_grads, settings) -> metrics`` under ``name`` (usable as a decorator)."""

    def add(function: GradientHook) -> GradientHook:
        _HOOKS[name] = function
        return function

    return add(fn) if fn is not None else add


def known_gradient_hooks() -> list[str]:
    return sorted(_HOOKS)


def trainable_gradients(model: nn.Module) -> NamedGrads:
    """``(name, grad)`` for every trainable parameter (``grad`` may be ``None``)."""
    return [(name, p.grad) for name, p in model.named_parameters() if p.requires_grad]


def run_gradient_hooks(names: Iterable[str], grads: NamedGrads, settings: Any) -> dict[str, Any]:
    """Run the named hooks; their metrics merged."""
    metrics: dict[str, Any] = {}
    for name in names:
        metrics.update(_HOOKS[name](grads, settings))
    return metrics


def module_of(parameter_name: str) -> str:
    return parameter_name.rsplit(".", 1)[0] if "." in parameter_name else parameter_name


def layer_of(parameter_name: str) -> int | None:
    match = _LAYER.search(parameter_name)
    return int(match.group(1)) if match else None


def _by_module(grads: NamedGrads) -> dict[str, list[Tensor]]:
    groups: dict[str, list[Tensor]] = defaultdict(list)
    for name, grad in grads:
        if grad is not None:
            groups[module_of(name)].append(grad.detach().float().reshape(-1))
    return groups


@register_gradient_hook("norm")
def gradient_norms(grads: NamedGrads, settings: Any = None) -> dict[str, float]:
    metrics = {f"grad/norm/{m}": torch.cat(g).norm().item() for m, g in _by_module(grads).items()}
    present = [g.detach().float().reshape(-1) for _, g in grads if g is not None]
    metrics["grad/norm/total"] = torch.cat(present).norm().item() if present else 0.0
    return metrics


@register_gradient_hook("distribution")
def gradient_distribution(grads: NamedGrads, settings: Any = None) -> dict[str, float]:
    metrics = {}
    for module, parts in _by_module(grads).items():
        values = torch.cat(parts)
        prefix = f"grad/dist/{module}"
        metrics[f"{prefix}/mean"] = values.mean().item()
        metrics[f"{prefix}/std"] = values.std(correction=0).item()
        metrics[f"{prefix}/min"] = values.min().item()
        metrics[f"{prefix}/max"] = values.max().item()
        metrics[f"{prefix}/sparsity"] = (values == 0).float().mean().item()
    return metrics


@register_gradient_hook("flow")
def gradient_flow(grads: NamedGrads, settings: Any = None) -> dict[str, float]:
    squares: dict[str, float] = defaultdict(float)
    for name, grad in grads:
        if grad is None:
            continue
        layer = layer_of(name)
        key = f"layer_{layer}" if layer is not None else "outside_layers"
        squares[key] += grad.detach().float().pow(2).sum().item()
    ordered = sorted(squares, key=lambda k: (k == "outside_layers", int(k[6:]) if k != "outside_layers" else 0))
    return {f"grad/flow/{k}": math.sqrt(squares[k]) for k in ordered}


@register_gradient_hook("health")
def gradient_health(grads: NamedGrads, settings: Any = None) -> dict[str, Any]:
    vanishing_at = getattr(settings, "vanishing_threshold", 1e-7)
    exploding_at = getattr(settings, "exploding_threshold", 1e3)
    found: dict[str, list[str]] = {k: [] for k in ("vanishing", "exploding", "none", "zero", "nonfinite")}
    for name, grad in grads:
        if grad is None:
            found["none"].append(name)
            continue
        values = grad.detach().float()
        if not torch.isfinite(values).all():
            found["nonfinite"].append(name)
            continue
        norm = values.norm().item()
        if norm == 0:
            found["zero"].append(name)
        elif norm < vanishing_at:
            found["vanishing"].append(name)
        elif norm > exploding_at:
            found["exploding"].append(name)
    metrics: dict[str, Any] = {"grad/health/params": len(grads)}
    for kind, names in found.items():
        metrics[f"grad/health/{kind}"] = len(names)
        if names:
            metrics[f"grad/health/{kind}_params"] = names
    return metrics
