"""PeftModel: user-aligned logits, loss, training touches only adapters, files, several adapters."""

import json

import pytest
import torch
import torch.nn.functional as F

from peftkit import (
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    get_peft_model,
)
from tests.conftest import VOCAB, tiny_model

CONFIGS = {
    "prompt_tuning": lambda: PromptTuningConfig(num_virtual_tokens=4),
    "prefix_tuning": lambda: PrefixTuningConfig(num_virtual_tokens=4),
    "prefix_projection": lambda: PrefixTuningConfig(num_virtual_tokens=4, prefix_projection=True),
    "p_tuning_mlp": lambda: PromptEncoderConfig(num_virtual_tokens=4),
    "p_tuning_lstm": lambda: PromptEncoderConfig(num_virtual_tokens=4, encoder_reparameterization_type="LSTM"),
}


@pytest.fixture(params=list(CONFIGS))
def method(request):
    return request.param


def labels_for(batch):
    """Labels on user positions >= 3: row 1 is padded to position 2, so every labelled token is
    predicted from a real user token (not from a virtual one)."""
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    labels[:, :3] = -100
    return labels


def test_logits_line_up_with_the_users_tokens(model, method, batch):
    """``logits[:, i]`` is the base model's output at the user's token ``i`` with the prompt in front,
    computed here by hand: virtual embeddings concatenated before the tokens, or the key/value prefix
    placed in a cache with positions shifted by its length."""
    from transformers.cache_utils import DynamicCache

    peft_model = get_peft_model(model, CONFIGS[method]())
    assert peft_model(**batch).logits.shape == (2, 7, VOCAB)
    ids = batch["input_ids"][:1]  # the unpadded row
    got = peft_model(input_ids=ids).logits
    adapter = peft_model.adapters["default"]
    embeds = model.get_input_embeddings()(ids)
    with torch.no_grad():
        if hasattr(adapter, "prompt"):  # prompt tuning, p-tuning
            prompt = adapter.prompt().unsqueeze(0)
            full = model(inputs_embeds=torch.cat([prompt, embeds], dim=1)).logits
            expected = full[:, prompt.shape[1] :]
        else:  # prefix tuning: (keys, values) per layer, each (1, H_kv, n, d)
            prefix = peft_model.prepare_inputs(ids, routes={"default": torch.zeros(1, dtype=torch.long)}).prefix
            cache = DynamicCache(config=model.config)
            for layer, (keys, values) in enumerate(prefix):
                cache.update(keys, values, layer)
            n = prefix[0][0].shape[2]
            positions = torch.arange(n, n + ids.shape[1]).unsqueeze(0)
            mask = torch.ones(1, n + ids.shape[1], dtype=torch.long)
            expected = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, cache=cache).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_loss_is_mean_next_token_cross_entropy(model, method, batch):
    """Independent formula: shift the user-aligned logits by one, average CE over labelled targets.

    Every labelled target is predicted from a user position, so the user-aligned logits contain
    all predicting positions.
    """
    peft_model = get_peft_model(model, CONFIGS[method]())
    labels = labels_for(batch)
    out = peft_model(**batch, labels=labels)
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    fast = peft_model(**batch, labels=labels, return_logits=False)
    assert fast.logits is None
    torch.testing.assert_close(fast.loss, expected)


def test_loss_trains_the_prompt_to_predict_the_first_token(llama):
    """A label on the first user token is predicted from the last virtual token (as in PEFT)."""
    peft_model = get_peft_model(llama, PromptTuningConfig(num_virtual_tokens=3))
    ids = torch.tensor([[5, 6, 7]])
    labels = torch.tensor([[5, -100, -100]])
    loss = peft_model(input_ids=ids, labels=labels).loss
    # by hand: the logits after the last virtual token, scored against the first user token
    prompt = peft_model.adapters["default"].prompt().unsqueeze(0)
    embeds = torch.cat([prompt, llama.get_input_embeddings()(ids)], dim=1)
    last_virtual = llama(inputs_embeds=embeds).logits[:, 2]
    torch.testing.assert_close(loss, F.cross_entropy(last_virtual, torch.tensor([5])))
    # and it trains the prompt: the gradient reaches the virtual tokens
    loss.backward()
    assert peft_model.adapters["default"].embedding.weight.grad.abs().sum() > 0


def test_left_padding_gives_the_unpadded_result(model, method):
    peft_model = get_peft_model(model, CONFIGS[method]())
    ids = torch.tensor([[9, 10, 11, 12]])
    alone = peft_model(input_ids=ids).logits
    padded = peft_model(
        input_ids=torch.tensor([[0, 0, 9, 10, 11, 12]]), attention_mask=torch.tensor([[0, 0, 1, 1, 1, 1]])
    )
    torch.testing.assert_close(padded.logits[:, 2:], alone, atol=1e-5, rtol=1e-4)


def test_only_adapter_parameters_change(model, method, batch):
    peft_model = get_peft_model(model, CONFIGS[method]())
    peft_model.train()
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("prompt_encoder.default.") for n in trainable)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        peft_model(**batch, labels=labels_for(batch)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, param in peft_model.named_parameters():
        changed = not torch.equal(before[name], param)
        if name in trainable:
            assert changed or "lstm" in name or name.endswith(".bias"), name
        else:
            assert not changed, f"frozen parameter {name} changed"
    assert any(not torch.equal(before[n], dict(peft_model.named_parameters())[n]) for n in trainable)


def test_save_load_round_trip(tmp_path, model, method, batch):
    peft_model = get_peft_model(model, CONFIGS[method]())
    peft_model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["inference_mode"] is True
    assert config["num_layers"] == 2 and config["token_dim"]
    loaded = PeftModel.from_pretrained(model, tmp_path)
    torch.testing.assert_close(loaded(**batch).logits, peft_model(**batch).logits)
    assert loaded.get_nb_trainable_parameters()[0] == 0  # loaded for inference: frozen


def test_from_pretrained_trainable(tmp_path, llama):
    get_peft_model(llama, PromptTuningConfig(num_virtual_tokens=4)).save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path, is_trainable=True)
    assert loaded.get_nb_trainable_parameters()[0] == 4 * 32


def test_from_pretrained_errors(tmp_path, llama):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        PeftModel.from_pretrained(llama, tmp_path)
    PromptTuningConfig(num_virtual_tokens=2).save_pretrained(tmp_path)
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match="never loads pickle"):
        PeftModel.from_pretrained(llama, tmp_path)


def test_several_soft_prompts_and_mixed_batches(llama, batch):
    torch.manual_seed(0)
    peft_model = get_peft_model(llama, PromptTuningConfig(num_virtual_tokens=3), adapter_name="a")
    peft_model.add_adapter("b", PrefixTuningConfig(num_virtual_tokens=5))
    peft_model.add_adapter("c", PromptEncoderConfig(num_virtual_tokens=2))
    expected = []
    for row, name in enumerate(["b", "a"]):
        peft_model.set_adapter(name)
        expected.append(peft_model(**{k: v[row : row + 1] for k, v in batch.items()}).logits)
    with peft_model.disable_adapter():
        base_row = peft_model(**{k: v[1:] for k, v in batch.items()}).logits
    mixed = peft_model(**batch, adapter_names=["b", "a"]).logits
    torch.testing.assert_close(mixed, torch.cat(expected), atol=1e-5, rtol=1e-4)
    mixed = peft_model(**batch, adapter_names=["c", "__base__"]).logits
    torch.testing.assert_close(mixed[1:], base_row, atol=1e-5, rtol=1e-4)


def test_soft_prompts_can_be_active_together(llama, batch):
    peft_model = get_peft_model(llama, PromptTuningConfig(num_virtual_tokens=3), adapter_name="a")
    peft_model.add_adapter("b", PrefixTuningConfig(num_virtual_tokens=2))
    peft_model.set_adapter(["a", "b"])
    logits = peft_model(**batch).logits
    assert logits.shape == (2, 7, VOCAB)
    peft_model.set_adapter("a")
    assert not torch.allclose(logits, peft_model(**batch).logits)


def test_disable_adapter_restores_the_base_output(model, method):
    peft_model = get_peft_model(model, CONFIGS[method]())
    ids = torch.tensor([[5, 6, 7, 8]])
    with peft_model.disable_adapter():
        disabled = peft_model(input_ids=ids).logits
    torch.testing.assert_close(disabled, model(input_ids=ids).logits, atol=0, rtol=0)
    assert not torch.allclose(peft_model(input_ids=ids).logits, disabled)


def test_adapter_management_errors(llama):
    peft_model = get_peft_model(llama, PromptTuningConfig(num_virtual_tokens=3))
    with pytest.raises(ValueError, match="already exists"):
        peft_model.add_adapter("default", PromptTuningConfig())
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['nope'\]"):
        peft_model.set_adapter("nope")
    with pytest.raises(ValueError, match="reserved"):
        peft_model.add_adapter("__base__", PromptTuningConfig())
    with pytest.raises(ValueError, match="2 entries for a batch of 1"):
        peft_model(input_ids=torch.tensor([[1, 2]]), adapter_names=["default", "default"])
    with pytest.raises(ValueError, match="already a PeftModel"):
        get_peft_model(peft_model, PromptTuningConfig())


def test_delete_adapter(llama):
    peft_model = get_peft_model(llama, PromptTuningConfig(num_virtual_tokens=3), adapter_name="a")
    peft_model.add_adapter("b", PromptTuningConfig(num_virtual_tokens=3))
    with pytest.warns(UserWarning, match="Setting active adapter to b"):
        peft_model.delete_adapter("a")
    assert list(peft_model.adapters) == ["b"] and "a" not in peft_model.prompt_encoder
    assert peft_model.active_adapters == ["b"]  # as in PEFT: another adapter becomes active


def test_named_adapters_save_in_subfolders(tmp_path, llama, batch):
    peft_model = get_peft_model(llama, PromptTuningConfig(num_virtual_tokens=3))
    peft_model.add_adapter("other", PrefixTuningConfig(num_virtual_tokens=2))
    peft_model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert (tmp_path / "other" / "adapter_config.json").is_file()
    loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    loaded.load_adapter(tmp_path / "other", "other")
    for name in ("default", "other"):
        peft_model.set_adapter(name)
        loaded.set_adapter(name)
        torch.testing.assert_close(loaded(**batch).logits, peft_model(**batch).logits)


def test_print_trainable_parameters(llama, capsys):
    peft_model = get_peft_model(llama, PromptTuningConfig(num_virtual_tokens=3))
    peft_model.print_trainable_parameters()
    total = sum(p.numel() for p in llama.parameters()) + 96
    assert capsys.readouterr().out.strip() == (
        f"trainable params: 96 || all params: {total:,d} || trainable%: {100 * 96 / total:.4f}"
    )


def test_pickle_is_refused(tmp_path, llama):
    with pytest.raises(ValueError, match="safetensors only"):
        get_peft_model(llama, PromptTuningConfig()).save_pretrained(tmp_path, safe_serialization=False)


def test_forward_rejects_a_user_cache(llama):
    with pytest.raises(NotImplementedError, match="manages the cache"):
        get_peft_model(llama, PromptTuningConfig())(input_ids=torch.tensor([[1]]), past_key_values=object())
