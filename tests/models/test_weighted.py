"""``add_weighted_adapter`` against PEFT as the oracle: the same source adapters (same seed) and the same seed
before the call give the same combined tensors and logits, for every combination type (DARE draws at random
from torch's global generator in PEFT's order, so seeding both libraries alike makes it comparable entry by
entry). Plus the exact identities the combinations promise, checked by hand."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch

import peftkit
from tests.conftest import tiny_model
from tests.methods.test_lora_layers import Net

IDS = torch.tensor([[5, 9, 33, 17, 64, 3], [7, 8, 9, 10, 11, 12]])
ALL_TYPES = [
    "linear",
    "cat",
    "svd",
    "ties",
    "ties_svd",
    "dare_linear",
    "dare_linear_svd",
    "dare_ties",
    "dare_ties_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
]


def build(lib, base, targets_a, targets_b, r_b=4, task_type="CAUSAL_LM"):
    """Two LoRA adapters ``a`` and ``b`` with random factors (the same draws in both libraries)."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lib.get_peft_model(
            base(),
            lib.LoraConfig(r=4, lora_alpha=8, target_modules=targets_a, init_lora_weights=False, task_type=task_type),
            adapter_name="a",
        )
        model.add_adapter(
            "b",
            lib.LoraConfig(r=r_b, lora_alpha=4, target_modules=targets_b, init_lora_weights=False, task_type=task_type),
        )
    return model


def lora_tensors(model, adapter: str) -> dict[str, torch.Tensor]:
    prefix = "base_model.model."
    return {
        n.removeprefix(prefix).replace(f".{adapter}", ""): p.detach()
        for n, p in model.named_parameters()
        if "lora_" in n and f".{adapter}" in n
    }


def assert_same_tensors(ours, theirs, adapter, tol):
    mine, reference = lora_tensors(ours, adapter), lora_tensors(theirs, adapter)
    assert set(mine) == set(reference) and mine
    for key in mine:
        torch.testing.assert_close(mine[key], reference[key], atol=tol, rtol=tol, msg=key)


def combine_both(ours, theirs, combination_type, weights=(0.7, -0.4), **options):
    for model in (ours, theirs):
        torch.manual_seed(7)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.add_weighted_adapter(["a", "b"], list(weights), "mix", combination_type=combination_type, **options)
        model.set_adapter("mix")


def llama_logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def options_for(combination_type: str) -> dict:
    return {"density": 0.5} if combination_type not in ("linear", "cat", "svd") else {}


@pytest.mark.parametrize("combination_type", ALL_TYPES)
def test_llama_every_combination_equals_peft(combination_type):
    targets = ["q_proj", "v_proj"]
    ours, theirs = build(peftkit, lambda: tiny_model("llama"), targets, targets), None
    theirs = build(peft, lambda: tiny_model("llama"), targets, targets)
    assert_same_tensors(ours, theirs, "b", 0)  # the sources agree to start with
    combine_both(ours, theirs, combination_type, **options_for(combination_type))
    assert_same_tensors(ours, theirs, "mix", 1e-5)
    torch.testing.assert_close(llama_logits(ours), llama_logits(theirs), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("combination_type", ["cat", "svd", "dare_ties_svd"])
def test_different_targets_and_ranks_combine_over_the_union(combination_type):
    ours = build(peftkit, lambda: tiny_model("llama"), ["q_proj", "v_proj"], ["q_proj", "o_proj"], r_b=2)
    theirs = build(peft, lambda: tiny_model("llama"), ["q_proj", "v_proj"], ["q_proj", "o_proj"], r_b=2)
    combine_both(ours, theirs, combination_type, svd_rank=3, **options_for(combination_type))
    assert sorted(ours.peft_config["mix"].target_modules) == ["o_proj", "q_proj", "v_proj"]
    assert_same_tensors(ours, theirs, "mix", 1e-5)
    torch.testing.assert_close(llama_logits(ours), llama_logits(theirs), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("combination_type", ["linear", "cat", "svd", "ties", "dare_linear_svd", "magnitude_prune_svd"])
def test_gpt2_conv1d_equals_peft(combination_type):
    ours = build(peftkit, lambda: tiny_model("gpt2"), ["c_attn"], ["c_attn"])
    theirs = build(peft, lambda: tiny_model("gpt2"), ["c_attn"], ["c_attn"])
    combine_both(ours, theirs, combination_type, **options_for(combination_type))
    assert_same_tensors(ours, theirs, "mix", 1e-5)
    torch.testing.assert_close(llama_logits(ours), llama_logits(theirs), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("combination_type", ["linear", "cat", "svd", "dare_ties"])
def test_embedding_and_conv2d_equal_peft(combination_type):
    targets = ["emb", "conv2", "head"]
    ours = build(peftkit, Net, targets, targets, task_type=None)
    theirs = build(peft, Net, targets, targets, task_type=None)
    combine_both(ours, theirs, combination_type, **options_for(combination_type))
    assert_same_tensors(ours, theirs, "mix", 1e-5)
    with torch.no_grad():
        torch.testing.assert_close(ours.get_base_model()(IDS), theirs.get_base_model()(IDS), atol=1e-5, rtol=1e-5)


def test_exact_identities():
    """``cat`` is exactly ``Σ w_i ΔW_i``; ``svd`` at full rank too; one adapter ``linear`` is ``w ΔW``."""
    model = build(peftkit, lambda: tiny_model("llama"), ["q_proj"], ["q_proj"], r_b=2)
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    adapters = model.adapters
    expected = 0.7 * adapters["a"].lora_weight(layer) - 0.4 * adapters["b"].lora_weight(layer)
    model.add_weighted_adapter(["a", "b"], [0.7, -0.4], "cat", combination_type="cat")
    model.add_weighted_adapter(["a", "b"], [0.7, -0.4], "svd", combination_type="svd", svd_rank=6)
    model.add_weighted_adapter(["a"], [-2.0], "one", combination_type="ties")
    assert adapters["cat"].config.r == 6 and adapters["cat"].scaling[layer.path] == 1.0
    torch.testing.assert_close(adapters["cat"].lora_weight(layer), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(adapters["svd"].lora_weight(layer), expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(adapters["one"].lora_weight(layer), -2.0 * adapters["a"].lora_weight(layer))


def test_refusals_name_the_problem():
    model = build(peftkit, lambda: tiny_model("llama"), ["q_proj"], ["q_proj"], r_b=2)
    with pytest.raises(ValueError, match="'a' already exists"):
        model.add_weighted_adapter(["a", "b"], [1, 1], "a")
    with pytest.raises(ValueError, match="needs adapters of one rank; got {'a': 4, 'b': 2}"):
        model.add_weighted_adapter(["a", "b"], [1, 1], "m", combination_type="linear")
    with pytest.raises(ValueError, match="needs density in"):
        model.add_weighted_adapter(["a", "b"], [1, 1], "m", combination_type="ties_svd")
    with pytest.raises(ValueError, match="one weight per adapter"):
        model.add_weighted_adapter(["a", "b"], [1], "m")
    with pytest.raises(ValueError, match="combination_type='mean' is not supported"):
        model.add_weighted_adapter(["a", "b"], [1, 1], "m", combination_type="mean")
    model.add_adapter("ia3", peftkit.IA3Config(target_modules=["q_proj"], feedforward_modules=[]))
    with pytest.raises(ValueError, match="combines LoRA adapters; 'ia3' is IA3Config"):
        model.add_weighted_adapter(["a", "ia3"], [1, 1], "m", combination_type="cat")
    assert "m" not in model.adapters


def test_dare_is_random_so_the_seed_matters():
    """The equality with PEFT above is not vacuous: DARE with another seed gives other tensors."""
    model = build(peftkit, lambda: tiny_model("llama"), ["q_proj"], ["q_proj"])
    for name, seed in (("x", 7), ("y", 7), ("z", 8)):
        torch.manual_seed(seed)
        model.add_weighted_adapter(["a", "b"], [0.7, -0.4], name, combination_type="dare_linear", density=0.5)
    x, y, z = (lora_tensors(model, n) for n in "xyz")
    assert all(torch.equal(x[k], y[k]) for k in x)
    assert not all(torch.equal(x[k], z[k]) for k in x)
