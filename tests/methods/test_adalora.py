"""AdaLoRA: SVD-form update, orthogonal regularisation, and a rank budget really re-allocated during training."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from peft.tuners.adalora.layer import RankAllocator as PeftRankAllocator
from safetensors.torch import load_file

from peftkit import AdaLoraConfig, PeftModel, get_peft_model
from peftkit.data.batching import batches_forever, encode
from peftkit.methods.adalora import budget_schedule
from peftkit.training.loop import fit
from tests.conftest import tiny_model

BATCH = {"input_ids": torch.tensor([[5, 9, 33, 17, 64, 3], [7, 8, 9, 10, 11, 12]])}
LABELS = torch.tensor([[-100, -100, 33, 17, 64, 3], [-100, 8, 9, 10, 11, 12]])


def config(**changes) -> AdaLoraConfig:
    fields = {"init_r": 6, "target_r": 2, "tinit": 1, "tfinal": 2, "deltaT": 1, "total_step": 8}
    return AdaLoraConfig(target_modules=["q_proj", "v_proj"], **(fields | changes))


def train(model, steps: int, lr: float = 5e-2) -> None:
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    for step in range(steps):
        model(**BATCH, labels=LABELS).loss.backward()
        optimizer.step()
        model.after_optimizer_step(step)
        optimizer.zero_grad()
    model.eval()


def test_budget_follows_the_cubic_schedule():
    """Hand-computed from the paper's formula: b(t) = b_T + (b_0 - b_T)(1 - (t - t_i)/(T - t_f - t_i))³."""
    cfg = AdaLoraConfig(init_r=12, target_r=8, tinit=2, tfinal=3, deltaT=2, total_step=15)
    init, target = 24, 16  # two layers
    expected = {
        0: (24, False),
        2: (24, False),
        3: (21, False),  # 16 + 8 · 0.9³ = 21.83
        4: (20, True),  # 16 + 8 · 0.8³ = 20.10
        7: (17, False),  # 16 + 8 · 0.5³ = 17.0
        12: (16, True),  # t = T - t_f: 16 + 0
        13: (16, True),
    }
    for step, want in expected.items():
        assert budget_schedule(step, init, target, cfg) == want, step
    oracle = PeftRankAllocator.__new__(PeftRankAllocator)
    oracle.peft_config, oracle.init_bgt, oracle.target_bgt = cfg, init, target
    for step in range(16):
        assert budget_schedule(step, init, target, cfg) == oracle.budget_schedule(step), step


def test_ranks_are_pruned_to_the_target_budget(llama):
    torch.manual_seed(0)
    model = get_peft_model(llama, config())
    adapter = model.adapters["default"]
    assert sum(adapter.ranks().values()) == 0  # Λ starts at zero
    train(model, steps=8)
    ranks = adapter.ranks()
    assert sum(ranks.values()) <= 2 * len(ranks)  # target budget: target_r per layer
    pattern = model.peft_config["default"].rank_pattern
    assert set(pattern) == {f"{p}.lora_E" for p in ranks}
    assert sum(sum(kept) for kept in pattern.values()) == 2 * len(ranks)
    for path, kept in pattern.items():
        e = adapter.parts[path.removesuffix(".lora_E")]["lora_E"].detach().view(-1)
        assert torch.all(e[~torch.tensor(kept)] == 0)


def test_allocation_matches_peft_on_the_same_training(tmp_path):
    """Same weights, same losses, same SGD steps: the kept triplets and Λ equal PEFT's allocator."""
    torch.manual_seed(0)
    peft_config = peft.AdaLoraConfig(
        task_type="CAUSAL_LM",  # PEFT adds the orthogonal penalty only in its causal-LM wrapper
        target_modules=["q_proj", "v_proj"],
        init_r=6,
        target_r=2,
        tinit=1,
        tfinal=2,
        total_step=8,
        init_lora_weights=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(tiny_model("llama"), peft_config)
        theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(tiny_model("llama"), tmp_path, is_trainable=True)
    for model, hook in ((ours, ours.after_optimizer_step), (theirs, theirs.base_model.update_and_allocate)):
        model.train()
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for step in range(7):
            model(**BATCH, labels=LABELS).loss.backward()
            optimizer.step()
            hook(step)
            optimizer.zero_grad()
    theirs_pattern = {k.replace(".default", ""): v for k, v in theirs.peft_config["default"].rank_pattern.items()}
    assert ours.peft_config["default"].rank_pattern == theirs_pattern
    theirs_e = {n.split("layers.", 1)[1]: p for n, p in theirs.named_parameters() if "lora_E" in n}
    ours_e = {n.split("layers.", 1)[1]: p for n, p in ours.named_parameters() if "lora_E" in n}
    assert ours_e.keys() == theirs_e.keys()
    for name, param in ours_e.items():
        torch.testing.assert_close(param, theirs_e[name], atol=1e-5, rtol=1e-4)


def test_pruned_adapter_saves_only_kept_triplets_and_reloads_in_both_libraries(tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(tiny_model("llama"), config())
    train(model, steps=8)
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    ranks = model.adapters["default"].ranks()
    for path, rank in ranks.items():
        assert tensors[f"base_model.model.{path}.lora_E"].shape == (rank, 1)
        assert tensors[f"base_model.model.{path}.lora_A"].shape == (rank, 32)
    assert sum(ranks.values()) == 2 * len(ranks) and len(set(ranks.values())) > 1  # budget moved between layers
    reloaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    torch.testing.assert_close(reloaded(**BATCH).logits, model(**BATCH).logits, atol=1e-5, rtol=1e-4)
    assert reloaded.adapters["default"].num_parameters() == sum(
        r * (32 + o + 1)
        for r, o in zip([ranks[p] for p in ranks], [32 if "q_proj" in p else 16 for p in ranks], strict=True)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    torch.testing.assert_close(theirs(**BATCH).logits, model(**BATCH).logits, atol=1e-4, rtol=1e-4)


def test_final_phase_keeps_pruned_triplets_at_zero(llama):
    torch.manual_seed(0)
    model = get_peft_model(llama, config(total_step=6, tfinal=3))
    train(model, steps=9)  # three steps past the final allocation
    pattern = model.peft_config["default"].rank_pattern
    for path, kept in pattern.items():
        e = model.adapters["default"].parts[path.removesuffix(".lora_E")]["lora_E"].detach().view(-1)
        assert torch.all(e[~torch.tensor(kept)] == 0) and torch.any(e[torch.tensor(kept)] != 0)


def test_orthogonal_regularisation_is_added_to_the_loss(llama):
    torch.manual_seed(0)
    model = get_peft_model(llama, config(orth_reg_weight=0.3, init_lora_weights=False))
    out = model(**BATCH, labels=LABELS)
    with model.disable_adapter():
        pass
    penalties = []
    for parts in model.adapters["default"].parts.values():
        a, b = parts["lora_A"].detach(), parts["lora_B"].detach()
        penalties.append(torch.linalg.norm(a @ a.T - torch.eye(6)))
        penalties.append(torch.linalg.norm(b.T @ b - torch.eye(6)))
    logits = out.logits
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 128), LABELS[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, ce + 0.3 * torch.stack(penalties).mean(), atol=1e-5, rtol=1e-5)
    model.adapters["default"].freeze()
    torch.testing.assert_close(model(**BATCH, labels=LABELS).loss, ce, atol=1e-5, rtol=1e-5)


def test_fit_drives_the_allocator(char_tokenizer):
    torch.manual_seed(0)
    model = get_peft_model(tiny_model("llama"), config(total_step=6, tinit=0, tfinal=1))
    examples = [encode(char_tokenizer, f"q{i}", "z") for i in range(8)]
    fit(model, batches_forever(examples, 4, 0), steps=6, lr=1e-2, warmup_steps=1, progress=False)
    ranks = model.adapters["default"].ranks()
    assert sum(ranks.values()) == 2 * len(ranks)


def test_config_validation():
    with pytest.raises(ValueError, match="total_step must be set"):
        AdaLoraConfig()
    with pytest.raises(ValueError, match="r=4 is not used by AdaLoRA; set init_r"):
        AdaLoraConfig(r=4, total_step=10)
    with pytest.raises(ValueError, match="leave no budgeting phase"):
        AdaLoraConfig(tinit=5, tfinal=5, total_step=10)
    with pytest.raises(ValueError, match="target_r=20 must not exceed init_r=12"):
        AdaLoraConfig(target_r=20, total_step=10)
    with pytest.raises(ValueError, match=r"beta1 must be in \(0, 1\), got 1.0"):
        AdaLoraConfig(beta1=1.0, total_step=10)


def test_update_is_the_svd_form(llama):
    """Independent computation: ΔW = lora_alpha / init_r · P (Λ ⊙ Q)."""
    torch.manual_seed(0)
    model = get_peft_model(llama, config(init_lora_weights=False, lora_alpha=3))
    layer = model.base_model.model.model.layers[0].self_attn.v_proj
    x = torch.randn(2, 4, 32)
    a, e, b = layer.lora_A["default"], layer.lora_E["default"], layer.lora_B["default"]
    expected = layer.base_layer(x) + x @ (b @ (a * e)).T * 3 / (6 + 1e-5)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_init_r_larger_than_a_dimension(llama):
    model = get_peft_model(llama, AdaLoraConfig(init_r=40, target_r=20, total_step=4, target_modules=["v_proj"]))
    assert model.adapters["default"].num_parameters() == 2 * 40 * (32 + 16 + 1)
    train(model, steps=4)
    assert sum(model.adapters["default"].ranks().values()) == 40


def test_training_state_round_trip_restores_the_allocator(char_tokenizer):
    """The checkpoint hook carries the smoothed sensitivities and the kept pattern exactly."""
    torch.manual_seed(0)
    trained = get_peft_model(tiny_model("llama"), config(total_step=6, tinit=0, tfinal=2))
    examples = [encode(char_tokenizer, f"q{i}", "z") for i in range(8)]
    fit(trained, batches_forever(examples, 4, 0), steps=5, lr=1e-2, warmup_steps=1, progress=False)
    source = trained.adapters["default"]
    fresh = get_peft_model(tiny_model("llama"), config(total_step=6, tinit=0, tfinal=2)).adapters["default"]
    fresh.load_training_state_dict(source.training_state_dict())
    assert fresh.config.rank_pattern == source.config.rank_pattern
    assert source.allocator.exp_avg_ipt.keys() == fresh.allocator.exp_avg_ipt.keys()
    for key, value in source.allocator.exp_avg_ipt.items():
        assert torch.equal(fresh.allocator.exp_avg_ipt[key], value)
        assert torch.equal(fresh.allocator.exp_avg_unc[key], source.allocator.exp_avg_unc[key])
    with pytest.raises(KeyError, match="unexpected AdaLoRA training state"):
        fresh.load_training_state_dict({"bogus/x": torch.zeros(1)})
