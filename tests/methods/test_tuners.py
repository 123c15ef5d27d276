"""The machinery every weight adapter shares: targeting, the layer wrapper, file keys, merging safety."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

import peftkit
from peftkit import LoraConfig, PeftModel, get_peft_model
from peftkit.methods.tuners.layer import AdaptedLayer
from tests.conftest import tiny_model

IDS = torch.tensor([[5, 6, 7, 8, 9]])


def wrapped(model) -> list[str]:
    return [n for n, m in model.get_base_model().named_modules() if isinstance(m, AdaptedLayer)]


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


# ---------------------------------------------------------------------------------------- targeting
def test_names_match_path_tails(llama):
    model = get_peft_model(llama, LoraConfig(target_modules=["mlp.down_proj", "k_proj"]))
    assert wrapped(model) == [
        "model.layers.0.self_attn.k_proj",
        "model.layers.0.mlp.down_proj",
        "model.layers.1.self_attn.k_proj",
        "model.layers.1.mlp.down_proj",
    ]


def test_a_string_is_a_full_match_regex(llama):
    model = get_peft_model(llama, LoraConfig(target_modules=r".*\.1\.self_attn\.(q|o)_proj"))
    assert wrapped(model) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.o_proj"]
    with pytest.raises(ValueError, match="matches no module"):
        get_peft_model(tiny_model("llama"), LoraConfig(target_modules="q_proj"))  # not a full match


@pytest.mark.parametrize(
    ("arch", "expected"),
    [
        ("llama", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
        ("gpt2", {"c_attn", "c_proj", "c_fc"}),
    ],
)
def test_all_linear_skips_the_output_head(arch, expected):
    model = get_peft_model(tiny_model(arch), LoraConfig(target_modules="all-linear"))
    paths = wrapped(model)
    assert {p.rsplit(".", 1)[1] for p in paths} == expected
    assert len(paths) == 2 * (len(expected) + (1 if arch == "gpt2" else 0))  # GPT-2 has attn.c_proj and mlp.c_proj
    assert "lm_head" not in paths


def test_layers_to_transform_and_pattern(llama):
    config = LoraConfig(target_modules=["q_proj", "v_proj"], layers_to_transform=[1], layers_pattern="layers")
    expected = ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert wrapped(get_peft_model(llama, config)) == expected
    gpt2 = get_peft_model(tiny_model("gpt2"), LoraConfig(target_modules=["c_attn"], layers_to_transform=0))
    assert wrapped(gpt2) == ["transformer.h.0.attn.c_attn"]
    with pytest.raises(ValueError, match=r"matches no module in layers \[5\]"):
        get_peft_model(tiny_model("llama"), LoraConfig(target_modules=["q_proj"], layers_to_transform=[5]))


def test_exclude_modules(llama):
    model = get_peft_model(llama, LoraConfig(target_modules=["q_proj"], exclude_modules=["layers.0.self_attn.q_proj"]))
    assert wrapped(model) == ["model.layers.1.self_attn.q_proj"]


def test_default_targets_follow_peft_per_model_type():
    for arch, expected in {"llama": {"q_proj", "v_proj"}, "qwen2": {"q_proj", "v_proj"}, "gpt2": {"c_attn"}}.items():
        model = get_peft_model(tiny_model(arch), LoraConfig())
        assert set(model.peft_config["default"].target_modules) == expected


def test_config_validation_names_field_and_value():
    with pytest.raises(ValueError, match="r must be > 0, got 0"):
        LoraConfig(r=0)
    with pytest.raises(ValueError, match=r"bias='some' is not supported; use one of \['none', 'all', 'lora_only'\]"):
        LoraConfig(bias="some")
    with pytest.raises(ValueError, match="layers_to_transform=.* cannot be combined with a regex"):
        LoraConfig(target_modules=".*q_proj", layers_to_transform=[0])
    with pytest.raises(ValueError, match="init_lora_weights='loftq' is not supported by peftkit: LoftQ .* quantis"):
        LoraConfig(init_lora_weights="loftq")
    with pytest.raises(ValueError, match="extra"):
        LoraConfig(not_a_field=1)


def test_unsupported_peft_fields_accept_only_the_default():
    data = LoraConfig(target_modules=["q_proj"]).to_dict()
    assert peftkit.PeftConfig.from_dict(data | {"use_qalora": False}).r == 8
    with pytest.raises(ValueError, match="'use_qalora' is not supported"):
        peftkit.PeftConfig.from_dict(data | {"use_qalora": True})


# ---------------------------------------------------------------------------------------- modules_to_save
def test_modules_to_save_trains_a_copy_and_interoperates(tmp_path):
    torch.manual_seed(0)
    config = LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"], init_lora_weights=False)
    model = get_peft_model(tiny_model("llama"), config)
    original = model.base_model.lm_head.base_layer.weight.detach().clone()
    with torch.no_grad():
        model.base_model.lm_head.modules_to_save["default"].weight.add_(0.5)
    assert model.adapters["default"].num_parameters() == 2 * 4 * (32 + 32) + 128 * 32
    model.save_pretrained(tmp_path)
    assert "base_model.model.lm_head.weight" in load_file(tmp_path / "adapter_model.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    torch.testing.assert_close(logits(model), theirs(input_ids=IDS).logits, atol=1e-5, rtol=1e-5)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model), tiny_model("llama")(input_ids=IDS).logits, atol=0, rtol=0)
    plain = model.merge_and_unload()
    torch.testing.assert_close(plain.lm_head.weight, original + 0.5)


# ---------------------------------------------------------------------------------------- files
def test_keys_without_the_prefix_load_correctly_never_stay_at_init(tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, init_lora_weights=False))
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    save_file({k.removeprefix("base_model.model."): v for k, v in tensors.items()}, path, metadata={"format": "pt"})
    loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    torch.testing.assert_close(logits(loaded), logits(model), atol=0, rtol=0)
    # a key that matches nothing is an error, not a silent skip
    save_file({k.replace("q_proj", "qq_proj"): v for k, v in tensors.items()}, path, metadata={"format": "pt"})
    with pytest.raises(KeyError, match=r"unexpected keys \['base_model.model.model.layers.0.self_attn.qq_proj"):
        PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    save_file({k: v[:2] if k.endswith("lora_A.weight") else v for k, v in tensors.items()}, path)
    with pytest.raises(ValueError, match=r"has shape \(2, 32\), expected \(4, 32\)"):
        PeftModel.from_pretrained(tiny_model("llama"), tmp_path)


def test_peft_base_weight_copies_are_checked(tmp_path):
    """PEFT saves ``lm_head.base_layer.weight`` when it targets an output layer; equal copies are fine."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(tiny_model("gpt2"), peft.LoraConfig(r=2, target_modules=["lm_head"]))
        theirs.save_pretrained(tmp_path)
    assert "base_model.model.lm_head.base_layer.weight" in load_file(tmp_path / "adapter_model.safetensors")
    PeftModel.from_pretrained(tiny_model("gpt2"), tmp_path)
    with pytest.raises(ValueError, match="differ from this base model"):
        PeftModel.from_pretrained(tiny_model("gpt2", seed=1), tmp_path)


# ---------------------------------------------------------------------------------------- merging
def test_safe_merge_refuses_nan_and_leaves_weights_untouched(llama):
    torch.manual_seed(0)
    model = get_peft_model(llama, LoraConfig(r=4, init_lora_weights=False))
    before = {n: p.detach().clone() for n, p in model.base_model.named_parameters()}
    with torch.no_grad():
        model.base_model.model.model.layers[1].self_attn.v_proj.lora_B["default"].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/inf.*nothing was merged"):
        model.merge_adapter(safe_merge=True)
    assert not model.adapters["default"].merged
    for name, param in model.base_model.named_parameters():
        if "lora_" not in name:
            assert torch.equal(param, before[name]), name


def test_merged_adapters_refuse_per_row_mixing_and_disabling(llama):
    model = get_peft_model(llama, LoraConfig(r=4, init_lora_weights=False))
    model.merge_adapter()
    with pytest.raises(RuntimeError, match="merged into the weights"), model.disable_adapter():
        model(input_ids=IDS)
    with pytest.raises(RuntimeError, match="merged into the weights"):
        model(input_ids=IDS.expand(2, -1), adapter_names=["default", "__base__"])
    model.unmerge_adapter()
    model(input_ids=IDS.expand(2, -1), adapter_names=["default", "__base__"])


def test_merge_into_a_tied_weight_is_refused():
    model = get_peft_model(tiny_model("gpt2"), LoraConfig(r=2, target_modules=["lm_head"], init_lora_weights=False))
    with pytest.raises(ValueError, match=r"lm_head: its weight is tied to transformer\.wte\.weight"):
        model.merge_adapter()
    assert not model.adapters["default"].merged


def test_delete_adapter_restores_the_original_model(llama):
    reference = {k: v.clone() for k, v in llama.state_dict().items()}
    model = get_peft_model(llama, LoraConfig(r=4, init_lora_weights=False))
    model.add_adapter("second", peftkit.IA3Config(init_ia3_weights=False))
    model.merge_adapter(["default"])
    model.delete_adapter("default")
    model.delete_adapter("second")
    assert wrapped(model) == []
    assert llama.state_dict().keys() == reference.keys()
    for key, value in llama.state_dict().items():
        torch.testing.assert_close(value, reference[key], atol=1e-6, rtol=1e-6)


def test_unload_returns_the_untouched_base(llama):
    reference = logits(get_peft_model(tiny_model("llama"), LoraConfig()).base_model)
    model = get_peft_model(llama, LoraConfig(r=4, init_lora_weights=False))
    model.merge_adapter()
    base = model.unload()
    assert not any(isinstance(m, AdaptedLayer) for m in base.modules())
    torch.testing.assert_close(base(input_ids=IDS).logits, reference, atol=1e-5, rtol=1e-5)


def test_soft_prompts_cannot_be_merged(llama):
    model = get_peft_model(llama, peftkit.PromptTuningConfig(num_virtual_tokens=2))
    with pytest.raises(TypeError, match=r"\['default'\] cannot be merged"):
        model.merge_adapter(["default"])
    model.merge_adapter()  # nothing mergeable is active: a no-op


# ---------------------------------------------------------------------------------------- routing
def test_calling_the_base_model_directly_applies_the_active_adapters(llama):
    model = get_peft_model(llama, LoraConfig(r=4, init_lora_weights=False))
    model.add_adapter("other", LoraConfig(r=2, init_lora_weights=False))
    via_wrapper = logits(model)
    with torch.no_grad():
        torch.testing.assert_close(model.base_model(input_ids=IDS).logits, via_wrapper)
        model.set_adapter("other")
        torch.testing.assert_close(model.base_model(input_ids=IDS).logits, logits(model))
        model.set_adapter(["default", "other"])
        both = model.base_model(input_ids=IDS).logits
    assert not torch.allclose(both, via_wrapper, atol=1e-4)
    torch.testing.assert_close(both, logits(model))


def test_two_adapters_on_one_layer_add_up(llama):
    """Independent computation: the q_proj output is W x + s₁B₁A₁x + s₂B₂A₂x."""
    model = get_peft_model(llama, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    model.add_adapter("b", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False))
    model.set_adapter(["default", "b"])
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 5, 32)
    expected = layer.base_layer(x)
    for name, scale in (("default", 8 / 4), ("b", 4 / 2)):
        expected = expected + scale * x @ layer.lora_A[name].weight.T @ layer.lora_B[name].weight.T
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
