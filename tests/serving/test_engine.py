"""The engine: continuous batching whose every request generates what it generates alone."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import pytest
import torch

from peftkit import PrefixTuningConfig, PromptTuningConfig, get_peft_model
from peftkit.decoding import DecodingSettings, Grammar
from peftkit.models.loading import load_base
from peftkit.serving.engine import Engine
from peftkit.serving.prefix_store import soft_prompt_of
from peftkit.serving.types import PromptTooLong, QueueFull, ServedExpert, ServeRequest
from tests.conftest import tiny_model
from tests.serving.conftest import build_served, generate_alone, random_prompt

GREEDY = DecodingSettings(max_new_tokens=8)


def request(served, rid, expert, prompt, settings=GREEDY):
    return ServeRequest(rid, prompt, None if expert is None else served.experts[expert], settings)


def test_mixed_staggered_batch_equals_generate_alone(served):
    """Prompt- and prefix-tuning experts and base rows, different lengths and budgets, arriving while
    others run: each request's greedy tokens equal ``PeftModel.generate`` on it alone."""
    generator = torch.Generator().manual_seed(0)
    plan = [  # (expert, prompt length, max_new_tokens, submitted before step #)
        ("pt4", 5, 8, 0), (None, 3, 6, 0), ("px3", 9, 10, 0), ("pt7", 2, 4, 1),
        ("px5", 6, 12, 2), (None, 11, 3, 2), ("pt4", 4, 9, 4), ("px3", 1, 5, 5),
    ]  # fmt: skip
    engine = Engine(served.base, served.tokenizer, max_batch_size=5)
    requests = [
        request(served, f"r{i}", expert, random_prompt(generator, length), DecodingSettings(max_new_tokens=budget))
        for i, (expert, length, budget, _) in enumerate(plan)
    ]
    handles, step, running = {}, 0, []
    while len(handles) < len(plan) or engine.has_work:
        for i, (*_, when) in enumerate(plan):
            if when == step and i not in handles:
                handles[i] = engine.submit(requests[i])
        engine.step()
        running.append(engine.stats().running)
        step += 1
    assert max(running) == 5  # the batch was full at times: rows really shared forwards
    for i, (expert, *_) in enumerate(plan):
        result = handles[i].result(timeout=1)
        assert result.token_ids == generate_alone(served, expert, requests[i].prompt_ids, requests[i].settings)
        assert result.finish_reason == "length"
        assert result.usage.completion_tokens == len(result.token_ids)
        assert result.text == served.tokenizer.decode(result.token_ids, skip_special_tokens=True)


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_other_architectures(arch):
    """Qwen2 (one key/value head, attention biases) and GPT-2 (learned absolute positions)."""
    served = build_served(arch=arch)
    generator = torch.Generator().manual_seed(0)
    plan = [("pt4", 5), (None, 3), ("px3", 9), ("pt7", 2), ("px5", 6)]
    engine = Engine(served.base, served.tokenizer, max_batch_size=3)
    requests = [request(served, f"r{i}", e, random_prompt(generator, n)) for i, (e, n) in enumerate(plan)]
    handles = []
    for req in requests:
        handles.append(engine.submit(req))
        engine.step()
    engine.run_until_idle()
    for (expert, _), req, handle in zip(plan, requests, handles, strict=True):
        assert handle.result().token_ids == generate_alone(served, expert, req.prompt_ids, GREEDY)


def test_sliding_window_models_are_refused():
    with pytest.raises(NotImplementedError, match="full-attention layers"):
        Engine(tiny_model("gemma3"), None)


def test_every_steps_logits_match_generate_alone(served, monkeypatch):
    """Not only the argmax: each row's logits at every step are within 1e-5 of ``generate``'s scores for
    that request alone, while it shares the batch with rows of other experts and lengths."""
    import peftkit.serving.engine as engine_module

    seen: dict[str, list[torch.Tensor]] = {}
    owner: dict[int, str] = {}
    real = engine_module.choose_tokens

    def recording(samplers, logits):
        for sampler, row in zip(samplers, logits, strict=True):
            seen.setdefault(owner[id(sampler)], []).append(row.clone())
        return real(samplers, logits)

    monkeypatch.setattr(engine_module, "choose_tokens", recording)
    generator = torch.Generator().manual_seed(9)
    plan = [("pt7", 3), (None, 10), ("px5", 6), ("pt4", 1), ("px3", 8)]
    engine = Engine(served.base, served.tokenizer)
    requests = [request(served, f"r{i}", e, random_prompt(generator, n)) for i, (e, n) in enumerate(plan)]
    for req in requests:
        engine.submit(req)
        owner[id(engine._waiting[-1].sampler)] = req.request_id
        engine.step()
    engine.run_until_idle()
    for (expert, _), req in zip(plan, requests, strict=True):
        ids = torch.tensor([req.prompt_ids])
        kwargs = {"decoding": GREEDY, "eos_token_id": [], "return_dict_in_generate": True, "output_scores": True}
        if expert is None:
            with served.peft.disable_adapter():
                scores = served.peft.generate(input_ids=ids, **kwargs).scores
        else:
            scores = served.peft.generate(input_ids=ids, adapter_names=[expert], **kwargs).scores
        got = seen[req.request_id]
        assert len(got) == len(scores) == GREEDY.max_new_tokens
        for step, (ours, theirs) in enumerate(zip(got, scores, strict=True)):
            torch.testing.assert_close(ours, theirs[0], atol=1e-5, rtol=0, msg=f"{req.request_id} step {step}")


def test_seeded_samples_do_not_depend_on_the_batch(served):
    generator = torch.Generator().manual_seed(1)
    sampled = DecodingSettings(temperature=1.0, top_k=40, seed=7, max_new_tokens=10)
    target = request(served, "target", "px5", random_prompt(generator, 6), sampled)
    alone = Engine(served.base, served.tokenizer)
    alone_handle = alone.submit(target)
    alone.run_until_idle()
    batched = Engine(served.base, served.tokenizer)
    for i, expert in enumerate(["pt4", None, "pt7"]):
        batched.submit(
            request(
                served, f"n{i}", expert, random_prompt(generator, 3 + 4 * i), sampled.model_copy(update={"seed": i})
            )
        )
    batched.step()
    handle = batched.submit(target)  # joins a running batch
    batched.run_until_idle()
    assert handle.result().token_ids == alone_handle.result().token_ids
    greedy = generate_alone(served, "px5", target.prompt_ids, GREEDY.model_copy(update={"max_new_tokens": 10}))
    assert handle.result().token_ids != greedy  # it did sample


def test_each_row_decodes_with_its_own_settings(served):
    """Penalised greedy rows equal ``generate`` alone with the same settings; seeded sampled rows equal
    themselves alone; all in one batch with different settings."""
    generator = torch.Generator().manual_seed(11)
    plan = [
        ("pt4", DecodingSettings(max_new_tokens=9, repetition_penalty=1.5)),
        (None, DecodingSettings(max_new_tokens=7, presence_penalty=1.5, frequency_penalty=0.5)),
        ("px5", DecodingSettings(max_new_tokens=8, temperature=0.8, top_p=0.9, seed=3)),
        ("pt7", DecodingSettings(max_new_tokens=6, temperature=1.3, top_k=10, min_p=0.05, seed=4)),
        ("px3", DecodingSettings(max_new_tokens=10)),
    ]
    requests = [request(served, f"r{i}", e, random_prompt(generator, 2 + 3 * i), st) for i, (e, st) in enumerate(plan)]
    engine = Engine(served.base, served.tokenizer)
    handles = [engine.submit(r) for r in requests]
    engine.run_until_idle()
    for (expert, settings), req, handle in zip(plan, requests, handles, strict=True):
        got = handle.result().token_ids
        if settings.do_sample:
            alone = Engine(served.base, served.tokenizer)
            expected = alone.submit(req)
            alone.run_until_idle()
            assert got == expected.result().token_ids
        else:
            assert got == generate_alone(served, expert, req.prompt_ids, settings)
    plain = generate_alone(served, "pt4", requests[0].prompt_ids, DecodingSettings(max_new_tokens=9))
    assert handles[0].result().token_ids != plain  # the penalty did act


def test_a_row_ending_at_eos_leaves_at_once(served):
    """The end-of-sequence token ends a row (``stop``) while the others go on, unchanged."""
    generator = torch.Generator().manual_seed(2)
    prompts = [random_prompt(generator, 5) for _ in range(3)]
    reference = generate_alone(served, "pt4", prompts[0], GREEDY)
    eos = reference[3]  # the 4th token this request generates becomes its end-of-sequence
    tokenizer = type(served.tokenizer)()
    tokenizer.eos_token_id = eos
    engine = Engine(served.base, tokenizer)
    handles = [
        engine.submit(request(served, f"r{i}", e, p))
        for i, (e, p) in enumerate(zip(["pt4", None, "px3"], prompts, strict=True))
    ]
    sizes = []
    while engine.has_work:
        engine.step()
        sizes.append(engine.stats().running)
    first = handles[0].result()
    assert first.finish_reason == "stop"
    assert first.token_ids == reference[: reference.index(eos) + 1]
    assert sizes[reference.index(eos) - 1] == 2  # the step that produced eos dropped the row
    for handle, expert, prompt in zip(handles[1:], [None, "px3"], prompts[1:], strict=True):
        expected = served.peft.generate  # same oracle, with the new eos as generate's eos
        ids = torch.tensor([prompt])
        if expert is None:
            with served.peft.disable_adapter():
                out = expected(input_ids=ids, decoding=GREEDY, eos_token_id=[2, eos])
        else:
            out = expected(input_ids=ids, decoding=GREEDY, eos_token_id=[2, eos], adapter_names=[expert])
        new = out[0, len(prompt) :].tolist()
        cut = next((i for i, t in enumerate(new) if t in (2, eos)), len(new) - 1)
        assert handle.result().token_ids == new[: cut + 1]


def test_ignore_eos_generates_max_new_tokens(served):
    """``ignore_eos=True``: a request runs to its ``max_new_tokens`` through its end-of-sequence token,
    and its tokens are generate's without an end-of-sequence id."""
    prompt = random_prompt(torch.Generator().manual_seed(2), 5)
    reference = generate_alone(served, "pt4", prompt, GREEDY)
    assert len(reference) == GREEDY.max_new_tokens  # the oracle ran to the end (no eos 2 on the way)
    tokenizer = type(served.tokenizer)()
    tokenizer.eos_token_id = reference[3]  # generated 4th: would end the row without ignore_eos
    engine = Engine(served.base, tokenizer, ignore_eos=True)
    handle = engine.submit(request(served, "r0", "pt4", prompt))
    engine.run_until_idle()
    result = handle.result()
    assert result.finish_reason == "length"
    assert result.token_ids == reference[: GREEDY.max_new_tokens]


def test_stop_strings_cut_the_text(served):
    prompt = random_prompt(torch.Generator().manual_seed(5), 4)
    reference = generate_alone(served, "pt7", prompt, GREEDY)
    text = served.tokenizer.decode(reference)
    cut = next(i for i in range(2, len(text) - 1) if text.find(text[i : i + 2]) == i)  # first seen at i
    stop = text[cut : cut + 2]
    engine = Engine(served.base, served.tokenizer)
    handle = engine.submit(request(served, "s", "pt7", prompt, GREEDY.model_copy(update={"stop": (stop,)})))
    engine.run_until_idle()
    events = list(handle)
    result = handle.result()
    assert result.finish_reason == "stop"
    assert result.text == text[:cut]
    assert "".join(e.text for e in events) == text[:cut]
    assert result.token_ids == reference[: cut + 2]
    assert events[-1].usage.completion_tokens == cut + 2


def test_cancel_frees_the_slot_and_leaves_the_others_alone(served):
    generator = torch.Generator().manual_seed(6)
    prompts = [random_prompt(generator, 4 + i) for i in range(3)]
    engine = Engine(served.base, served.tokenizer, max_batch_size=2)
    handles = [engine.submit(request(served, f"r{i}", "px3", p)) for i, p in enumerate(prompts)]
    engine.step()
    engine.step()
    assert engine.stats().running == 2
    assert engine.stats().queue_depth == 1
    handles[0].cancel()
    engine.step()  # the cancelled row leaves; the waiting one takes its slot in the same step
    assert engine.stats().running == 2
    assert engine.stats().queue_depth == 0
    engine.run_until_idle()
    aborted = handles[0].result()
    assert aborted.finish_reason == "abort"
    assert len(aborted.token_ids) == 3  # 1 from prefill + 1 decode in each of two steps
    assert list(handles[0])[-1].token_id is None
    for handle, prompt in zip(handles[1:], prompts[1:], strict=True):
        assert handle.result().token_ids == generate_alone(served, "px3", prompt, GREEDY)


def test_limits(served):
    engine = Engine(served.base, served.tokenizer, max_queue=2, max_model_len=20)
    engine.submit(request(served, "a", None, [5, 6]))
    engine.submit(request(served, "b", "pt4", [5, 6]))
    with pytest.raises(QueueFull) as full:
        engine.submit(request(served, "c", None, [5]))
    assert full.value.status == 429
    engine.run_until_idle()
    long = request(served, "d", "pt7", list(range(3, 9)), GREEDY)  # 7 + 6 + 8 = 21 > 20
    with pytest.raises(PromptTooLong, match="21 exceeds the model's 20"):
        engine.submit(long)
    with pytest.raises(ValueError, match="empty"):
        engine.submit(request(served, "e", None, []))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.submit(request(served, "f", None, [500]))
    lora = dataclasses.replace(served.experts["pt4"], lora="style")
    with pytest.raises(ValueError, match="no lora_bank"):
        engine.submit(ServeRequest("g", [5], lora, GREEDY))
    assert Engine(served.base, served.tokenizer).max_model_len == 256  # the config's max_position_embeddings


def test_background_thread_and_async_streaming(served):
    generator = torch.Generator().manual_seed(8)
    plan = [
        ("pt4", random_prompt(generator, 5)),
        (None, random_prompt(generator, 7)),
        ("px5", random_prompt(generator, 3)),
    ]
    engine = Engine(served.base, served.tokenizer)

    async def consume(rid, expert, prompt):
        handle = engine.submit(request(served, rid, expert, prompt), loop=asyncio.get_running_loop())
        events = [event async for event in handle]
        return handle, events

    async def main():
        return await asyncio.gather(*(consume(f"r{i}", e, p) for i, (e, p) in enumerate(plan)))

    engine.start()
    try:
        results = asyncio.run(main())
    finally:
        engine.stop()
    for (handle, events), (expert, prompt) in zip(results, plan, strict=True):
        assert [e.token_id for e in events] == generate_alone(served, expert, prompt, GREEDY)
        assert events[-1].finish_reason == "length"
        assert all(e.finish_reason is None for e in events[:-1])
        assert "".join(e.text for e in events) == handle.result().text
    stats = engine.stats()
    assert stats.generated_tokens == 24
    assert stats.finished_requests == 3
    assert stats.requests_by_expert == {"pt4": 1, "base": 1, "px5": 1}
    assert (stats.prefix_hits, stats.prefix_misses) == (0, 2)
    assert stats.tokens_per_second > 0


def test_blocking_iteration_with_the_background_thread(served):
    engine = Engine(served.base, served.tokenizer)
    engine.start()
    try:
        handle = engine.submit(request(served, "r", "pt7", [5, 6, 7]))
        tokens = [event.token_id for event in handle]
    finally:
        engine.stop()
    assert tokens == generate_alone(served, "pt7", [5, 6, 7], GREEDY)
    assert not engine._thread


@pytest.mark.smollm2
def test_mixed_experts_equal_generate_alone_on_smollm2():
    model, tokenizer = load_base("smollm2-135m-instruct", device="cpu")
    torch.manual_seed(0)
    text = {"tokenizer_name_or_path": "smollm2-135m-instruct", "prompt_tuning_init": "TEXT"}
    configs = {
        "brief": PromptTuningConfig(
            num_virtual_tokens=20, prompt_tuning_init_text="Answer in one short sentence.", **text
        ),
        "pirate": PromptTuningConfig(num_virtual_tokens=8, prompt_tuning_init_text="Talk like a pirate.", **text),
        "prefix": PrefixTuningConfig(num_virtual_tokens=6),
    }
    names = list(configs)
    peft = get_peft_model(model, configs[names[0]], adapter_name=names[0], tokenizer=tokenizer)
    for name in names[1:]:
        peft.add_adapter(name, configs[name], tokenizer=tokenizer)
    with torch.no_grad():  # a random prefix of N(0, 1) keys would drown the model: keep it small
        peft.prompt_encoder["prefix"].embedding.weight.mul_(0.1)
    experts = {n: ServedExpert(n, 1, soft_prompt=soft_prompt_of(peft.prompt_encoder[n])) for n in names}
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    plan = [
        ("brief", "What is the capital of France?", DecodingSettings(max_new_tokens=16)),
        ("pirate", "Name a primary colour.", DecodingSettings(max_new_tokens=12, repetition_penalty=1.3)),
        (None, "Why is the sky blue?", DecodingSettings(max_new_tokens=20)),
        ("prefix", "What is 2+2?", DecodingSettings(max_new_tokens=10)),
        (
            "brief",
            "Which city is the capital of Italy? Answer in JSON.",
            DecodingSettings(max_new_tokens=14, grammar=Grammar(json_schema=schema)),
        ),
    ]
    engine = Engine(model, tokenizer)
    requests, handles = [], []
    for i, (expert, question, settings) in enumerate(plan):
        messages = [{"role": "user", "content": question}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        request = ServeRequest(f"r{i}", list(ids["input_ids"]), experts.get(expert), settings)
        requests.append(request)
        handles.append(engine.submit(request))
        engine.step()  # staggered: each request joins a running batch
    engine.run_until_idle()
    eos = model.generation_config.eos_token_id
    for (expert, *_), request, handle in zip(plan, requests, handles, strict=True):
        ids = torch.tensor([request.prompt_ids])
        if expert is None:
            with peft.disable_adapter():
                out = peft.generate(input_ids=ids, decoding=request.settings, tokenizer=tokenizer)
        else:
            out = peft.generate(input_ids=ids, decoding=request.settings, adapter_names=[expert], tokenizer=tokenizer)
        new = out[0, ids.shape[1] :].tolist()
        result = handle.result(timeout=1)
        assert result.token_ids == new[: len(result.token_ids)]
        assert set(new[len(result.token_ids) :]) <= {eos}  # generate pads with eos after the end
        assert len(result.token_ids) == len(new) or result.token_ids[-1] == eos or request.settings.grammar
        assert result.text == tokenizer.decode(result.token_ids, skip_special_tokens=True)
    assert json.loads(handles[-1].result().text)["city"]  # the grammar held in the batch
    assert engine.stats().finished_requests == len(plan)


def test_lora_experts_with_and_without_a_soft_prompt(served):
    """Rows with their own LoRA (from the bank), a soft prompt over a LoRA, a soft prompt alone and the base
    model, in one batch: each equals ``generate`` alone on the model with that LoRA merged (HF PEFT's merge)."""
    from peftkit.serving.lora_bank import LoraBank
    from tests.serving.test_lora_bank import peft_adapter

    adapters = {name: peft_adapter(served.base, name, seed) for seed, name in enumerate(["qv2", "all8"])}
    bank = LoraBank(served.base)  # after the copies: a bank's hooks do not deep-copy
    merged = {}
    try:
        for name, (config, state, peft_model) in adapters.items():
            merged[name] = (bank.add(name, config, state), peft_model.merge_and_unload())
        experts = {
            "qv2": ServedExpert("qv2", 1, lora="qv2", lora_version=merged["qv2"][0]),
            "pt4+all8": dataclasses.replace(
                served.experts["pt4"], name="pt4+all8", lora="all8", lora_version=merged["all8"][0]
            ),
            "pt7": served.experts["pt7"],
            "base": None,
        }
        generator = torch.Generator().manual_seed(12)
        prompts = {name: random_prompt(generator, 3 + 2 * i) for i, name in enumerate(experts)}
        engine = Engine(served.base, served.tokenizer, lora_bank=bank)
        handles = {}
        for name, expert in experts.items():
            handles[name] = engine.submit(ServeRequest(name, prompts[name], expert, GREEDY))
            engine.step()
        engine.run_until_idle()
        results = {name: handle.result().token_ids for name, handle in handles.items()}
    finally:
        bank.close()

    def oracle(model, adapter, prompt):
        peft_model = get_peft_model(model, PromptTuningConfig(num_virtual_tokens=4), adapter_name="pt4")
        with torch.no_grad():
            peft_model.prompt_encoder["pt4"].embedding.weight.copy_(served.peft.prompt_encoder["pt4"].embedding.weight)
        wrapped = dataclasses.replace(served, peft=peft_model)
        return generate_alone(wrapped, adapter, prompt, GREEDY)

    assert results["qv2"] == oracle(merged["qv2"][1], None, prompts["qv2"])
    assert results["pt4+all8"] == oracle(merged["all8"][1], "pt4", prompts["pt4+all8"])
    assert results["pt7"] == generate_alone(served, "pt7", prompts["pt7"], GREEDY)
    assert results["base"] == generate_alone(served, None, prompts["base"], GREEDY)
    assert results["pt4+all8"] != oracle(served.base, "pt4", prompts["pt4+all8"])  # the LoRAs did act
    assert results["qv2"] != generate_alone(served, None, prompts["qv2"], GREEDY)


def test_a_row_whose_lora_is_removed_ends_with_an_error_and_the_others_go_on(served):
    from peftkit.serving.lora_bank import LoraBank
    from tests.serving.test_lora_bank import peft_adapter

    config, state, _ = peft_adapter(served.base, "qv2", 0)
    bank = LoraBank(served.base)
    try:
        expert = ServedExpert("qv2", 1, lora="qv2", lora_version=bank.add("qv2", config, state))
        engine = Engine(served.base, served.tokenizer, lora_bank=bank)
        lora_row = engine.submit(ServeRequest("lora", [5, 6, 7], expert, GREEDY))
        base_row = engine.submit(request(served, "base", None, [8, 9]))
        engine.step()
        bank.remove("qv2")  # the registry unloads it while the request runs
        engine.step()
        assert engine.stats().running == 1
        assert lora_row.result(timeout=1).finish_reason == "error"
        assert len(lora_row.result().token_ids) == 2
        late = engine.submit(ServeRequest("late", [5], expert, GREEDY))
        engine.run_until_idle()
        assert late.result(timeout=1).finish_reason == "error"
        assert late.result().token_ids == []
        assert base_row.result().token_ids == generate_alone(served, None, [8, 9], GREEDY)
    finally:
        bank.close()


def test_many_threads_submitting_while_the_engine_runs(served):
    import threading

    generator = torch.Generator().manual_seed(13)
    names = [None, "pt4", "pt7", "px3", "px5"]
    jobs = [[(names[(t + i) % 5], random_prompt(generator, 1 + (3 * t + i) % 9)) for i in range(5)] for t in range(4)]
    engine = Engine(served.base, served.tokenizer, max_batch_size=6)
    results: dict[tuple[int, int], list[int]] = {}

    def client(t: int) -> None:
        for i, (expert, prompt) in enumerate(jobs[t]):
            handle = engine.submit(request(served, f"t{t}-{i}", expert, prompt))
            if i % 2:  # some clients wait for each answer, others fire and collect later
                results[t, i] = handle.result(timeout=60).token_ids
            else:
                results[t, i] = handle

    engine.start()
    try:
        threads = [threading.Thread(target=client, args=(t,)) for t in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        results = {k: v if isinstance(v, list) else v.result(timeout=60).token_ids for k, v in results.items()}
    finally:
        engine.stop()
    assert len(results) == 20
    for (t, i), tokens in results.items():
        expert, prompt = jobs[t][i]
        assert tokens == generate_alone(served, expert, prompt, GREEDY), (t, i)
    assert engine.stats().finished_requests == 20


def test_stop_with_abort_pending_ends_every_request(served):
    engine = Engine(served.base, served.tokenizer, max_batch_size=1)
    running = engine.submit(request(served, "running", "pt4", [5, 6]))
    waiting = engine.submit(request(served, "waiting", None, [7]))
    assert engine.run_until_idle(max_steps=2) == 2
    engine.stop(abort_pending=True)
    assert running.result(timeout=1).finish_reason == "abort"
    assert len(running.result().token_ids) == 3
    assert waiting.result(timeout=1).finish_reason == "abort"
    assert waiting.result().usage.completion_tokens == 0
    assert not engine.has_work
