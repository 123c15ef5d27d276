"""``peftkit serve``: its flags, and the whole command in a subprocess driven by the ``openai`` client."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from rich.console import Console

from peftkit import PeftModel, load_base
from peftkit.cli.main import build_parser, main
from peftkit.cli.serve import build_server
from peftkit.decoding import DecodingSettings
from peftkit.session import DecodingSession
from tests.serving.test_http import EXPERTS, write_experts, write_model_folder


def test_serve_defaults_and_flag_checks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(["serve", "--experts", str(tmp_path)])
    assert (args.host, args.port, args.max_batch_size, args.max_queue, args.enable_admin) == (
        "127.0.0.1", 8000, 32, 256, False,
    )  # fmt: skip
    assert main(["serve", "--experts", str(tmp_path / "missing")]) == 2
    assert "--experts" in capsys.readouterr().out
    assert main(["serve", "--experts", str(tmp_path), "--max-queue", "0"]) == 2
    assert "--max-queue=0" in capsys.readouterr().out
    assert main(["serve", "--experts", str(tmp_path), "--memory-budget-mb", "-1"]) == 2
    assert "--memory-budget-mb" in capsys.readouterr().out


def test_serve_connects_the_registry_to_the_engines_prefix_store(tmp_path: Path) -> None:
    """An expert unloaded from the server's registry leaves the engine's prefix store at once."""
    folder = write_model_folder(tmp_path / "model")
    experts = write_experts(tmp_path / "experts", folder)
    args = build_parser().parse_args(["serve", "--experts", str(experts), "--model", str(folder), "--device", "cpu"])
    app, engine = build_server(args, Console(file=io.StringIO()))
    registry = app.state.server.registry
    alpha, beta = registry.get("alpha"), registry.get("beta")
    engine.prefix_store.get_many([alpha, beta])
    assert alpha in engine.prefix_store and beta in engine.prefix_store
    registry.unload("alpha")
    assert alpha not in engine.prefix_store and beta in engine.prefix_store


def test_peftkit_serve_answers_with_the_api_key_from_the_environment(tmp_path: Path) -> None:
    folder = write_model_folder(tmp_path / "model")
    experts = write_experts(tmp_path / "experts", folder)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PEFTKIT_API_KEY": "from-env", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "peftkit.cli.main", "serve", "--experts", str(experts), "--model", str(folder),
               "--port", str(port), "--device", "cpu", "--max-batch-size", "4"]  # fmt: skip
    server = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stdout.read()
            assert time.monotonic() < deadline, "peftkit serve did not come up"
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        assert httpx.get(f"{url}/v1/models").status_code == 401
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="from-env", max_retries=0)
        assert {m.id for m in client.models.list()} == {"base", *EXPERTS}
        reply = client.completions.create(model="beta", prompt="hello", max_tokens=8, temperature=0)
    finally:
        server.send_signal(signal.SIGINT)
        out, _ = server.communicate(timeout=30)
    assert server.returncode == 0, out
    assert "serving on http://127.0.0.1" in out and "experts (3)" in out
    base, tokenizer = load_base(folder)
    model = PeftModel.from_pretrained(base, experts / "beta").eval()
    ids = tokenizer("hello")["input_ids"]
    assert reply.choices[0].text == DecodingSession(model, tokenizer, DecodingSettings(max_new_tokens=8)).generate(ids)
