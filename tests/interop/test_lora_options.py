"""LoRA options against PEFT as the oracle: the same seed before ``get_peft_model`` in both libraries gives
the same adapter tensors, the same base weights (PiSSA / OLoRA change them), the same logits, and the
same logits after save/load in both directions (peftkit writes → PEFT loads, PEFT writes → peftkit loads)."""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file

import peftkit
from tests.conftest import tiny_model

IDS = torch.tensor([[5, 9, 33, 17, 64, 3], [7, 8, 9, 10, 11, 12]])
INITS = [True, "gaussian", "pissa", "pissa_niter_2", "olora", "orthogonal"]
#: PEFT 0.21's OLoRA factorises GPT-2's Conv1D weight as stored, (in, out), so its A is (r, out) and the
#: forward pass fails; peftkit factorises the (out, in) weight (checked against the formula instead).
PEFT_BROKEN = {("olora", "gpt2")}


def test_peft_olora_breaks_on_conv1d_and_peftkit_does_not():
    theirs = build(peft, "gpt2", init_lora_weights="olora")
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        logits(theirs)
    ours = build(peftkit, "gpt2", init_lora_weights="olora")
    torch.testing.assert_close(logits(ours), tiny_model("gpt2")(input_ids=IDS).logits, atol=1e-4, rtol=1e-4)
    layer = ours.get_base_model().transformer.h[0].attn.c_attn
    weight = tiny_model("gpt2").transformer.h[0].attn.c_attn.weight.t()  # (out, in)
    q, upper = torch.linalg.qr(weight)
    torch.testing.assert_close(layer.lora_A["default"].weight, upper[:4])
    torch.testing.assert_close(layer.lora_B["default"].weight, q[:, :4])
    torch.testing.assert_close(layer.base_layer.weight.t(), weight - 2 * q[:, :4] @ upper[:4], atol=1e-6, rtol=1e-5)


def targets(arch: str) -> list[str]:
    return ["c_attn", "mlp.c_proj"] if arch == "gpt2" else ["q_proj", "v_proj", "down_proj"]


def build(lib, arch: str, seed: int = 0, **options):
    torch.manual_seed(seed)
    config = lib.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": targets(arch), **options})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lib.get_peft_model(tiny_model(arch), config)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def tensors(model, kind: str) -> dict[str, torch.Tensor]:
    """``kind="lora"``: adapter tensors; ``"base"``: the base weights of the wrapped layers."""
    found = {}
    for name, param in model.named_parameters():
        prefix = "base_model.model."
        name = name.removeprefix(prefix).replace(".default", "").replace("_vector.weight", "_vector")
        if kind == "all" or ((kind == "lora") == ("lora_" in name) and (kind == "lora" or ".base_layer." in name)):
            found[name] = param.detach()
    return found


def assert_same(ours: dict, theirs: dict, tol: float = 0.0) -> None:
    assert set(ours) == set(theirs) and ours
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], atol=tol, rtol=tol, msg=key)


def perturb(model, seed: int) -> None:
    """Trained-looking adapter values (different per library, so a load that fails to apply shows)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _name, param in sorted(model.named_parameters()):
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("init", INITS)
def test_init_equals_peft(init, arch):
    if (init, arch) in PEFT_BROKEN:
        pytest.skip("PEFT fails here: see test_peft_olora_breaks_on_conv1d_and_peftkit_does_not")
    ours, theirs = build(peftkit, arch, init_lora_weights=init), build(peft, arch, init_lora_weights=init)
    tol = 1e-6 if init in ("pissa", "pissa_niter_2", "olora") else 0.0
    assert_same(tensors(ours, "lora"), tensors(theirs, "lora"), tol)
    assert_same(tensors(ours, "base"), tensors(theirs, "base"), tol)
    torch.testing.assert_close(logits(ours), logits(theirs), atol=1e-5, rtol=1e-5)
    # Every option but orthogonal starts as the original model (PiSSA / OLoRA: residual + adapter).
    if init != "orthogonal":
        torch.testing.assert_close(logits(ours), tiny_model(arch)(input_ids=IDS).logits, atol=1e-4, rtol=1e-4)
    changes_base = init in ("pissa", "pissa_niter_2", "olora")
    original = dict(tiny_model(arch).named_parameters())
    layer = next(iter(tensors(ours, "base"))).replace(".base_layer", "")
    assert (
        torch.equal(tensors(ours, "base")[layer.replace(".weight", ".base_layer.weight")], original[layer])
        != changes_base
    )


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("init", INITS)
def test_files_load_in_both_directions(tmp_path, init, arch):
    if (init, arch) in PEFT_BROKEN:
        pytest.skip("PEFT fails here: see test_peft_olora_breaks_on_conv1d_and_peftkit_does_not")
    ours, theirs = build(peftkit, arch, init_lora_weights=init), build(peft, arch, init_lora_weights=init)
    # What is written before training is the same in both libraries: the adapter as initialised, and the option.
    ours.save_pretrained(tmp_path / "ours0")
    theirs.save_pretrained(tmp_path / "theirs0")
    written, reference = (
        load_file(tmp_path / "ours0/adapter_model.safetensors"),
        load_file(tmp_path / "theirs0/adapter_model.safetensors"),
    )
    assert_same(written, reference, 1e-6)
    assert json.loads((tmp_path / "ours0/adapter_config.json").read_text())["init_lora_weights"] == init
    perturb(ours, 1)
    perturb(theirs, 2)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    # Loading redoes the initialisation on the (original) base model; seed it as at creation for pissa_niter.
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_loaded = peft.PeftModel.from_pretrained(tiny_model(arch), tmp_path / "ours")
    torch.manual_seed(0)
    ours_loaded = peftkit.PeftModel.from_pretrained(tiny_model(arch), tmp_path / "theirs")
    torch.testing.assert_close(logits(peft_loaded), logits(ours), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(ours_loaded), logits(theirs), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits(ours), logits(theirs), atol=1e-3)


def test_orthogonal_needs_an_even_rank():
    with pytest.raises(ValueError, match="orthogonal' needs an even rank, got r=3"):
        peftkit.get_peft_model(tiny_model("llama"), peftkit.LoraConfig(r=3, init_lora_weights="orthogonal"))


@pytest.mark.parametrize(
    ("init", "reason"),
    [("loftq", "quantised base model"), ("eva", "calibration data"), ("corda", "calibration data")],
)
def test_options_needing_quantisation_or_data_are_refused_with_the_reason(init, reason):
    with pytest.raises(ValueError, match=f"init_lora_weights='{init}' is not supported by peftkit: .*{reason}"):
        peftkit.LoraConfig(init_lora_weights=init)


@pytest.mark.parametrize("options", [{"use_dora": True}, {"use_rslora": True}, {"rank_pattern": {"v_proj": 2}}])
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_residual_inits_combine_with_other_options_as_in_peft(init, options):
    ours = build(peftkit, "llama", init_lora_weights=init, **options)
    theirs = build(peft, "llama", init_lora_weights=init, **options)
    assert_same(tensors(ours, "lora"), tensors(theirs, "lora"), 1e-5)
    assert_same(tensors(ours, "base"), tensors(theirs, "base"), 1e-6)
    perturb(ours, 1)
    perturb(theirs, 1)
    torch.testing.assert_close(logits(ours), logits(theirs), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------- layer_replication
def test_layer_replication_equals_peft(tmp_path):
    """[[0, 2], [1, 2]] on 2 layers gives 0 1 1: three decoder layers, the last two sharing layer 1's weights."""
    options = {"layer_replication": [[0, 2], [1, 2]], "init_lora_weights": False}
    ours, theirs = build(peftkit, "llama", **options), build(peft, "llama", **options)
    layers = ours.get_base_model().model.layers
    assert len(layers) == 3 and ours.get_base_model().config.num_hidden_layers == 3
    assert layers[2].mlp.up_proj.weight is layers[1].mlp.up_proj.weight  # shared, not copied
    assert [layer.self_attn.layer_idx for layer in layers] == [0, 1, 2]
    assert_same(tensors(ours, "lora"), tensors(theirs, "lora"))
    torch.testing.assert_close(logits(ours), logits(theirs), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits(ours), tiny_model("llama")(input_ids=IDS).logits, atol=1e-3)
    perturb(ours, 1)
    perturb(theirs, 2)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    assert json.loads((tmp_path / "ours/adapter_config.json").read_text())["layer_replication"] == [[0, 2], [1, 2]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_loaded = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "ours")
    ours_loaded = peftkit.PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "theirs")
    torch.testing.assert_close(logits(peft_loaded), logits(ours), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(ours_loaded), logits(theirs), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="cannot merge a LoRA adapter with layer_replication"):
        ours.merge_adapter()
    # A second adapter with the same map does not grow the model again; another map is refused.
    ours.add_adapter("again", peftkit.LoraConfig(target_modules=["q_proj"], layer_replication=[[0, 2], [1, 2]]))
    assert len(ours.get_base_model().model.layers) == 3
    with pytest.raises(ValueError, match="already replicated"):
        ours.add_adapter("other", peftkit.LoraConfig(target_modules=["q_proj"], layer_replication=[[0, 2]]))


def test_layer_replication_generates_like_a_full_forward():
    model = build(peftkit, "llama", layer_replication=[[0, 2], [1, 2]], init_lora_weights=False)
    out = model.generate(input_ids=IDS[:1], max_new_tokens=4, do_sample=False)
    with torch.no_grad():
        for step in range(4):
            prefix = out[:, : IDS.shape[1] + step]
            assert model(input_ids=prefix).logits[0, -1].argmax() == out[0, IDS.shape[1] + step]


def test_layer_replication_needs_a_known_layer_list():
    with pytest.raises(ValueError, match="layer_replication needs a decoder-layer list"):
        peftkit.get_peft_model(tiny_model("gpt2"), peftkit.LoraConfig(layer_replication=[[0, 1]]))
    with pytest.raises(ValueError, match="start < end"):
        peftkit.LoraConfig(layer_replication=[[2, 1]])


# ---------------------------------------------------------------------------------------- trainable_token_indices
TOKENS = {
    "llama": [3, 5, 7],  # untied head: only the embedding rows train
    "gpt2": [3, 5, 7],  # head tied to wte: it uses the same trained rows
    "gemma3": [3, 5, 7],  # tied, and embeddings scaled by √hidden
    "llama-dict": {"embed_tokens": [3, 5], "lm_head": [4, 9]},
}


@pytest.mark.parametrize("case", sorted(TOKENS))
def test_trainable_tokens_equal_peft(tmp_path, case):
    arch = case.split("-")[0]
    options = {"trainable_token_indices": TOKENS[case], "init_lora_weights": False}
    ours, theirs = build(peftkit, arch, **options), build(peft, arch, **options)
    assert_same(tensors(ours, "lora"), tensors(theirs, "lora"))
    delta = {k: v for k, v in tensors(ours, "all").items() if "trainable_tokens" in k}
    assert delta and sum(v.numel() for v in delta.values()) == sum(len(v) for v in _flat(TOKENS[case])) * 32
    perturb(ours, 1)
    perturb(theirs, 2)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    assert set(load_file(tmp_path / "ours/adapter_model.safetensors")) == set(
        load_file(tmp_path / "theirs/adapter_model.safetensors")
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_loaded = peft.PeftModel.from_pretrained(tiny_model(arch), tmp_path / "ours")
    ours_loaded = peftkit.PeftModel.from_pretrained(tiny_model(arch), tmp_path / "theirs")
    torch.testing.assert_close(logits(peft_loaded), logits(ours), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(ours_loaded), logits(theirs), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits(ours), logits(theirs), atol=1e-3)


def _flat(spec) -> list[list[int]]:
    return list(spec.values()) if isinstance(spec, dict) else [spec]


def test_trainable_tokens_train_only_their_rows_and_merge():
    model = build(peftkit, "llama", trainable_token_indices=[3, 5], init_lora_weights=False)
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(input_ids=IDS, labels=IDS).loss.backward()
    optimizer.step()
    layer = model.get_base_model().model.embed_tokens
    delta = layer.token_adapter["default"].trainable_tokens_delta
    assert not torch.equal(delta, layer.base_layer.weight[[3, 5]])  # trained
    assert torch.equal(layer.base_layer.weight, tiny_model("llama").model.embed_tokens.weight)  # base frozen
    model.eval()
    before = logits(model)
    model.merge_adapter()
    torch.testing.assert_close(logits(model), before, atol=1e-5, rtol=1e-5)
    assert torch.equal(layer.base_layer.weight[[3, 5]], delta.detach())
    model.unmerge_adapter()
    assert torch.equal(layer.base_layer.weight, tiny_model("llama").model.embed_tokens.weight)


def test_trainable_tokens_refusals():
    with pytest.raises(ValueError, match="ensure_weight_tying=True but trainable_token_indices gives the tied layers"):
        build(peftkit, "gpt2", trainable_token_indices={"wte": [3], "lm_head": [4]}, ensure_weight_tying=True)
    with pytest.raises(ValueError, match="also in target_modules or modules_to_save"):
        peftkit.get_peft_model(
            tiny_model("llama"),
            peftkit.LoraConfig(target_modules=["embed_tokens"], trainable_token_indices=[3]),
        )
    with pytest.raises(ValueError, match="distinct token ids in"):
        peftkit.get_peft_model(tiny_model("llama"), peftkit.LoraConfig(trainable_token_indices=[3, 3]))


# ---------------------------------------------------------------------------------------- ensure_weight_tying
TYING = {
    "targets": {"target_modules": ["embed_tokens", "q_proj"]},
    "modules_to_save": {"target_modules": ["q_proj"], "modules_to_save": ["embed_tokens"]},
}


@pytest.mark.parametrize("case", sorted(TYING))
def test_ensure_weight_tying_equals_peft(tmp_path, case):
    """Gemma3 ties lm_head to embed_tokens: with ensure_weight_tying the head follows the embedding's adapter."""
    options = {**TYING[case], "ensure_weight_tying": True, "init_lora_weights": False}
    ours, theirs = build(peftkit, "gemma3", **options), build(peft, "gemma3", **options)
    perturb(theirs, 2)
    theirs.save_pretrained(tmp_path / "theirs")
    ours_loaded = peftkit.PeftModel.from_pretrained(tiny_model("gemma3"), tmp_path / "theirs")
    torch.testing.assert_close(logits(ours_loaded), logits(theirs), atol=1e-5, rtol=1e-5)
    perturb(ours, 1)
    ours.save_pretrained(tmp_path / "ours")
    written = load_file(tmp_path / "ours/adapter_model.safetensors")
    reference = load_file(tmp_path / "theirs/adapter_model.safetensors")
    assert {k for k in written if ".base_layer." not in k} == {k for k in reference if ".base_layer." not in k}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_loaded = peft.PeftModel.from_pretrained(tiny_model("gemma3"), tmp_path / "ours")
    torch.testing.assert_close(logits(peft_loaded), logits(ours), atol=1e-5, rtol=1e-5)
    # The head really follows: its output changes with the embedding's adapter.
    head = ours.get_base_model().lm_head
    untied = torch.nn.functional.linear(torch.ones(1, 32), tiny_model("gemma3").lm_head.weight)
    assert not torch.allclose(head(torch.ones(1, 32)), untied, atol=1e-3)


def test_ensure_weight_tying_shares_one_set_of_factors():
    model = build(peftkit, "gemma3", target_modules=["embed_tokens"], ensure_weight_tying=True, init_lora_weights=False)
    embedding = model.get_base_model().model.embed_tokens
    a, b = embedding.lora_embedding_A["default"], embedding.lora_embedding_B["default"]
    assert model.get_nb_trainable_parameters()[0] == a.numel() + b.numel()
    update = model.adapters["default"].lora_weight(model.get_base_model().lm_head)
    torch.testing.assert_close(update, model.adapters["default"].lora_weight(embedding))  # ΔW_head = ΔW_embᵀ·ᵀ
    model(input_ids=IDS).logits.sum().backward()
    assert a.grad is not None and b.grad is not None


def test_ensure_weight_tying_without_anything_tied_warns():
    with pytest.warns(UserWarning, match="no layer of this model is tied"):
        peftkit.get_peft_model(tiny_model("llama"), peftkit.LoraConfig(ensure_weight_tying=True))
    with pytest.warns(UserWarning, match="ensure_weight_tying is False"):
        peftkit.get_peft_model(tiny_model("gemma3"), peftkit.LoraConfig(target_modules=["embed_tokens"]))
