"""The prefix store: virtual-token keys/values computed once per expert version, equal to what peftkit's
own forward computes with the soft prompt in front of the user's tokens."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch

from peftkit.serving.kv_batch import prefill
from peftkit.serving.prefix_store import PrefixStore
from peftkit.serving.types import ServedExpert, SoftPrompt
from tests.serving.conftest import random_prompt


def peft_last_logits(served, expert, prompt):
    """The oracle: ``PeftModel.forward`` on ``[virtual | prompt]`` in one pass, last user position."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        return served.peft(input_ids=ids, adapter_names=[expert]).logits[0, -1]


@pytest.mark.parametrize("expert", ["pt4", "pt7", "px3", "px5"])
def test_prefill_over_the_cached_prefix_equals_the_full_forward(served, expert):
    store = PrefixStore(served.base, max_bytes=10**8)
    prompt = random_prompt(torch.Generator().manual_seed(3), 9)
    state, logits = prefill(served.base, [prompt], [store.get(served.experts[expert])])
    torch.testing.assert_close(logits[0], peft_last_logits(served, expert, prompt), atol=1e-5, rtol=0)
    n = served.experts[expert].soft_prompt.num_virtual_tokens
    assert state.positions.tolist() == [n + 9]  # the next token's position, as in generate
    assert state.length == n + 9


def test_a_batched_prefill_of_mixed_experts_equals_each_row_alone(served):
    store = PrefixStore(served.base, max_bytes=10**8)
    generator = torch.Generator().manual_seed(4)
    rows = [("pt7", 3), (None, 8), ("px3", 5), ("pt4", 12), ("px5", 1)]
    prompts = [random_prompt(generator, length) for _, length in rows]
    prefixes = [store.get(None if name is None else served.experts[name]) for name, _ in rows]
    _, logits = prefill(served.base, prompts, prefixes)
    for (name, _), prompt, got in zip(rows, prompts, logits, strict=True):
        if name is None:
            with torch.no_grad():
                expected = served.base(input_ids=torch.tensor([prompt])).logits[0, -1]
        else:
            expected = peft_last_logits(served, name, prompt)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_prompt_states_are_the_models_cache_over_the_virtual_tokens(served):
    """The stored keys/values are the first ``n`` columns of the cache ``PeftModel.forward`` builds."""
    store = PrefixStore(served.base, max_bytes=10**8)
    cached = store.get(served.experts["pt4"])
    with torch.no_grad():
        out = served.peft(input_ids=torch.tensor([[5, 6, 7]]), adapter_names=["pt4"], use_cache=True)
    assert len(cached.key_values) == len(out.cache.layers) == 2
    for (keys, values), layer in zip(cached.key_values, out.cache.layers, strict=True):
        assert keys.shape == (1, 2, 4, 8)  # (1, H_kv, n, d_head)
        torch.testing.assert_close(keys, layer.keys[:, :, :4], atol=1e-5, rtol=0)
        torch.testing.assert_close(values, layer.values[:, :, :4], atol=1e-5, rtol=0)


def test_prefix_tuning_states_are_its_parameters(served):
    store = PrefixStore(served.base, max_bytes=10**8)
    cached = store.get(served.experts["px3"])
    kv = served.peft.prompt_encoder["px3"].key_values()  # (2L, H_kv, n, d)
    for layer, (keys, values) in enumerate(cached.key_values):
        assert torch.equal(keys[0], kv[2 * layer])
        assert torch.equal(values[0], kv[2 * layer + 1])


def count_forwards(model):
    calls = []
    handle = model.register_forward_hook(lambda *args: calls.append(1))
    return calls, handle


def test_computed_once_then_reused(served):
    store = PrefixStore(served.base, max_bytes=10**8)
    calls, hook = count_forwards(served.base)
    first = store.get(served.experts["pt4"])
    second = store.get(served.experts["pt4"])
    hook.remove()
    assert len(calls) == 1
    assert second is first
    assert (store.hits, store.misses) == (1, 1)
    assert store.get(None) is None


def test_a_new_version_never_serves_stale_states(served):
    store = PrefixStore(served.base, max_bytes=10**8)
    old = served.experts["pt4"]
    before = store.get(old)
    prompt = old.soft_prompt
    changed = SoftPrompt("prompt", prompt.num_virtual_tokens, embeddings=prompt.embeddings + 0.5)
    reloaded = dataclasses.replace(old, version=2, soft_prompt=changed)
    after = store.get(reloaded)
    assert not torch.allclose(after.key_values[0][0], before.key_values[0][0])
    assert len(store) == 1  # the old version was dropped
    assert reloaded in store
    assert old not in store
    relabelled = dataclasses.replace(reloaded, lora="style", lora_version=1)
    assert relabelled not in store  # a LoRA under the prompt is another key


def test_missing_prompts_are_computed_together_as_each_alone(served):
    experts = [served.experts[name] for name in ("pt7", "px3", "pt4", "pt7")]
    calls, hook = count_forwards(served.base)
    together = PrefixStore(served.base, max_bytes=10**8).get_many([*experts, None])
    hook.remove()
    assert len(calls) == 1  # pt7 and pt4 in one forward (left-padded), px3 needs none
    assert together[0] is together[3]
    assert together[4] is None
    for expert, got in zip(experts, together, strict=False):
        alone = PrefixStore(served.base, max_bytes=10**8).get(expert)
        for (k, v), (k_alone, v_alone) in zip(got.key_values, alone.key_values, strict=True):
            assert k.shape == k_alone.shape == (1, 2, expert.soft_prompt.num_virtual_tokens, 8)
            torch.testing.assert_close(k, k_alone, atol=1e-6, rtol=0)
            torch.testing.assert_close(v, v_alone, atol=1e-6, rtol=0)


def test_lru_bounded_by_bytes(served):
    one = PrefixStore(served.base, max_bytes=10**8).get(served.experts["pt4"]).nbytes
    assert one == 2 * 2 * (1 * 2 * 4 * 8) * 4  # layers * (K, V) * (1, H_kv, n, d) * fp32
    experts = [dataclasses.replace(served.experts["pt4"], name=f"e{i}") for i in range(3)]
    store = PrefixStore(served.base, max_bytes=2 * one)
    store.get(experts[0])
    store.get(experts[1])
    store.get(experts[0])  # e1 is now the least recently used
    store.get(experts[2])
    assert experts[0] in store
    assert experts[2] in store
    assert experts[1] not in store
    assert store.nbytes == 2 * one
    assert store.forget("e0") == 1
    assert store.nbytes == one


class RecordingBank:
    """A LoRA bank stand-in that records the slots each forward is routed with."""

    def __init__(self):
        self.routed = []

    def slot(self, name):
        return {"style": 3}[name]

    @contextlib.contextmanager
    def routing(self, slots):
        self.routed.append(slots.tolist())
        yield


def test_a_prompt_over_a_lora_is_computed_with_the_lora_routed(served):
    bank = RecordingBank()
    store = PrefixStore(served.base, max_bytes=10**8, lora_bank=bank)
    expert = dataclasses.replace(served.experts["pt4"], lora="style", lora_version=1)
    store.get(expert)
    store.get(expert)
    store.get(dataclasses.replace(expert, lora_version=2))  # the LoRA changed: computed again
    assert bank.routed == [[3], [3]]
    with pytest.raises(ValueError, match="need the engine's lora_bank"):
        PrefixStore(served.base, max_bytes=10**8).get(expert)


def test_bad_input():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="max_bytes"):
        PrefixStore(model, max_bytes=-1)
    store = PrefixStore(model, max_bytes=10)
    with pytest.raises(ValueError, match="needs key_values"):
        store.get(ServedExpert("bad", 1, soft_prompt=SoftPrompt("prefix", 2)))


def test_prefill_saving_times_two_equal_computations(served):
    from peftkit.serving.measure import prefill_saving

    saving = prefill_saving(
        served.base, served.tokenizer, served.experts["pt7"].soft_prompt, [5, 6, 7, 8], 2, batch_size=3
    )
    assert saving.max_logit_difference < 1e-5  # cached prefix and recomputation give the same logits
    assert (saving.virtual_tokens, saving.prompt_tokens, saving.batch_size) == (7, 4, 3)
    assert saving.recompute_ms > 0
    assert saving.cached_ms > 0
    assert saving.speedup == saving.recompute_ms / saving.cached_ms
    with pytest.raises(ValueError, match="prompt-tuning soft prompt"):
        prefill_saving(served.base, served.tokenizer, served.experts["px3"].soft_prompt, [5], 1)


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_a_bank_experts_served_prompt_is_its_own_row(method):
    """``served_prompt(row)`` of a bank gives that expert's prompt: prompt tuning its table row, prefix
    tuning its row in the attention's layout (keys of layer l at 2l, values at 2l + 1)."""
    from peftkit import PrefixTuningConfig, PromptTuningConfig, get_peft_model
    from peftkit.serving.prefix_store import soft_prompt_of
    from tests.conftest import tiny_model

    model = tiny_model("llama")
    kind = PromptTuningConfig if method == "prompt" else PrefixTuningConfig
    peft = get_peft_model(model, kind(num_virtual_tokens=3, expert_ids=["a", "b", "c"]))
    adapter = peft.prompt_encoder["default"]
    served = soft_prompt_of(adapter, "b")
    table = adapter.table[1].detach()  # (n, W)
    assert served.kind == method and served.num_virtual_tokens == 3
    if method == "prompt":
        torch.testing.assert_close(served.embeddings, table, atol=0, rtol=0)
    else:
        config = adapter.config
        heads, layers = config.num_attention_heads, config.num_layers
        kv = table.view(3, 2 * layers, heads, -1).permute(1, 2, 0, 3)
        for layer, (keys, values) in enumerate(served.key_values):
            torch.testing.assert_close(keys, kv[2 * layer], atol=0, rtol=0)
            torch.testing.assert_close(values, kv[2 * layer + 1], atol=0, rtol=0)
    with pytest.raises(KeyError, match="z"):
        soft_prompt_of(adapter, "z")
