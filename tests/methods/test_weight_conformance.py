"""The conformance matrix: every weight adapter × tiny Llama, Qwen2, Gemma3 and GPT-2, through the same
checks (as PEFT's test matrix does). HF PEFT is the oracle for files and logits; parameter counts are
the hand-written formulas of ``weight_cases.py``.

Adapters are initialised non-trivially (``init_*=False``), so every equality below would fail if an
adapter were silently ignored.
"""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch

import peftkit
from peftkit.methods.tuners.layer import AdaptedLayer
from tests.conftest import VOCAB, tiny_model
from tests.methods.weight_cases import CASE_BY_NAME, CASES, Case

INPUTS = {
    "input_ids": torch.tensor([[5, 9, 33, 17, 64, 3], [7, 8, 9, 10, 0, 0]]),
    "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]),
}
LABELS = torch.tensor([[-100, -100, 33, 17, 64, 3], [-100, 8, 9, 10, -100, -100]])
REAL = INPUTS["attention_mask"].bool()


@pytest.fixture(params=[c.name for c in CASES])
def case(request: pytest.FixtureRequest) -> Case:
    return CASE_BY_NAME[request.param]


def perturb(model: torch.nn.Module) -> torch.nn.Module:
    """Scale every trainable tensor by ``1 + 0.2·N(0, 1)`` elementwise, so no adapter tensor keeps a
    structured init (DoRA's magnitude would otherwise equal the weight norm, making it a plain LoRA)."""
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                noise = torch.randn(param.shape, generator=generator).to(param.device, param.dtype)
                param.mul_(1 + 0.2 * noise)
    return model


def make(case: Case, arch: str, seed: int = 0) -> peftkit.PeftModel:
    torch.manual_seed(seed)
    return perturb(peftkit.get_peft_model(tiny_model(arch), case.ours(arch)))


def logits(model, **extra) -> torch.Tensor:
    with torch.no_grad():
        return model(**INPUTS, **extra).logits


# ---------------------------------------------------------------------------------------- per cell
def test_forward_shape_and_parameter_count(case, arch):
    model = make(case, arch)
    assert logits(model).shape == (2, 6, VOCAB)
    trainable, _ = model.get_nb_trainable_parameters()
    adapter = model.adapters["default"]
    assert trainable == case.count(arch) == adapter.num_parameters()
    assert not adapter.is_frozen
    adapter.freeze()
    assert adapter.is_frozen and model.get_nb_trainable_parameters()[0] == 0
    adapter.unfreeze()
    assert model.get_nb_trainable_parameters()[0] == case.count(arch)


def test_training_changes_only_adapter_parameters(case, arch):
    model = make(case, arch)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(**INPUTS, labels=LABELS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = dict(model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == trainable
    assert all(".base_layer." not in n for n in trainable)


def test_save_load_round_trip(tmp_path, case, arch):
    model = make(case, arch)
    model.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["inference_mode"] is True and data["peft_type"] == model.peft_config["default"].peft_type
    config = peftkit.PeftConfig.from_pretrained(tmp_path)
    assert config.model_dump(exclude={"inference_mode", "peft_version"}) == model.peft_config["default"].model_dump(
        exclude={"inference_mode", "peft_version"}
    )
    loaded = peftkit.PeftModel.from_pretrained(tiny_model(arch), tmp_path)
    torch.testing.assert_close(logits(loaded), logits(model), atol=0, rtol=0)
    assert loaded.get_nb_trainable_parameters()[0] == 0
    resumed = peftkit.PeftModel.from_pretrained(tiny_model(arch), tmp_path, is_trainable=True)
    assert resumed.get_nb_trainable_parameters()[0] == case.count(arch)


def test_peftkit_files_load_in_peft(tmp_path, case, arch):
    torch.manual_seed(0)
    ours = perturb(peftkit.get_peft_model(tiny_model(arch), case.ours(arch, case.interop_targets(arch))))
    ours.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(tiny_model(arch), tmp_path)
    torch.testing.assert_close(logits(ours)[REAL], logits(theirs)[REAL], atol=case.tol, rtol=case.tol)
    assert not torch.allclose(logits(ours), logits(tiny_model(arch)), atol=1e-3)  # the adapter is not a no-op


def test_peft_files_load_in_peftkit(tmp_path, case, arch):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = perturb(peft.get_peft_model(tiny_model(arch), case.theirs(arch, case.interop_targets(arch))))
        theirs.save_pretrained(tmp_path)
    ours = peftkit.PeftModel.from_pretrained(tiny_model(arch), tmp_path)
    torch.testing.assert_close(logits(ours)[REAL], logits(theirs)[REAL], atol=case.tol, rtol=case.tol)
    with torch.no_grad():
        theirs_loss = theirs(**INPUTS, labels=LABELS).loss
    torch.testing.assert_close(ours(**INPUTS, labels=LABELS).loss, theirs_loss, atol=case.tol, rtol=case.tol)
    assert not torch.allclose(logits(ours), logits(tiny_model(arch)), atol=1e-3)


def test_merge_equals_unmerged_and_unmerge_restores(case, arch):
    model = make(case, arch)
    weights = {n: p.detach().clone() for n, p in model.base_model.named_parameters() if "base_layer" in n}
    unmerged = logits(model)
    model.merge_adapter(safe_merge=True)
    assert model.adapters["default"].merged
    torch.testing.assert_close(logits(model), unmerged, atol=case.tol * 10, rtol=case.tol * 10)
    model.unmerge_adapter()
    assert not model.adapters["default"].merged
    for name, param in model.base_model.named_parameters():
        if name in weights:
            torch.testing.assert_close(param, weights[name], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(model), unmerged, atol=1e-5, rtol=1e-5)
    plain = model.merge_and_unload(safe_merge=True)
    assert not any(isinstance(m, AdaptedLayer) for m in plain.modules())
    with torch.no_grad():
        torch.testing.assert_close(plain(**INPUTS).logits[REAL], unmerged[REAL], atol=case.tol * 10, rtol=case.tol * 10)


def test_disable_adapter_gives_the_base_output(case, arch):
    model = make(case, arch)
    base = tiny_model(arch)
    with model.disable_adapter():
        disabled = logits(model)
        with torch.no_grad():
            direct = model.base_model(**INPUTS).logits  # the wrapped base model called directly
    torch.testing.assert_close(disabled[REAL], logits(base)[REAL], atol=0, rtol=0)
    torch.testing.assert_close(direct, logits(base), atol=0, rtol=0)
    assert not torch.allclose(logits(model), disabled, atol=1e-3)


def test_bf16_model(case, arch):
    reference = logits(make(case, arch))
    torch.manual_seed(0)
    model = perturb(peftkit.get_peft_model(tiny_model(arch).to(torch.bfloat16), case.ours(arch)))
    out = logits(model)
    assert out.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.adapters["default"].adapter_parameters())
    assert (out.float() - reference).abs().max() < 0.25  # bf16 has ~3 significant digits
    model.merge_adapter()
    assert model.base_model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert torch.isfinite(logits(model).float()).all()


# ---------------------------------------------------------------------------------------- per method
def test_config_defaults_match_peft_and_round_trip(case):
    ours = type(case.ours("llama"))() if case.name != "adalora" else peftkit.AdaLoraConfig(total_step=10)
    theirs = type(case.theirs("llama"))() if case.name != "adalora" else peft.AdaLoraConfig(total_step=10)
    peft_defaults = theirs.to_dict()
    for name, value in ours.to_dict().items():
        if name in ("task_type", "peft_version", "peft_type"):
            continue
        assert value == peft_defaults[name], (name, value, peft_defaults[name])
    config = case.ours("llama")
    again = peftkit.PeftConfig.from_dict(json.loads(config.to_json_string()))
    assert type(again) is type(config)
    assert again.model_dump(exclude={"peft_version"}) == config.model_dump(exclude={"peft_version"})


def test_peft_written_configs_read_without_warnings(tmp_path, case):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.get_peft_model(tiny_model("llama"), case.theirs("llama")).save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = peftkit.PeftConfig.from_pretrained(tmp_path)
    assert type(config) is type(case.ours("llama"))


def test_peftkit_configs_read_in_peft_without_unknown_keys(tmp_path, case):
    make(case, "llama").save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    peft_fields = set(peft.PeftConfig.from_pretrained(tmp_path).to_dict())
    assert set(data) <= peft_fields, set(data) - peft_fields


def test_empty_target_list_fails_with_candidates(case, llama):
    with pytest.raises(ValueError, match=r"matches no module.*self_attn\.q_proj.*mlp\.down_proj"):
        peftkit.get_peft_model(llama, case.ours("llama", targets=[]) if case.name != "ia3" else _empty_ia3())


def _empty_ia3() -> peftkit.IA3Config:
    return peftkit.IA3Config(target_modules=[], feedforward_modules=[])


def test_unknown_target_fails_with_candidates(case, llama):
    config = case.ours("llama").model_copy(update={"target_modules": ["nope_proj"]})
    if case.name == "ia3":
        config = config.model_copy(update={"feedforward_modules": []})
    with pytest.raises(ValueError, match=r"\['nope_proj'\] matches no module.*Candidates"):
        peftkit.get_peft_model(llama, config)


def test_targets_a_module_type_it_cannot_wrap(case, llama):
    config = case.ours("llama").model_copy(update={"target_modules": ["q_proj", "input_layernorm"]})
    with pytest.raises(ValueError, match=r"cannot wrap.*LlamaRMSNorm.*Candidates"):
        peftkit.get_peft_model(llama, config)


def test_mixed_batch_rows_equal_per_row_runs(case, arch):
    model = make(case, arch)
    model.add_adapter("other", case.ours(arch))
    perturb(model)
    per_row = []
    for row, name in enumerate(["other", "__base__"]):
        single = {k: v[row : row + 1] for k, v in INPUTS.items()}
        if name == "__base__":
            with model.disable_adapter(), torch.no_grad():
                per_row.append(model(**single).logits)
        else:
            model.set_adapter(name)
            with torch.no_grad():
                per_row.append(model(**single).logits)
    mixed = logits(model, adapter_names=["other", "__base__"])
    torch.testing.assert_close(mixed[0], per_row[0][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1, :4], per_row[1][0, :4], atol=1e-5, rtol=1e-5)
