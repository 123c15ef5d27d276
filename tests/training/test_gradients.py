"""Gradient hooks on a hand-built model with hand-set gradients, against numpy."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from peftkit.training.config import GradientHooksConfig
from peftkit.training.gradients import (
    known_gradient_hooks,
    layer_of,
    register_gradient_hook,
    run_gradient_hooks,
    trainable_gradients,
)


class HandBuilt(nn.Module):
    """``layers.0.attn``, ``layers.1.attn`` and ``layers.1.mlp`` (adapter-like), a ``head``, a frozen
    ``embed``, and parameters whose gradients are missing, zero, tiny, huge or NaN."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.ModuleDict({"attn": nn.Linear(3, 2, bias=False)}) for _ in range(2)])
        self.layers[1]["mlp"] = nn.Linear(2, 2)
        self.head = nn.Linear(2, 1, bias=False)
        self.embed = nn.Embedding(4, 2).requires_grad_(False)
        self.unused = nn.Parameter(torch.ones(2))
        self.dead = nn.Parameter(torch.ones(3))
        self.tiny = nn.Parameter(torch.ones(2))
        self.huge = nn.Parameter(torch.ones(2))
        self.broken = nn.Parameter(torch.ones(2))


GRADS = {
    "layers.0.attn.weight": [[1.0, -2.0, 0.0], [0.5, 0.0, 3.0]],
    "layers.1.attn.weight": [[0.0, 0.0, 1.0], [-1.0, 2.0, 2.0]],
    "layers.1.mlp.weight": [[4.0, 0.0], [0.0, -3.0]],
    "layers.1.mlp.bias": [1.0, -1.0],
    "head.weight": [[0.25, -0.75]],
    "dead": [0.0, 0.0, 0.0],
    "tiny": [1e-9, -1e-9],
    "huge": [3e3, 4e3],
    "broken": [1.0, float("nan")],
}


@pytest.fixture
def grads():
    model = HandBuilt()
    for name, param in model.named_parameters():
        if name in GRADS:
            param.grad = torch.tensor(GRADS[name])
    return trainable_gradients(model)


def values(*names):
    return np.concatenate([np.asarray(GRADS[n], dtype=np.float64).ravel() for n in names])


def test_trainable_only_and_none_kept(grads):
    names = [n for n, _ in grads]
    assert "embed.weight" not in names
    assert dict(grads)["unused"] is None


def test_per_module_norms(grads):
    metrics = run_gradient_hooks(["norm"], grads, None)
    assert metrics["grad/norm/layers.0.attn"] == pytest.approx(np.linalg.norm(values("layers.0.attn.weight")))
    assert metrics["grad/norm/layers.1.mlp"] == pytest.approx(
        np.linalg.norm(values("layers.1.mlp.weight", "layers.1.mlp.bias"))
    )
    assert metrics["grad/norm/head"] == pytest.approx(0.790569, rel=1e-5)  # sqrt(0.25² + 0.75²)
    assert "grad/norm/unused" not in metrics and math.isnan(metrics["grad/norm/total"])  # the NaN propagates


def test_distribution(grads):
    metrics = run_gradient_hooks(["distribution"], grads, None)
    v = values("layers.1.mlp.weight", "layers.1.mlp.bias")
    prefix = "grad/dist/layers.1.mlp"
    assert metrics[f"{prefix}/mean"] == pytest.approx(v.mean())
    assert metrics[f"{prefix}/std"] == pytest.approx(v.std())  # population std
    assert metrics[f"{prefix}/min"] == -3.0 and metrics[f"{prefix}/max"] == 4.0
    assert metrics[f"{prefix}/sparsity"] == pytest.approx(2 / 6)
    assert metrics["grad/dist/dead/sparsity"] == 1.0


def test_flow_by_layer_depth(grads):
    metrics = run_gradient_hooks(["flow"], [(n, g) for n, g in grads if n != "broken"], None)
    assert list(metrics) == ["grad/flow/layer_0", "grad/flow/layer_1", "grad/flow/outside_layers"]
    assert metrics["grad/flow/layer_0"] == pytest.approx(np.linalg.norm(values("layers.0.attn.weight")))
    layer_1 = values("layers.1.attn.weight", "layers.1.mlp.weight", "layers.1.mlp.bias")
    assert metrics["grad/flow/layer_1"] == pytest.approx(np.linalg.norm(layer_1))
    outside = values("head.weight", "dead", "tiny", "huge")
    assert metrics["grad/flow/outside_layers"] == pytest.approx(np.linalg.norm(outside))
    assert layer_of("base_model.model.model.layers.12.self_attn.q_proj.lora_A.default.weight") == 12
    assert layer_of("transformer.h.3.attn.c_attn.weight") == 3
    assert layer_of("prompt_encoder.default.embedding.weight") is None


def test_health(grads):
    settings = GradientHooksConfig(vanishing_threshold=1e-6, exploding_threshold=1e3)
    metrics = run_gradient_hooks(["health"], grads, settings)
    assert metrics["grad/health/params"] == 10
    assert metrics["grad/health/none_params"] == ["unused"]
    assert metrics["grad/health/zero_params"] == ["dead"]
    assert metrics["grad/health/vanishing_params"] == ["tiny"]
    assert metrics["grad/health/exploding_params"] == ["huge"]  # norm 5000
    assert metrics["grad/health/nonfinite_params"] == ["broken"]
    assert [metrics[f"grad/health/{k}"] for k in ("none", "zero", "vanishing", "exploding", "nonfinite")] == [1] * 5
    relaxed = run_gradient_hooks(["health"], grads, GradientHooksConfig(exploding_threshold=1e4))
    assert relaxed["grad/health/exploding"] == 0 and "grad/health/exploding_params" not in relaxed


def test_custom_hook(grads):
    @register_gradient_hook("test_count")
    def count(named, settings):
        return {"grad/test/with_grad": sum(g is not None for _, g in named)}

    assert "test_count" in known_gradient_hooks()
    assert run_gradient_hooks(["test_count"], grads, None) == {"grad/test/with_grad": 9}
