"""LoraBank: each row's logits equal HF PEFT with that row's adapter alone (the oracle)."""

from __future__ import annotations

import copy
import threading

import peft
import pytest
import torch

from peftkit.serving.lora_bank import LoraBank
from tests.conftest import VOCAB, tiny_model

#: Eight LoRAs: different ranks, targets, layers, alphas, rsLoRA, rank/alpha patterns, the output head.
CONFIGS = {
    "qv2": {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]},
    "all8": {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"},
    "mlp1": {"r": 1, "lora_alpha": 3, "target_modules": ["gate_proj", "up_proj", "down_proj"]},
    "layer1": {"r": 4, "lora_alpha": 8, "target_modules": ["k_proj", "o_proj"], "layers_to_transform": [1]},
    "rs16": {"r": 16, "lora_alpha": 8, "target_modules": ["q_proj", "down_proj"], "use_rslora": True},
    "pattern": {
        "r": 4,
        "lora_alpha": 4,
        "target_modules": ["q_proj", "k_proj", "v_proj"],
        "rank_pattern": {"k_proj": 2},
        "alpha_pattern": {"v_proj": 12},
    },
    "head": {"r": 3, "lora_alpha": 5, "target_modules": ["lm_head", "o_proj"]},
    "regex": {"r": 6, "lora_alpha": 2, "target_modules": r".*\.0\.self_attn\.(q|v)_proj", "lora_dropout": 0.1},
}


def peft_adapter(base: torch.nn.Module, name: str, seed: int) -> tuple[dict, dict, torch.nn.Module]:
    """``(config dict, PEFT state dict, PEFT model)`` of a random LoRA (``B`` non-zero) on a copy of ``base``."""
    torch.manual_seed(seed)
    config = peft.LoraConfig(**CONFIGS[name], init_lora_weights=False)
    model = peft.get_peft_model(copy.deepcopy(base), config).eval()
    with torch.no_grad():  # B too: PEFT's init=False already randomises both; scale them to a visible effect
        for param in model.parameters():
            if param.requires_grad:
                param.mul_(0.5)
    state = {k: v.detach().clone() for k, v in peft.get_peft_model_state_dict(model).items()}
    return config.to_dict(), state, model


@pytest.fixture(scope="module")
def setup():
    base = tiny_model("llama")
    input_ids = torch.randint(3, VOCAB, (len(CONFIGS) + 2, 9), generator=torch.Generator().manual_seed(3))
    adapters, expected = {}, {}
    with torch.no_grad():
        bare = base(input_ids).logits
        for seed, name in enumerate(CONFIGS):
            config, state, model = peft_adapter(base, name, seed)
            adapters[name] = (config, state)
            expected[name] = model(input_ids).logits
    return base, input_ids, adapters, expected, bare


@pytest.fixture
def make_bank(setup):
    """Banks on the shared base model, closed after the test (their hooks removed) even when it fails."""
    banks: list[LoraBank] = []

    def make(**options) -> LoraBank:
        banks.append(LoraBank(setup[0], **options))
        return banks[-1]

    yield make
    for bank in banks:
        bank.close()


def logits(model, input_ids, bank, slots):
    with torch.no_grad(), bank.routing(torch.tensor(slots)):
        return model(input_ids).logits


def test_each_row_equals_peft_alone(setup, make_bank):
    base, input_ids, adapters, expected, bare = setup
    bank = make_bank()
    versions = [bank.add(name, *adapters[name]) for name in CONFIGS]
    assert versions == sorted(set(versions))
    names = list(CONFIGS)
    slots = [bank.slot(n) for n in names] + [-1, bank.slot("all8")]
    out = logits(base, input_ids, bank, slots)
    for row, name in enumerate(names):
        torch.testing.assert_close(out[row], expected[name][row], atol=1e-5, rtol=1e-5, msg=name)
    torch.testing.assert_close(out[len(names)], bare[len(names)], atol=0, rtol=0)
    torch.testing.assert_close(out[-1], expected["all8"][-1], atol=1e-5, rtol=1e-5)
    assert bank.capacity == 8 and set(bank.names()) == set(names)
    # A rank-1 LoRA padded to r_max = 16 stays exact; only targeted layers are hooked.
    assert bank._layers["model.layers.0.mlp.down_proj"].rank == 16
    assert "lm_head" in bank.layers


def test_outside_routing_and_all_minus_one_are_the_bare_model(setup, make_bank):
    base, input_ids, adapters, _, bare = setup
    bank = make_bank()
    bank.add("all8", *adapters["all8"])
    with torch.no_grad():
        torch.testing.assert_close(base(input_ids).logits, bare, atol=0, rtol=0)
    torch.testing.assert_close(logits(base, input_ids, bank, [-1] * len(input_ids)), bare, atol=0, rtol=0)
    bank.close()
    assert bank.layers == [] and not any(m._forward_hooks for m in base.modules())


def test_replace_and_remove(setup, make_bank):
    base, input_ids, adapters, expected, bare = setup
    bank = make_bank(initial_capacity=1)
    v1 = bank.add("x", *adapters["qv2"])
    bank.add("y", *adapters["mlp1"])
    assert bank.capacity == 2
    slot = bank.slot("x")
    v2 = bank.add("x", *adapters["layer1"])  # other targets, other rank: the old layers must be cleared
    assert v2 > v1 and bank.version("x") == v2 and bank.slot("x") == slot
    out = logits(base, input_ids, bank, [slot] * len(input_ids))
    torch.testing.assert_close(out, expected["layer1"], atol=1e-5, rtol=1e-5)
    assert "model.layers.0.self_attn.q_proj" not in bank.layers  # qv2's layers were dropped
    bank.remove("x")
    assert "x" not in bank and "y" in bank
    with pytest.raises(KeyError, match="no LoRA 'x'"):
        bank.slot("x")
    with pytest.raises(ValueError, match=r"slots \[0\] hold no LoRA"):
        logits(base, input_ids, bank, [slot] * len(input_ids))
    assert bank.add("z", *adapters["head"]) and bank.slot("z") == slot  # the freed slot is reused
    out = logits(base, input_ids, bank, [bank.slot("y")] * len(input_ids))
    torch.testing.assert_close(out, expected["mlp1"], atol=1e-5, rtol=1e-5)
    nbytes = bank.nbytes
    assert nbytes == sum(t.numel() * 4 for layer in bank._layers.values() for t in layer.weights)
    assert bank.nbytes_of("y") == sum(v.numel() * 4 for v in adapters["mlp1"][1].values())


def test_routing_is_per_thread(setup, make_bank):
    base, input_ids, adapters, expected, bare = setup
    bank = make_bank()
    bank.add("a", *adapters["all8"])
    bank.add("b", *adapters["rs16"])
    errors: list[BaseException] = []
    barrier = threading.Barrier(3)

    def run(slot: int, want: torch.Tensor) -> None:
        try:
            barrier.wait()
            for _ in range(15):
                torch.testing.assert_close(
                    logits(base, input_ids, bank, [slot] * len(input_ids)), want, atol=1e-5, rtol=1e-5
                )
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [
        threading.Thread(target=run, args=(bank.slot("a"), expected["all8"])),
        threading.Thread(target=run, args=(bank.slot("b"), expected["rs16"])),
        threading.Thread(target=run, args=(-1, bare)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[0]


def test_refusals(setup, make_bank):
    base, _, adapters, _, _ = setup
    bank = make_bank()
    config, state = adapters["qv2"]
    with pytest.raises(ValueError, match="use_dora=True is not supported"):
        bank.add("d", {**config, "use_dora": True}, state)
    with pytest.raises(ValueError, match="lora_bias"):
        bank.add("d", {**config, "lora_bias": True}, state)
    with pytest.raises(ValueError, match="DoRA"):
        bank.add("d", config, {**state, "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": 0})
    with pytest.raises(ValueError, match="embeddings"):
        bank.add("d", config, {"base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(2, VOCAB)})
    with pytest.raises(ValueError, match="unsupported key"):
        bank.add("d", config, {**state, "base_model.model.lm_head.weight": torch.zeros(VOCAB, 32)})
    with pytest.raises(ValueError, match="expected"):
        bank.add("d", {**config, "r": 3}, state)
    with pytest.raises(ValueError, match="is not LORA"):
        bank.add("d", {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 2}, state)
    gpt2 = tiny_model("gpt2")
    with pytest.raises(ValueError, match="nn.Linear only"):
        LoraBank(gpt2).add(
            "d",
            {"r": 2},
            {
                "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight": torch.zeros(2, 32),
                "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight": torch.zeros(96, 2),
            },
        )
    with pytest.raises(ValueError, match=r"routing\(\) takes a \(B,\)"), bank.routing(torch.zeros(2, 2).long()):
        pass
    assert len(bank) == 0 and bank.layers == []
