"""``peftkit serve``: the OpenAI-compatible server over one frozen model and a folder of experts.

It loads the base model, puts every expert of ``--experts`` into an
:class:`~peftkit.serving.registry.ExpertRegistry` (LoRA weights into a
:class:`~peftkit.serving.lora_bank.LoraBank`), starts the :class:`~peftkit.serving.engine.Engine`
thread and runs uvicorn on the app of :func:`peftkit.serving.http.create_app`. See ``docs/serving.md``.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
from pathlib import Path
from typing import Any

from rich.console import Console

API_KEY_ENV = "PEFTKIT_API_KEY"


def add_parser(commands: Any) -> None:
    serve = commands.add_parser(
        "serve",
        help="serve experts over an OpenAI-compatible HTTP API (completions, chat, streaming)",
        description="Serve every expert of a folder from one base model; see docs/serving.md.",
    )
    serve.add_argument("--experts", type=Path, required=True, help="the experts folder (.expert files, adapters)")
    serve.add_argument("--model", default="smollm2-135m-instruct", help="base model alias or local HF folder")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument(
        "--api-key", default=None, help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV} when set)"
    )
    serve.add_argument("--max-batch-size", type=int, default=32, help="rows decoded together (default 32)")
    serve.add_argument("--max-queue", type=int, default=256, help="waiting requests before 429 (default 256)")
    serve.add_argument("--max-model-len", type=int, default=None, help="prompt + virtual + new tokens, at most")
    serve.add_argument("--max-prompt-tokens", type=int, default=None, help="longer prompts answer 413")
    serve.add_argument(
        "--memory-budget-mb", type=float, default=1024.0, help="experts' memory before LRU eviction (default 1024)"
    )
    serve.add_argument("--enable-admin", action="store_true", help="add /admin/experts/load and /unload")
    serve.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu, cuda or cuda:N")
    serve.add_argument("--log-level", default="warning", help="uvicorn's log level (default warning)")


def check_args(args: argparse.Namespace) -> None:
    """Raise ``ValueError`` naming the flag for a bad value."""
    if not args.experts.is_dir():
        raise ValueError(f"--experts {args.experts}: not a folder")
    for flag, value in (("--max-batch-size", args.max_batch_size), ("--max-queue", args.max_queue),
                        ("--port", args.port)):  # fmt: skip
        if value < 0 or (value == 0 and flag != "--port"):
            raise ValueError(f"{flag}={value}: must be positive")
    for flag, value in (("--max-model-len", args.max_model_len), ("--max-prompt-tokens", args.max_prompt_tokens)):
        if value is not None and value < 1:
            raise ValueError(f"{flag}={value}: must be at least 1")
    if args.memory_budget_mb <= 0:
        raise ValueError(f"--memory-budget-mb={args.memory_budget_mb}: must be positive")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_server(args: argparse.Namespace, console: Console) -> tuple[Any, Any]:
    """``(app, engine)``: the model, registry and engine built from ``args``; the engine not started."""
    from peftkit.models.loading import load_base
    from peftkit.serving.engine import Engine
    from peftkit.serving.http import create_app
    from peftkit.serving.lora_bank import LoraBank
    from peftkit.serving.registry import ExpertRegistry

    model, tokenizer = load_base(args.model, device=args.device)
    bank = LoraBank(model)
    registry = ExpertRegistry(
        model, tokenizer, root=args.experts, lora_bank=bank, memory_budget_bytes=int(args.memory_budget_mb * 2**20)
    )
    registry.load_all()
    engine = Engine(
        model, tokenizer, lora_bank=bank, max_batch_size=args.max_batch_size, max_queue=args.max_queue,
        max_model_len=args.max_model_len,
    )  # fmt: skip
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    app = create_app(
        engine, registry, tokenizer, api_key=api_key, enable_admin=args.enable_admin,
        max_prompt_tokens=args.max_prompt_tokens, served_name=str(args.model),
    )  # fmt: skip
    names = [e["id"] for e in app.state.server.models()]
    console.print(f"model={args.model}; experts ({len(names) - 1}): {', '.join(names[1:]) or 'none'}", highlight=False)
    if api_key is None and not is_loopback(args.host):
        console.print(f"[yellow]warning:[/] listening on {args.host} without --api-key", highlight=False)
    return app, engine


def run_serve(args: argparse.Namespace, console: Console) -> int:
    import uvicorn

    check_args(args)
    app, engine = build_server(args, console)
    engine.start()
    console.print(f"serving on http://{args.host}:{args.port}/v1 (admin {'on' if args.enable_admin else 'off'})")
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    finally:
        engine.stop()
    return 0
