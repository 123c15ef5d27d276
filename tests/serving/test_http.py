"""The OpenAI-compatible server, driven by the official ``openai`` client over loopback.

A uvicorn server runs in a background thread on a random free port, over the real ``Engine`` and
``ExpertRegistry``: a tiny random Llama with a character tokenizer, and prompt- and prefix-tuning
adapters saved with peftkit's ``save_pretrained`` into an experts folder. Every greedy answer is
checked against ``DecodingSession`` (what ``peftkit generate`` runs) on a ``PeftModel`` loaded from
the same adapter folder.

The model's end-of-sequence, padding and out-of-alphabet output rows are zeroed, so it writes
letters and never stops by itself: answers are long enough to compare, and a request runs until
``max_tokens`` unless it is stopped or cancelled.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest
import torch
import uvicorn

from peftkit import PeftModel, PrefixTuningConfig, PromptTuningConfig, get_peft_model, load_base
from peftkit.decoding import DecodingSettings
from peftkit.serving.engine import Engine
from peftkit.serving.http import create_app
from peftkit.serving.http.app import _Server
from peftkit.serving.lora_bank import LoraBank
from peftkit.serving.registry import ExpertRegistry
from peftkit.serving.types import ServeRequest
from peftkit.session import ChatTemplate, DecodingSession
from tests.evaluation.conftest import write_char_folder

KEY = "test-key-0123456789"
EXPERTS = {
    "alpha": lambda: PromptTuningConfig(num_virtual_tokens=3, init_seed=1),
    "beta": lambda: PromptTuningConfig(num_virtual_tokens=6, init_seed=2),
    "gamma": lambda: PrefixTuningConfig(num_virtual_tokens=4),
}
MAX_MODEL_LEN = 4096


@contextmanager
def running(app: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free loopback port in a thread; yields the base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@dataclass
class World:
    """The model folder, the experts folder, the references and one running server (API key on, admin on)."""

    folder: Path
    experts: Path
    base: Any
    tokenizer: Any
    engine: Engine
    registry: ExpertRegistry
    url: str

    def client(self, key: str | None = KEY, **kwargs: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key or "none", max_retries=0, **kwargs)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {KEY}"}

    def reference(self, name: str, ids: list[int], max_tokens: int, stop: tuple[str, ...] = ()) -> str:
        """Greedy ``DecodingSession`` on a PeftModel loaded from the expert's folder (base: no adapter)."""
        model = _reference_model(self, name)
        settings = DecodingSettings(max_new_tokens=max_tokens, stop=stop)
        return DecodingSession(model, self.tokenizer, settings).generate(ids)

    def completion_ids(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt)["input_ids"])

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        return ChatTemplate(self.tokenizer).conversation_ids(messages)

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", headers=self.headers()).text


_REFERENCE_MODELS: dict[tuple[int, str], Any] = {}


def _reference_model(world: World, name: str) -> Any:
    key = (id(world), name)
    if key not in _REFERENCE_MODELS:
        base, _ = load_base(world.folder)  # its own copy: the engine's model is never wrapped
        model = PeftModel(base, None) if name == "base" else PeftModel.from_pretrained(base, world.experts / name)
        _REFERENCE_MODELS[key] = model.eval()
    return _REFERENCE_MODELS[key]


def write_model_folder(folder: Path) -> Path:
    """The character-tokenizer tiny Llama, with the output rows of special and unused ids zeroed."""
    write_char_folder(folder)
    model, tokenizer = load_base(folder)
    with torch.no_grad():
        weight = model.get_output_embeddings().weight
        weight[:3] = 0  # <pad>, <s>, </s>: a logit of 0 is never the greedy choice among ~50 random ones
        weight[len(tokenizer) :] = 0
    model.save_pretrained(folder)
    return folder


def write_experts(folder: Path, model_folder: Path) -> Path:
    for name, config in EXPERTS.items():
        base, _ = load_base(model_folder)
        torch.manual_seed(sum(map(ord, name)))
        peft = get_peft_model(base, config())
        with torch.no_grad():
            for p in peft.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.5)  # far from the init, so that each expert answers differently
        peft.save_pretrained(folder / name)  # one PEFT adapter folder per expert; its name is the folder's
    return folder


@dataclass
class Parts:
    model: Any
    tokenizer: Any
    bank: LoraBank
    registry: ExpertRegistry
    folder: Path
    experts: Path

    def engine(self, **kwargs: Any) -> Engine:
        return Engine(self.model, self.tokenizer, lora_bank=self.bank, **kwargs)


def build(tmp: Path) -> Parts:
    """The model and experts folders written, the model loaded, every expert registered."""
    folder = write_model_folder(tmp / "model")
    experts = write_experts(tmp / "experts", folder)
    model, tokenizer = load_base(folder)
    bank = LoraBank(model)
    registry = ExpertRegistry(model, tokenizer, root=experts, lora_bank=bank, memory_budget_bytes=2**26)
    registry.load_all()
    return Parts(model, tokenizer, bank, registry, folder, experts)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    parts = build(tmp_path_factory.mktemp("http"))
    engine = parts.engine(max_batch_size=8, max_queue=64, max_model_len=MAX_MODEL_LEN)
    app = create_app(engine, parts.registry, parts.tokenizer, api_key=KEY, enable_admin=True, max_prompt_tokens=200)
    engine.start()
    try:
        with running(app) as url:
            yield World(parts.folder, parts.experts, parts.model, parts.tokenizer, engine, parts.registry, url)
    finally:
        engine.stop(abort_pending=True)


def wait_idle(engine: Engine, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while engine.stats().running or engine.stats().queue_depth:
        assert time.monotonic() < deadline, "the engine did not become idle"
        time.sleep(0.01)


# ------------------------------------------------------------------ completions and chat


@pytest.mark.parametrize("name", ["alpha", "gamma", "base"])
def test_completion_equals_generate(world: World, name: str) -> None:
    prompt = "give me some letters"
    reply = world.client().completions.create(model=name, prompt=prompt, max_tokens=12, temperature=0)
    assert reply.object == "text_completion"
    assert reply.choices[0].text == world.reference(name, world.completion_ids(prompt), 12)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.prompt_tokens == len(world.completion_ids(prompt))
    assert reply.usage.completion_tokens == 12
    assert reply.model == name and reply.model_extra["expert"] == name


def test_chat_equals_generate_with_the_chat_template(world: World) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"},
                {"role": "assistant", "content": "hi"}, {"role": "user", "content": "more"}]  # fmt: skip
    reply = world.client().chat.completions.create(model="beta", messages=messages, max_tokens=10, temperature=0)
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == world.reference("beta", world.chat_ids(messages), 10)
    assert reply.usage.prompt_tokens == len(world.chat_ids(messages))


def test_streaming_chunks_join_to_the_whole_answer(world: World) -> None:
    client = world.client()
    prompt = "stream this"
    expected = world.reference("alpha", world.completion_ids(prompt), 15)
    chunks = list(client.completions.create(model="alpha", prompt=prompt, max_tokens=15, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert len([c for c in chunks if c.choices and c.choices[0].text]) > 1  # it did stream
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 15

    messages = [{"role": "user", "content": "stream a chat"}]
    chunks = list(client.chat.completions.create(model="gamma", messages=messages, max_tokens=9, temperature=0,
                                                 stream=True))  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.model_extra["expert"] == "gamma" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == world.reference("gamma", world.chat_ids(messages), 9)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_raw_sse_ends_with_done(world: World) -> None:
    body = {"model": "alpha", "prompt": "raw", "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{world.url}/v1/completions", json=body, headers=world.headers()) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "text_completion"


def test_stop_sequence_cuts_the_answer(world: World) -> None:
    prompt = "stop somewhere"
    full = world.reference("alpha", world.completion_ids(prompt), 20)
    stop = full[5:7]  # a string that occurs in the greedy answer
    expected = world.reference("alpha", world.completion_ids(prompt), 20, stop=(stop,))
    reply = world.client().completions.create(model="alpha", prompt=prompt, max_tokens=20, temperature=0, stop=[stop])
    assert reply.choices[0].text == expected == full[: full.find(stop)]
    assert reply.choices[0].finish_reason == "stop"


def test_manifest_defaults_and_request_overrides(world: World) -> None:
    """The expert's decoding settings are the defaults; each request field overrides its own."""
    served = world.registry.get("alpha")
    before = served.decoding
    served.decoding = DecodingSettings(max_new_tokens=4, stop=("zzz",))
    try:
        client = world.client()
        by_default = client.completions.create(model="alpha", prompt="defaults")
        assert by_default.usage.completion_tokens == 4 and by_default.choices[0].finish_reason == "length"
        assert by_default.choices[0].text == world.reference("alpha", world.completion_ids("defaults"), 4)
        overridden = client.completions.create(model="alpha", prompt="defaults", max_tokens=7)
        assert overridden.usage.completion_tokens == 7
        assert overridden.choices[0].text.startswith(by_default.choices[0].text)
    finally:
        served.decoding = before


def test_seeded_sampling_is_reproducible(world: World) -> None:
    client = world.client()
    kwargs = {"model": "beta", "prompt": "sample", "max_tokens": 12, "temperature": 1.0, "seed": 11}
    first = client.completions.create(**kwargs).choices[0].text
    assert client.completions.create(**kwargs).choices[0].text == first
    greedy = world.reference("beta", world.completion_ids("sample"), 12)
    others = {client.completions.create(**{**kwargs, "seed": s}).choices[0].text for s in range(4)}
    assert len(others | {greedy}) > 1  # sampling does sample


def test_json_schema_response_format(world: World) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "ok": {"type": "boolean"}},
              "required": ["n", "ok"], "additionalProperties": False}  # fmt: skip
    reply = world.client().chat.completions.create(
        model="alpha", messages=[{"role": "user", "content": "json please"}], max_tokens=60, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
    )  # fmt: skip
    jsonschema.validate(json.loads(reply.choices[0].message.content), schema)


def test_fallback_names_the_expert_and_level(world: World) -> None:
    prompt = "fall back"
    reply = world.client().completions.create(
        model="missing", prompt=prompt, max_tokens=6, temperature=0, extra_body={"fallback": ["also-missing", "beta"]}
    )
    assert reply.model_extra["expert"] == "beta" and reply.model_extra["fallback_level"] == 2
    direct = world.client().completions.create(model="beta", prompt=prompt, max_tokens=6, temperature=0)
    assert direct.model_extra["fallback_level"] == 0
    assert reply.choices[0].text == direct.choices[0].text == world.reference("beta", world.completion_ids(prompt), 6)


def test_models_lists_base_and_experts(world: World) -> None:
    listed = {m.id for m in world.client().models.list()}
    assert listed == {"base", *EXPERTS}
    assert world.client().models.retrieve("gamma").id == "gamma"


# ------------------------------------------------------------------ bad input and limits


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("temperature", {"temperature": 2.5}),
        ("top_p", {"top_p": 0}),
        ("max_tokens", {"max_tokens": 0}),
        ("n", {"n": 2}),
        ("seed", {"seed": -1}),
        ("stop", {"stop": [""]}),
        ("top_k", {"extra_body": {"top_k": -5}}),
        ("presence_penalty", {"presence_penalty": 3.0}),
        ("frequency_penalty", {"frequency_penalty": -2.5}),
        ("colour", {"extra_body": {"colour": "blue"}}),
        ("prompt", {"prompt": ""}),
        ("prompt", {"prompt": ["two", "prompts"]}),
        ("response_format", {"extra_body": {"response_format": {"type": "json_schema"}}}),
        ("stream_options", {"stream_options": {"include_usage": True}}),
        ("stream_options", {"stream": False, "stream_options": {"include_usage": False}}),
    ],
)
def test_invalid_values_answer_400_naming_the_field(world: World, field: str, kwargs: dict[str, Any]) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        world.client().completions.create(**{"model": "alpha", "prompt": "x", **kwargs})
    error = caught.value.body
    assert error["param"] == field and field in error["message"]
    assert error["type"] == "invalid_request_error"


def test_invalid_json_and_wrong_types_answer_400(world: World) -> None:
    url, headers = f"{world.url}/v1/chat/completions", world.headers()
    messages = [{"role": "user", "content": "x"}]
    options = {"model": "alpha", "messages": messages, "stream_options": {"include_usage": True}}
    for body in (options, {**options, "stream": None}):  # stream_options without stream: true
        refused = httpx.post(url, json=body, headers=headers)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "stream_options"
        assert "stream_options is only allowed when stream is true" in refused.json()["error"]["message"]
    wrong_stream = httpx.post(url, json={**options, "stream": "maybe"}, headers=headers)
    assert wrong_stream.status_code == 400 and wrong_stream.json()["error"]["param"] == "stream"
    assert "stream_options" not in wrong_stream.json()["error"]["message"]  # one error: the bad stream
    broken = httpx.post(url, content=b"{not json", headers={**headers, "Content-Type": "application/json"})
    assert broken.status_code == 400 and "JSON" in broken.json()["error"]["message"]
    wrong = httpx.post(url, json={"model": "alpha", "messages": [{"role": "robot", "content": "x"}]}, headers=headers)
    assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "messages"
    assert "messages.0.role" in wrong.json()["error"]["message"]


def test_unknown_expert_answers_404(world: World) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        world.client().chat.completions.create(model="nobody", messages=[{"role": "user", "content": "x"}])
    assert caught.value.body["param"] == "model" and "nobody" in caught.value.body["message"]


def test_oversized_prompts_answer_413(world: World) -> None:
    client = world.client()
    with pytest.raises(openai.APIStatusError) as caught:  # over the server's --max-prompt-tokens (200)
        client.completions.create(model="alpha", prompt="a" * 201, max_tokens=1)
    assert caught.value.status_code == 413 and "201 tokens" in caught.value.body["message"]
    with pytest.raises(openai.APIStatusError) as caught:  # prompt + virtual + max_tokens over the model
        client.completions.create(model="alpha", prompt="a" * 100, max_tokens=MAX_MODEL_LEN)
    assert caught.value.status_code == 413


def test_api_key_protects_everything_but_health(world: World) -> None:
    for key in (None, "wrong-key", KEY[:-1]):
        with pytest.raises(openai.AuthenticationError):
            world.client(key=key).models.list()
    assert httpx.get(f"{world.url}/metrics").status_code == 401
    bare = httpx.post(f"{world.url}/v1/completions", json={"model": "alpha", "prompt": "x"})
    assert bare.status_code == 401 and bare.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{world.url}/health").json() == {"status": "ok"}
    assert world.client().models.list().data


class _Died(BaseException):
    """What no ``except Exception`` catches: it ends the engine's thread."""


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_health_reports_whether_the_engine_thread_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """200 while the engine's thread is alive; 503 before it starts, after it stops, and once it died (no key
    needed)."""
    parts = build(tmp_path)
    engine = parts.engine()

    def health() -> tuple[int, dict[str, Any]]:
        response = httpx.get(f"{url}/health")
        return response.status_code, response.json()

    with running(create_app(engine, parts.registry, parts.tokenizer, api_key=KEY)) as url:
        status, body = health()
        assert status == 503 and body["status"] == "unavailable" and not engine.running
        assert body["error"]["code"] == "engine_not_running" and "not running" in body["error"]["message"]
        engine.start()
        assert engine.running and health() == (200, {"status": "ok"})
        engine.stop()
        assert not engine.running and health()[0] == 503

        def die() -> int:
            raise _Died("a failure the scheduler loop does not survive")

        monkeypatch.setattr(engine, "step", die)
        engine.start()
        assert health() == (200, {"status": "ok"})
        settings = DecodingSettings(max_new_tokens=1)
        engine.submit(ServeRequest(request_id="r", prompt_ids=[5], expert=None, settings=settings))
        deadline = time.monotonic() + 10
        while engine.running:  # its first step kills the thread
            assert time.monotonic() < deadline, "the engine thread did not die"
            time.sleep(0.01)
        assert health()[0] == 503
        errors = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
        assert re.search(r'^peftkit_http_errors_total{status="503"} 3\.0$', errors, re.M)
    engine.stop(abort_pending=True)


def test_full_queue_answers_429_with_retry_after(tmp_path: Path) -> None:
    """A queue of one, and an engine that is not stepping: the second request finds the queue full. The
    first one's client leaves while it waits: it is cancelled before it generates anything."""
    parts = build(tmp_path)
    engine = parts.engine(max_batch_size=1, max_queue=1)
    with running(create_app(engine, parts.registry, parts.tokenizer)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=30)
        body = {"model": "alpha", "prompt": "wait", "max_tokens": 200, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30):
            deadline = time.monotonic() + 10
            while engine.stats().queue_depth < 1:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            with pytest.raises(openai.RateLimitError) as caught:
                client.completions.create(model="alpha", prompt="x", max_tokens=2)
            assert int(caught.value.response.headers["retry-after"]) >= 1
            assert caught.value.body["code"] == "queue_full"
        engine.start()
        try:
            wait_idle(engine)  # the waiting request, whose client left, leaves the queue without a token
            assert engine.stats().generated_tokens == 0
            assert client.completions.create(model="alpha", prompt="x", max_tokens=2).usage.completion_tokens == 2
        finally:
            engine.stop(abort_pending=True)


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_frees_its_slot(world: World, stream: bool) -> None:
    wait_idle(world.engine)
    before = world.engine.stats().generated_tokens
    body = {"model": "alpha", "prompt": "long", "max_tokens": MAX_MODEL_LEN - 20, "stream": stream}
    started = time.monotonic()
    if stream:
        with httpx.stream("POST", f"{world.url}/v1/completions", json=body, headers=world.headers()) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
    else:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{world.url}/v1/completions", json=body, headers=world.headers(), timeout=0.5)
    left = time.monotonic()
    wait_idle(world.engine, timeout=5)
    freed = time.monotonic() - left
    generated = world.engine.stats().generated_tokens - before
    assert freed < 2.0, f"the slot was freed {freed:.2f} s after the client left"
    assert generated < MAX_MODEL_LEN - 20, "the request ran to its end"
    assert 'finish_reason="abort"' in world.metrics()
    assert time.monotonic() - started < 10


def test_admin_endpoints_are_off_by_default(tmp_path: Path) -> None:
    parts = build(tmp_path)
    with running(create_app(parts.engine(), parts.registry, parts.tokenizer)) as url:
        response = httpx.post(f"{url}/admin/experts/load", json={"path": "alpha"})
        assert response.status_code == 404 and "no such endpoint" in response.json()["error"]["message"]
        assert httpx.post(f"{url}/admin/experts/unload", json={"name": "alpha"}).status_code == 404


def test_admin_refuses_paths_outside_the_experts_folder(world: World, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    write_experts(outside, world.folder)
    url, headers = f"{world.url}/admin/experts/load", world.headers()
    for path in [str(outside / "alpha"), "../model", "alpha/../../model", "/etc/passwd"]:
        response = httpx.post(url, json={"path": path}, headers=headers)
        assert response.status_code in (400, 403, 404), path
        assert response.json()["error"]["param"] == "path"
    assert {m.id for m in world.client().models.list()} == {"base", *EXPERTS}
    for name in ["../model", "/etc/passwd", "alpha/../../model", "..", ".", "a\x00b", "~"]:  # nor a model name
        with pytest.raises(openai.NotFoundError):
            world.client().completions.create(model=name, prompt="x", max_tokens=1)


def test_admin_unload_then_load(world: World) -> None:
    """Unloading frees an expert's memory; it stays listed and loads again when asked for (a new version)."""
    client, headers = world.client(), world.headers()

    def listed() -> dict[str, Any]:
        return {m.id: m.model_extra for m in client.models.list()}

    version = listed()["gamma"]["version"]
    client.completions.create(model="gamma", prompt="cache me", max_tokens=1)
    served = world.registry.get("gamma")
    assert served in world.engine.prefix_store  # its virtual-token keys/values are cached
    unloaded = httpx.post(f"{world.url}/admin/experts/unload", json={"name": "gamma"}, headers=headers)
    assert unloaded.status_code == 200 and unloaded.json() == {"unloaded": "gamma"}
    assert listed()["gamma"]["loaded"] is False
    assert served not in world.engine.prefix_store  # and they went with it
    missing = httpx.post(f"{world.url}/admin/experts/unload", json={"name": "delta"}, headers=headers)
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "name"
    reply = client.completions.create(model="gamma", prompt="back", max_tokens=5, temperature=0)
    assert reply.choices[0].text == world.reference("gamma", world.completion_ids("back"), 5)
    assert listed()["gamma"]["loaded"] is True and listed()["gamma"]["version"] > version
    loaded = httpx.post(f"{world.url}/admin/experts/load", json={"path": "gamma"}, headers=headers)
    assert loaded.status_code == 200 and loaded.json() == {"loaded": ["gamma"]}


# ------------------------------------------------------------------ concurrency and metrics


def test_concurrent_requests_across_experts_equal_their_single_results(world: World) -> None:
    names = ["alpha", "beta", "gamma", "base"]
    jobs = [(names[i % 4], f"prompt number {i}", 4 + i % 5, i % 3 == 0, i % 2 == 0) for i in range(24)]

    def ask(job: tuple[str, str, int, bool, bool]) -> str:
        name, prompt, max_tokens, stream, chat = job
        client = world.client()
        if chat:
            messages = [{"role": "user", "content": prompt}]
            reply = client.chat.completions.create(model=name, messages=messages, max_tokens=max_tokens,
                                                   temperature=0, stream=stream)  # fmt: skip
            if stream:
                return "".join(c.choices[0].delta.content or "" for c in reply if c.choices)
            return reply.choices[0].message.content
        reply = client.completions.create(model=name, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                          stream=stream)  # fmt: skip
        if stream:
            return "".join(c.choices[0].text for c in reply if c.choices)
        return reply.choices[0].text

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(ask, jobs))
    for (name, prompt, max_tokens, _, chat), answer in zip(jobs, answers, strict=True):
        ids = world.chat_ids([{"role": "user", "content": prompt}]) if chat else world.completion_ids(prompt)
        assert answer == world.reference(name, ids, max_tokens), (name, prompt)


def test_a_slow_submit_does_not_stall_the_other_requests(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """``engine.submit`` runs off the event loop: while one request's submit is held (as a grammar that
    takes long to compile would hold it), another request is answered."""
    real, entered, released, waited = world.engine.submit, threading.Event(), threading.Event(), []

    def slow_submit(request: Any, loop: Any = None) -> Any:
        if request.settings.grammar is not None:
            entered.set()
            waited.append(released.wait(timeout=10))  # until the other request has its answer
        return real(request, loop=loop)

    monkeypatch.setattr(world.engine, "submit", slow_submit)
    messages = [{"role": "user", "content": "json please"}]
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(world.client().chat.completions.create, model="alpha", messages=messages, max_tokens=8,
                           temperature=0, response_format={"type": "json_object"})  # fmt: skip
        assert entered.wait(timeout=10)
        other = world.client(timeout=5).completions.create(model="beta", prompt="meanwhile", max_tokens=3)
        released.set()
        held = slow.result(timeout=30)
    assert waited == [True]  # released by the test, after the other answer: not by its timeout
    assert other.choices[0].text == world.reference("beta", world.completion_ids("meanwhile"), 3)
    assert held.choices[0].finish_reason in ("stop", "length") and held.choices[0].message.content.startswith("{")


def test_a_request_cancelled_while_it_is_submitted_is_cancelled_in_the_engine() -> None:
    """The worker thread cannot be interrupted: the handle it returns to a cancelled caller is cancelled."""
    started = threading.Event()

    class Handle:
        cancelled = False

        def cancel(self) -> None:
            self.cancelled = True

    class SlowEngine:
        handle = Handle()

        def submit(self, request: Any, loop: Any = None) -> Handle:
            started.set()
            time.sleep(0.3)
            return self.handle

    server = _Server(SlowEngine(), None, None, None, None, "base")

    async def cancel_during_submit() -> None:
        task = asyncio.create_task(server.submit(None))
        assert await asyncio.to_thread(started.wait, 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not SlowEngine.handle.cancelled  # the caller did not wait for the worker thread
        for _ in range(500):
            if SlowEngine.handle.cancelled:
                return
            await asyncio.sleep(0.01)
        raise AssertionError("the request submitted for a cancelled caller was not cancelled")

    asyncio.run(cancel_during_submit())


def test_metrics_count_requests_and_report_the_engine(world: World) -> None:
    def count(text: str, expert: str) -> float:
        found = re.findall(rf'^peftkit_requests_total{{expert="{expert}",finish_reason="length"}} (\S+)$', text, re.M)
        return float(found[0]) if found else 0.0

    before = world.metrics()
    for _ in range(3):
        world.client().completions.create(model="beta", prompt="count", max_tokens=2)
    after = world.metrics()
    assert count(after, "beta") == count(before, "beta") + 3
    for name in ("peftkit_queue_depth", "peftkit_running_rows", "peftkit_tokens_per_second",
                 "peftkit_request_latency_seconds_bucket", "peftkit_time_to_first_token_seconds_count",
                 "process_resident_memory_bytes"):  # fmt: skip
        assert re.search(rf"^{name}[{{ ]", after, re.M), name


@pytest.mark.smollm2
def test_smollm2_chat_through_the_server(tmp_path: Path) -> None:
    """The real model and its chat template: an expert's greedy chat answer equals ``generate``'s."""
    model, tokenizer = load_base("smollm2-135m-instruct")
    reference_base, _ = load_base("smollm2-135m-instruct")
    peft = get_peft_model(reference_base, PromptTuningConfig(num_virtual_tokens=8, init_seed=3))
    peft.save_pretrained(tmp_path / "experts" / "tutor")
    bank = LoraBank(model)
    registry = ExpertRegistry(model, tokenizer, root=tmp_path / "experts", lora_bank=bank, memory_budget_bytes=2**26)
    registry.load_all()
    engine = Engine(model, tokenizer, lora_bank=bank, max_batch_size=4)
    engine.start()
    messages = [{"role": "user", "content": "Name a colour."}]
    try:
        with running(create_app(engine, registry, tokenizer, served_name="smollm2-135m-instruct")) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
            reply = client.chat.completions.create(model="tutor", messages=messages, max_tokens=12, temperature=0)
            streamed = client.chat.completions.create(model="base", messages=messages, max_tokens=12, temperature=0,
                                                      stream=True)  # fmt: skip
            base_text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    finally:
        engine.stop(abort_pending=True)
    ids = ChatTemplate(tokenizer).conversation_ids(messages)
    settings = DecodingSettings(max_new_tokens=12)
    assert reply.choices[0].message.content == DecodingSession(peft.eval(), tokenizer, settings).generate(ids)
    with peft.disable_adapter():
        assert base_text == DecodingSession(peft, tokenizer, settings).generate(ids)


def test_load_test_script_against_the_server(world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``scripts/load_test.py``: loopback only; its counts agree with the server's."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("load_test", Path(__file__).parents[2] / "scripts" / "load_test.py")
    load_test = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "load_test", load_test)  # its dataclass looks its module up
    spec.loader.exec_module(load_test)
    with pytest.raises(SystemExit, match="loopback"):
        load_test.main(["--url", "http://192.0.2.1:9", "--duration", "1"])
    out = tmp_path / "report.json"
    before = world.metrics()
    code = load_test.main(["--url", world.url, "--clients", "6", "--duration", "2", "--max-requests", "3",
                           "--max-tokens", "3", "--api-key", KEY, "--json", str(out)])  # fmt: skip
    report = json.loads(out.read_text())
    assert code == 0 and report["errors"] == {} and report["rejected_429"] == 0
    assert 6 <= report["requests_ok"] == sum(report["requests_per_expert"].values()) <= 18
    assert set(report["requests_per_expert"]) <= {"base", *EXPERTS}
    assert report["generated_tokens"] == 3 * report["requests_ok"]  # this model never stops early

    def answered(text: str) -> float:
        return sum(map(float, re.findall(r'^peftkit_requests_total{expert="[^"]+",finish_reason="length"} (\S+)$',
                                         text, re.M)))  # fmt: skip

    assert answered(world.metrics()) - answered(before) == report["requests_ok"]
    assert report["server_memory_mib_after"]["rss"] > 0
