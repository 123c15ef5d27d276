"""ExpertRegistry: every source kind against peftkit's own PeftModel forward (the oracle), path safety,
LRU eviction, versions, fallback levels and a 10,000-expert bank."""

from __future__ import annotations

import os
import time
import tracemalloc
import warnings

import pytest
import torch
import yaml
from transformers import DynamicCache

import peftkit
from peftkit.experts.load import load_expert
from peftkit.experts.package import build_package
from peftkit.serving.lora_bank import LoraBank
from peftkit.serving.prefix_store import PrefixStore
from peftkit.serving.registry import ExpertRegistry
from peftkit.serving.types import UnknownExpert
from tests.conftest import VOCAB, tiny_model

IDS = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(5))


def save(folder, config, seed=0, adapter_name="default"):
    """A peftkit adapter on a fresh tiny Llama, moved off its init, saved; returns the PeftModel (the oracle)."""
    model = peftkit.get_peft_model(tiny_model("llama"), config, adapter_name)
    torch.manual_seed(seed)  # after tiny_model, which seeds itself
    with torch.no_grad():
        for param in model.adapters[adapter_name].adapter_parameters():
            param.add_(0.3 * torch.randn_like(param))
    model.save_pretrained(folder)
    return model.eval()


def oracle_logits(peft_model, **kwargs):
    """The user tokens' logits (PEFT-style outputs include the virtual positions first)."""
    with torch.no_grad():
        return peft_model(input_ids=IDS, **kwargs).logits[:, -IDS.shape[1] :]


def served_logits(model, expert, bank=None):
    """What the engine computes for ``expert``: its prompt before the embeddings / its prefix in the cache,
    its LoRA through the bank."""
    embeds = model.get_input_embeddings()(IDS)
    cache, batch = None, IDS.shape[0]
    prompt = expert.soft_prompt
    if prompt is not None and prompt.kind == "prompt":
        embeds = torch.cat([prompt.embeddings.expand(batch, -1, -1), embeds], dim=1)
    elif prompt is not None:
        cache = DynamicCache(config=model.config)
        for layer, (keys, values) in enumerate(prompt.key_values):
            cache.update(keys.expand(batch, -1, -1, -1), values.expand(batch, -1, -1, -1), layer)
    length = embeds.shape[1] + (prompt.num_virtual_tokens if cache is not None else 0)
    slots = [bank.slot(expert.lora) if expert.lora else -1] * batch if bank is not None else [-1] * batch
    with torch.no_grad(), bank.routing(slots) if bank is not None else torch.no_grad():
        out = model(inputs_embeds=embeds, past_key_values=cache, attention_mask=torch.ones(batch, length).long())
    return out.logits[:, -IDS.shape[1] :]


@pytest.fixture
def base():
    return tiny_model("llama")


@pytest.fixture
def root(tmp_path):
    folder = tmp_path / "experts"
    folder.mkdir()
    return folder


def registry(base, root, **options):
    return ExpertRegistry(base, None, root=root, lora_bank=LoraBank(base), **options)


@pytest.mark.parametrize(
    "config",
    [
        peftkit.PromptTuningConfig(num_virtual_tokens=3),
        peftkit.PromptEncoderConfig(num_virtual_tokens=3, encoder_hidden_size=16),
        peftkit.PrefixTuningConfig(num_virtual_tokens=3),
        peftkit.PrefixTuningConfig(num_virtual_tokens=2, prefix_projection=True, encoder_hidden_size=8),
        peftkit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    ],
    ids=["prompt_tuning", "p_tuning", "prefix_tuning", "prefix_projection", "lora"],
)
def test_a_peft_folder_serves_what_peftkit_computes(base, root, config):
    oracle = save(root / "ad", config)
    reg = registry(base, root)
    assert reg.load("ad") == ["ad"]
    expert = reg.get("ad")
    kind = {"PROMPT_TUNING": "soft_prompt", "P_TUNING": "soft_prompt", "PREFIX_TUNING": "prefix", "LORA": "lora"}
    assert reg.describe()[0]["kind"] == kind[config.peft_type] and expert.source == "ad"
    if config.peft_type == "PREFIX_TUNING":  # the base model's (H_kv, n, d) layout: 2 kv heads of 8
        assert expert.soft_prompt.key_values[0][0].shape == (2, config.num_virtual_tokens, 8)
    torch.testing.assert_close(served_logits(base, expert, reg.lora_bank), oracle_logits(oracle), atol=1e-5, rtol=1e-5)
    assert expert.nbytes == reg.nbytes > 0


def test_an_expert_package_serves_what_load_expert_computes(base, root, tmp_path):
    base_folder = tmp_path / "base"
    base.save_pretrained(base_folder)
    torch.manual_seed(1)
    model = peftkit.PeftModel(tiny_model("llama"), peftkit.PromptTuningConfig(num_virtual_tokens=3), "style")
    model.add_adapter("task", peftkit.PromptTuningConfig(num_virtual_tokens=2))
    model.add_adapter("lora", peftkit.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name in ("style", "task", "lora"):
            for param in model.adapters[name].adapter_parameters():
                param.add_(0.3 * torch.randn_like(param))
    model.save_pretrained(tmp_path / "weights")
    manifest = {
        "name": "tiny-json",
        "version": "0.1.0",
        "base_model": {"name": str(base_folder)},
        "soft_prompts": [{"name": "style", "tokens": 3}, {"name": "task", "tokens": 2}],
        "adapters": [{"name": "lora", "type": "LORA", "config": {"r": 2, "lora_alpha": 4}}],
        "decoding": {"temperature": 0.7, "max_new_tokens": 12, "stop": ["}"]},
    }
    (tmp_path / "expert.yaml").write_text(yaml.safe_dump(manifest))
    package = build_package(tmp_path / "expert.yaml", weights_dir=tmp_path / "weights", output_dir=root)
    assert package.name == "tiny-json-0.1.0.expert"

    reg = registry(base, root)
    expert = reg.get("tiny-json")  # on demand: NAME-VERSION.expert
    assert expert.decoding.temperature == 0.7 and expert.decoding.stop == ("}",) and expert.lora == "tiny-json"
    assert expert.soft_prompt.num_virtual_tokens == 5 and expert.source == package.name
    assert reg.describe()[0]["kind"] == "soft_prompt+lora"
    unhooked = tiny_model("llama")  # the same weights, without the bank's hooks
    unhooked.config.architectures = base.config.architectures  # as save_pretrained set them
    loaded = load_expert(package, base=(unhooked, None))
    expected = oracle_logits(loaded.model)
    torch.testing.assert_close(served_logits(base, expert, reg.lora_bank), expected, atol=1e-5, rtol=1e-5)


def test_a_bank_folder_gives_each_id_a_view_of_one_table(base, root):
    ids = ["a", "b", "c"]
    oracle = save(root / "personas", peftkit.PrefixTuningConfig(num_virtual_tokens=2, expert_ids=ids))
    save(root / "prompts", peftkit.PromptTuningConfig(num_virtual_tokens=3, expert_ids=["x", "y"]), seed=1)
    reg = registry(base, root)
    assert sorted(reg.load_all()) == ["a", "b", "c", "x", "y"]
    assert "personas" not in reg and not reg.load_errors
    for expert_id in ids:
        expert = reg.get(expert_id)
        expected = oracle_logits(oracle, experts=[{"default": expert_id}] * 2)
        torch.testing.assert_close(served_logits(base, expert), expected, atol=1e-5, rtol=1e-5)
    table = oracle.adapters["default"].table
    pointers = {
        reg.get(i).soft_prompt.key_values[layer][k].untyped_storage().data_ptr()
        for i in ids
        for layer in (0, 1)
        for k in (0, 1)
    }
    assert len(pointers) == 1
    assert reg.nbytes == table.numel() * 4 + 2 * reg.get("x").soft_prompt.nbytes
    version = reg.get("a").version
    with pytest.raises(UnknownExpert, match="holds other experts"):
        reg.get("personas")  # a source's name is not an expert, and asking does not re-read it
    assert reg.get("a").version == version


def test_paths_that_leave_the_experts_folder_are_refused(base, root, tmp_path):
    outside = tmp_path / "outside"
    save(outside, peftkit.PromptTuningConfig(num_virtual_tokens=2))
    (root / "half").mkdir()
    (root / "half" / "adapter_config.json").write_bytes((outside / "adapter_config.json").read_bytes())
    os.symlink(outside / "adapter_model.safetensors", root / "half" / "adapter_model.safetensors")
    os.symlink(outside, root / "evil")
    save(root / "good", peftkit.PromptTuningConfig(num_virtual_tokens=2))
    reg = registry(base, root)
    for path, message in [
        ("../outside", r"'\.\.' may not leave"),
        (str(outside), "relative to the experts folder"),
        ("good/../../outside", r"'\.\.' may not leave"),
        ("evil", "resolves outside"),
        ("half", "resolves outside"),
        ("nothing", "no expert file or folder"),
    ]:
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            reg.load(path)
    with pytest.warns(UserWarning, match="resolves outside"):
        assert reg.load_all() == ["good"]
    assert set(reg.load_errors) == {"evil", "half"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the operator is warned; the client gets a 404
        for name in ("evil", "half", "../outside", "/etc", "outside"):
            with pytest.raises(UnknownExpert):
                reg.get(name)  # a request's model name never reads outside either
    assert reg.names() == ["good"]


def test_lru_eviction_under_a_budget_and_reload_on_demand(base, root):
    for i in range(3):
        save(root / f"p{i}", peftkit.PromptTuningConfig(num_virtual_tokens=4), seed=i)
    save(root / "lora", peftkit.LoraConfig(r=2, target_modules=["q_proj"]), seed=9)
    one = 4 * 32 * 4  # (n, D) fp32
    reg = registry(base, root, memory_budget_bytes=2 * one)
    reg.load("p0")
    reg.load("p1")
    reg.get("p0")  # p1 is now the least recently used
    reg.load("p2")
    assert reg.names() == ["p0", "p2"] and reg.nbytes == 2 * one
    listed = {row["id"]: row for row in reg.describe()}
    assert listed["p1"]["loaded"] is False and listed["p1"]["bytes"] == 0 and listed["p2"]["bytes"] == one
    reloaded = reg.get("p1")  # evicted experts load again on demand (evicting p0)
    assert reg.names() == ["p2", "p1"] and reloaded.version > listed["p2"]["version"]
    lora = reg.get("lora")  # 2 layers * r 2 * (32 + 32) * 4 bytes = 1024: evicts both prompts
    assert lora.nbytes == 1024 and reg.names() == ["lora"] and "lora" in reg.lora_bank
    reg.get("p0")
    assert reg.names() == ["p0"] and "lora" not in reg.lora_bank  # an evicted LoRA leaves the bank
    reg.unload("p0")
    assert reg.names() == [] and reg.nbytes == 0
    with pytest.raises(ValueError, match="more than memory_budget_bytes"):
        ExpertRegistry(base, None, root=root, lora_bank=LoraBank(base), memory_budget_bytes=100).load("p0")


def test_unloaded_evicted_and_reloaded_experts_leave_the_prefix_store_at_once(base, root, caplog):
    """Listeners hear every expert that leaves memory; the prefix store connected to them drops its cached
    keys/values then, not when its own LRU reaches them (its budget here never would)."""
    for i in range(3):
        save(root / f"p{i}", peftkit.PromptTuningConfig(num_virtual_tokens=4), seed=i)
    one = 4 * 32 * 4  # (n, D) fp32
    reg = registry(base, root, memory_budget_bytes=2 * one)
    store = PrefixStore(base.eval(), max_bytes=2**30)
    heard: list[str] = []

    def broken(name: str) -> None:
        raise RuntimeError("a listener that fails")

    for listener in (store.forget, heard.append, heard.append, broken):  # one added twice: registered once
        reg.add_unload_listener(listener)
    p0, p1 = reg.get("p0"), reg.get("p1")
    store.get_many([p0, p1])
    assert p0 in store and p1 in store and store.nbytes == 2 * store.get(p0).nbytes
    reg.get("p2")  # over budget: evicts p0, the least recently used
    assert reg.names() == ["p1", "p2"]
    assert p0 not in store and p1 in store and len(store) == 1
    reg.unload("p1")
    assert p1 not in store and len(store) == 0 and store.nbytes == 0
    p2 = reg.get("p2")
    store.get(p2)
    reg.load("p2")  # a reload replaces it: the old version's states go before the new one is asked for
    assert p2 not in store and len(store) == 0 and reg.get("p2").version > p2.version
    assert heard == ["p0", "p1", "p2"]
    assert caplog.text.count("unload listener") == 3  # the failing one is logged, and the unloads went on


def test_bank_rows_count_their_row_and_come_back_from_the_table(base, root):
    save(root / "bank", peftkit.PromptTuningConfig(num_virtual_tokens=2, expert_ids=["a", "b", "c"]))
    row = 2 * 32 * 4
    reg = registry(base, root, memory_budget_bytes=2 * row)
    reg.load("bank")
    assert reg.names() == ["b", "c"] and reg.nbytes == 2 * row
    version = reg.get("b").version
    assert reg.get("a").version == version  # row a comes back from the table still in memory (no re-read)
    assert reg.names() == ["b", "a"]
    reg.unload("bank")
    assert reg.names() == [] and reg._banks == {}  # the table goes with its last row
    assert reg.get("c").version > version  # re-read from disk


def test_reload_bumps_versions(base, root):
    save(root / "p", peftkit.PromptTuningConfig(num_virtual_tokens=2))
    save(root / "l", peftkit.LoraConfig(r=2, target_modules=["q_proj"]))
    reg = registry(base, root)
    first, lora = reg.get("p"), reg.get("l")
    save(root / "p", peftkit.PromptTuningConfig(num_virtual_tokens=2), seed=3)  # changed on disk
    reg.load("p")
    reg.load("l")
    second, lora2 = reg.get("p"), reg.get("l")
    assert second.version > first.version and lora2.version > lora.version and lora2.lora_version > lora.lora_version
    assert not torch.equal(first.soft_prompt.embeddings, second.soft_prompt.embeddings)
    assert reg.lora_bank.version("l") == lora2.lora_version


def test_resolve_levels(base, root):
    save(root / "general", peftkit.PromptTuningConfig(num_virtual_tokens=2))
    reg = registry(base, root)
    expert, level = reg.resolve("general")
    assert level == "general" and expert.name == "general"
    expert, level = reg.resolve("team-a", ["team", "general", "base"])
    assert level == "general" and expert is reg.get("general")
    assert reg.resolve("team-a", ["base", "general"]) == (None, "base")
    assert reg.resolve("base") == (None, "base")
    with pytest.raises(UnknownExpert, match=r"tried \['team-a', 'team'\]") as error:
        reg.resolve("team-a", ["team"])
    assert error.value.status == 404


def test_ten_thousand_bank_experts_memory_and_lookup(base, root):
    ids = [f"e{i:05d}" for i in range(10_000)]
    n, hidden = 4, 32
    save(root / "many", peftkit.PromptTuningConfig(num_virtual_tokens=n, expert_ids=ids))
    reg = registry(base, root)
    tracemalloc.start()
    start = time.perf_counter()
    reg.load_all()
    load_s = time.perf_counter() - start
    experts = [reg.get(i) for i in ids]  # every expert made (views), the worst case
    python_bytes = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    storages = {e.soft_prompt.embeddings.untyped_storage().data_ptr(): e.soft_prompt.embeddings for e in experts}
    assert len(storages) == 1  # one shared table
    table_bytes = next(iter(storages.values())).untyped_storage().nbytes()
    assert table_bytes == len(ids) * n * hidden * 4 == reg.nbytes
    torch.testing.assert_close(reg.get("e04321").soft_prompt.embeddings, experts[4321].soft_prompt.embeddings)
    # Python-side bookkeeping per expert (dict entries, records, views): bounded, whatever the prompt size
    assert python_bytes / len(ids) < 4096, python_bytes
    start = time.perf_counter()
    for name in ids[::-1]:
        reg.get(name)
    lookup_us = (time.perf_counter() - start) / len(ids) * 1e6
    assert lookup_us < 200, lookup_us
    per_expert = python_bytes / len(ids)
    print(
        f"10k bank: load {load_s:.2f} s, table {table_bytes} B, python {per_expert:.0f} B/expert, get {lookup_us:.1f}us"
    )


def test_sources_that_cannot_be_served_are_refused(base, root):
    save(root / "ia3", peftkit.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]))
    save(root / "lora", peftkit.LoraConfig(r=2, target_modules=["q_proj"]))
    save(root / "dora", peftkit.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    reg = registry(base, root)
    with pytest.raises(ValueError, match="peft_type IA3 cannot be served"):
        reg.load("ia3")
    with pytest.raises(ValueError, match="use_dora=True is not supported by the LoRA bank"):
        reg.load("dora")
    with pytest.raises(ValueError, match="given no LoraBank"):
        ExpertRegistry(base, None, root=root, lora_bank=None).load("lora")
    assert reg.names() == [] and reg.describe() == [] and len(reg.lora_bank) == 0
    with pytest.raises(UnknownExpert, match="no expert or source"):
        reg.unload("nope")
    assert ExpertRegistry(base, None, root=None, lora_bank=None).resolve("x", ["base"]) == (None, "base")
