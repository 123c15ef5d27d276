"""LoRA on ``nn.Embedding``, ``nn.Conv1d`` and ``nn.Conv2d`` (beside Linear): PEFT as the oracle for the
initial tensors from a seed, the outputs, and the files in both directions; merge/unmerge; mixed batches."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import peftkit
from peftkit.methods.tuners.layer import AdaptedLayer
from tests.conftest import VOCAB, tiny_model

IDS = torch.tensor([[5, 9, 33, 17, 64, 3], [7, 8, 9, 10, 11, 12]])
TARGETS = ["emb", "conv1", "conv2", "head"]


class Net(nn.Module):
    """Embedding → Conv1d → Conv2d (strided, rectangular kernel) → Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8, padding_idx=0)
        self.conv1 = nn.Conv1d(8, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 4, (3, 1), stride=(2, 1), padding=(1, 0))
        self.head = nn.Linear(4, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.emb(ids).transpose(1, 2))  # (B, 6, L)
        h = self.conv2(h.unsqueeze(-1)).squeeze(-1)  # (B, 4, ceil(L/2))
        return self.head(h.transpose(1, 2))  # (B, ceil(L/2), 5)


def net(seed: int = 3) -> Net:
    torch.manual_seed(seed)
    return Net().eval()


def config(lib, **extra):
    return lib.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": TARGETS, "task_type": None, **extra})


def pair(init: bool | str = False, **extra):
    """The same seed before get_peft_model in both libraries."""
    torch.manual_seed(0)
    ours = peftkit.get_peft_model(net(), config(peftkit, init_lora_weights=init, **extra))
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(net(), config(peft, init_lora_weights=init, **extra))
    return ours, theirs


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        n.removeprefix("base_model.model.").removeprefix("base_model."): p.detach()
        for n, p in model.named_parameters()
        if "lora_" in n
    }


def out(model) -> torch.Tensor:
    with torch.no_grad():
        return model.get_base_model()(IDS)


@pytest.mark.parametrize("init", [True, False, "gaussian"])
def test_same_seed_gives_peft_tensors_and_outputs(init):
    ours, theirs = pair(init)
    mine, reference = adapter_tensors(ours), adapter_tensors(theirs)
    assert set(mine) == set(reference)
    assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in reference.items()}
    for key in mine:
        torch.testing.assert_close(mine[key], reference[key], atol=0, rtol=0, msg=key)
    torch.testing.assert_close(out(ours), out(theirs), atol=1e-6, rtol=1e-5)
    if init is False:
        assert not torch.allclose(out(ours), net()(IDS), atol=1e-3)


def test_shapes_and_keys_follow_peft(tmp_path):
    ours, _ = pair()
    ours.save_pretrained(tmp_path)
    shapes = {k: tuple(v.shape) for k, v in load_file(tmp_path / "adapter_model.safetensors").items()}
    assert shapes == {
        "base_model.model.emb.lora_embedding_A": (4, VOCAB),
        "base_model.model.emb.lora_embedding_B": (8, 4),
        "base_model.model.conv1.lora_A.weight": (4, 8, 3),
        "base_model.model.conv1.lora_B.weight": (6, 4, 1),
        "base_model.model.conv2.lora_A.weight": (4, 6, 3, 1),
        "base_model.model.conv2.lora_B.weight": (4, 4, 1, 1),
        "base_model.model.head.lora_A.weight": (4, 4),
        "base_model.model.head.lora_B.weight": (5, 4),
    }


@pytest.mark.parametrize("lora_bias", [False, True])
def test_files_load_in_both_directions(tmp_path, lora_bias):
    ours, theirs = pair(lora_bias=lora_bias, target_modules=["conv1", "conv2", "head"]) if lora_bias else pair()
    with torch.no_grad():  # trained-looking values, different in the two models
        for model, seed in ((ours, 1), (theirs, 2)):
            generator = torch.Generator().manual_seed(seed)
            for _, p in sorted(model.named_parameters()):
                if p.requires_grad:
                    p.add_(0.1 * torch.randn(p.shape, generator=generator))
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_loaded = peft.PeftModel.from_pretrained(net(), tmp_path / "ours")
    ours_loaded = peftkit.PeftModel.from_pretrained(net(), tmp_path / "theirs")
    torch.testing.assert_close(out(peft_loaded), out(ours), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out(ours_loaded), out(theirs), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(out(ours), out(theirs), atol=1e-3)


def test_merge_unmerge_and_merge_and_unload():
    ours, theirs = pair()
    before = out(ours)
    weights = {n: p.detach().clone() for n, p in ours.get_base_model().named_parameters() if "base_layer" in n}
    ours.merge_adapter(safe_merge=True)
    torch.testing.assert_close(out(ours), before, atol=1e-5, rtol=1e-5)
    theirs.merge_adapter()
    merged = {n: p for n, p in ours.get_base_model().named_parameters() if "base_layer" in n}
    for name, param in theirs.get_base_model().named_parameters():
        if name in merged:  # PEFT's merged weights: the same update
            torch.testing.assert_close(merged[name], param, atol=1e-6, rtol=1e-5)
    ours.unmerge_adapter()
    for name, param in ours.get_base_model().named_parameters():
        if name in weights:
            torch.testing.assert_close(param, weights[name], atol=1e-6, rtol=1e-5)
    plain = ours.merge_and_unload()
    assert not any(isinstance(m, AdaptedLayer) for m in plain.modules())
    with torch.no_grad():
        torch.testing.assert_close(plain(IDS), before, atol=1e-5, rtol=1e-5)


def test_unsupported_conv_settings_and_options_are_refused():
    class Grouped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, groups=2)

    with pytest.raises(ValueError, match=r"Conv2d 'conv' supports only the defaults of \['groups'\]"):
        peftkit.get_peft_model(Grouped(), peftkit.LoraConfig(target_modules=["conv"], task_type=None))
    with pytest.raises(ValueError, match="use_dora=True is not supported on Embedding"):
        peftkit.get_peft_model(net(), config(peftkit, use_dora=True))
    with pytest.raises(ValueError, match="lora_bias=True is not supported on Embedding"):
        peftkit.get_peft_model(net(), config(peftkit, lora_bias=True))
    with pytest.raises(ValueError, match="init_lora_weights='pissa' works on linear layers only; 'conv1'"):
        peftkit.get_peft_model(net(), config(peftkit, init_lora_weights="pissa"))


# ---------------------------------------------------------------------------- embeddings of real models
EMBEDDING = {"llama": "embed_tokens", "gemma3": "embed_tokens", "gpt2": "wte"}


@pytest.mark.parametrize("arch", sorted(EMBEDDING))
def test_embedding_lora_on_transformers_models_equals_peft(tmp_path, arch):
    """Gemma scales its embeddings by √hidden: the update is scaled too, as in PEFT. GPT-2 ties ``wte`` to its
    output head: the head keeps using the base weights."""
    targets = [EMBEDDING[arch], "c_attn" if arch == "gpt2" else "q_proj"]
    torch.manual_seed(0)
    ours = peftkit.get_peft_model(
        tiny_model(arch), peftkit.LoraConfig(r=4, target_modules=targets, init_lora_weights=False)
    )
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(
            tiny_model(arch), peft.LoraConfig(r=4, target_modules=targets, init_lora_weights=False)
        )
    with torch.no_grad():
        reference = theirs(input_ids=IDS).logits
        torch.testing.assert_close(ours(input_ids=IDS).logits, reference, atol=1e-5, rtol=1e-5)
        ours.save_pretrained(tmp_path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = peft.PeftModel.from_pretrained(tiny_model(arch), tmp_path)
        torch.testing.assert_close(loaded(input_ids=IDS).logits, reference, atol=1e-5, rtol=1e-5)
        theirs.save_pretrained(tmp_path / "theirs")
        ours_loaded = peftkit.PeftModel.from_pretrained(tiny_model(arch), tmp_path / "theirs")
        torch.testing.assert_close(ours_loaded(input_ids=IDS).logits, reference, atol=1e-5, rtol=1e-5)


def test_embedding_lora_mixed_batch_rows_equal_per_row_runs():
    torch.manual_seed(0)
    model = peftkit.get_peft_model(
        tiny_model("llama"), peftkit.LoraConfig(r=4, target_modules=["embed_tokens"], init_lora_weights=False)
    )
    torch.manual_seed(1)
    model.add_adapter("other", peftkit.LoraConfig(r=2, target_modules=["embed_tokens"], init_lora_weights=False))
    with torch.no_grad():
        mixed = model(input_ids=IDS, adapter_names=["other", "__base__"]).logits
        model.set_adapter("other")
        first = model(input_ids=IDS[:1]).logits
        with model.disable_adapter():
            second = model(input_ids=IDS[1:]).logits
            first_base = model(input_ids=IDS[:1]).logits
    torch.testing.assert_close(mixed[0], first[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1], second[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(second, tiny_model("llama")(input_ids=IDS[1:]).logits, atol=0, rtol=0)
    assert not torch.allclose(first, first_base, atol=1e-3)  # the adapter is not a no-op


def test_embedding_merge_on_an_untied_model():
    torch.manual_seed(0)
    model = peftkit.get_peft_model(
        tiny_model("llama"), peftkit.LoraConfig(r=4, target_modules=["embed_tokens"], init_lora_weights=False)
    )
    with torch.no_grad():
        before = model(input_ids=IDS).logits
        model.merge_adapter()
        torch.testing.assert_close(model(input_ids=IDS).logits, before, atol=1e-5, rtol=1e-5)
    assert model.base_model.get_input_embeddings().base_layer.weight.shape == (VOCAB, 32)


def test_conv_and_embedding_mixed_rows_equal_per_row_runs():
    """Per-row routing (what PeftModel.forward publishes for ``adapter_names=``): row 0 uses adapter ``other``,
    row 1 the bare base model; each equals its own single-row run."""
    ours, _ = pair()
    torch.manual_seed(5)
    ours.add_adapter("other", config(peftkit, init_lora_weights=False))
    base = ours.get_base_model()
    with torch.no_grad():
        with ours.routing.scope({"other": torch.tensor([0, -1])}):
            mixed = base(IDS)
        with ours.routing.scope({"other": torch.tensor([0])}):
            first = base(IDS[:1])
        with ours.routing.scope({}):
            second = base(IDS[1:])
    torch.testing.assert_close(mixed[:1], first, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(mixed[1:], second, atol=1e-6, rtol=1e-5)  # conv kernels vary with batch size
    torch.testing.assert_close(second, net()(IDS[1:]), atol=0, rtol=0)
    assert not torch.allclose(first, net()(IDS[:1]), atol=1e-3)
