"""Expert subcommands: ``package``, ``validate``, ``inspect``, ``generate``, ``chat``.

Registered by ``peftkit/cli/main.py`` (:func:`add_parsers`, :func:`run`). ``peftkit train MANIFEST``
lives in ``main.py``'s ``train`` (it recognises a manifest by its ``base_model`` key).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

COMMANDS = ("package", "validate", "inspect", "generate", "chat")


def add_parsers(commands: Any) -> None:
    from peftkit.cli.chat import add_decoding_arguments

    package = commands.add_parser("package", help="build NAME-VERSION.expert from a manifest and its trained weights")
    package.add_argument("manifest", type=Path, help="the expert manifest (YAML or JSON)")
    package.add_argument("--weights", type=Path, help="trained adapters (default: <training.output_dir>/adapter)")
    package.add_argument("--eval-report", type=Path, help="an evaluation report.json to include")
    package.add_argument("--output", type=Path, default=Path("."), help="folder for the .expert file (default .)")

    validate = commands.add_parser("validate", help="check a manifest or .expert file; every field's status")
    validate.add_argument("target", type=Path, help="a manifest (.yaml/.json) or an expert (.expert)")
    validate.add_argument("--json", action="store_true", help="machine-readable output")
    validate.add_argument("--no-base", action="store_true", help="do not load the base model's config/tokenizer")

    inspect = commands.add_parser("inspect", help="list what an expert file holds")
    inspect.add_argument("expert", type=Path)
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    inspect.add_argument("--extract", type=Path, metavar="DIR", help="also unpack it into DIR (empty or new)")

    generate = commands.add_parser("generate", help="generate once (decoding from the expert's manifest)")
    add_decoding_arguments(generate)
    generate.add_argument("prompt", help="the prompt ('-' reads stdin)")

    chat = commands.add_parser("chat", help="chat with an expert (terminal or piped stdin)")
    add_decoding_arguments(chat)


def run(args: argparse.Namespace, console: Console) -> int:
    if args.command == "package":
        from peftkit.experts.package import build_package

        path = build_package(
            args.manifest, weights_dir=args.weights, eval_report=args.eval_report, output_dir=args.output
        )
        console.print(f"wrote {path} ({path.stat().st_size:,} bytes)", highlight=False)
        return 0
    if args.command == "validate":
        from peftkit.experts.validate import validate_target

        report = validate_target(args.target, check_base=not args.no_base)
        if args.json:
            print(json.dumps(report.to_dict(), indent=2, default=str))
        else:
            print("\n".join(report.lines()))  # plain lines: no wrapping, easy to grep
        return 0 if report.ok else 1
    if args.command == "inspect":
        return _inspect(args, console)
    from peftkit.cli.chat import run_chat, run_generate

    return run_generate(args) if args.command == "generate" else run_chat(args)


def _inspect(args: argparse.Namespace, console: Console) -> int:
    from peftkit.experts.archive import extract_expert
    from peftkit.experts.package import inspect_expert

    info = inspect_expert(args.expert)
    if args.extract:
        extract_expert(args.expert, args.extract)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    fingerprint = info["base_model"].get("fingerprint", {})
    console.print(f"[bold]{info['name']} {info['version']}[/] — {info['description']}", highlight=False)
    console.print(f"base model: {info['base_model']['name']} {fingerprint}", highlight=False, markup=False)
    for p in info["soft_prompts"]:
        console.print(f"soft prompt {p['name']}: {p['tokens']} tokens, init {p.get('init_method', 'random')}"
                      f" — {p.get('purpose', '')}", highlight=False, markup=False)  # fmt: skip
    for a in info["adapters"]:
        console.print(f"adapter {a['name']}: {a['type']} {a.get('config', {})}", highlight=False, markup=False)
    console.print(f"decoding: {info['decoding']}", highlight=False, markup=False)
    console.print(f"runtime: {info['runtime']}", highlight=False, markup=False)
    console.print(f"quality targets: {info['quality_targets']}; evaluation: {info['evaluation']}", highlight=False,
                  markup=False)  # fmt: skip
    table = Table(title="files")
    for column in ("member", "bytes", "sha256", "tensors"):
        table.add_column(column)
    for f in info["files"]:
        shapes = info["tensors"].get(f["name"])
        table.add_row(f["name"], f"{f['bytes']:,}", (f["sha256"] or "")[:16], json.dumps(shapes) if shapes else "")
    console.print(table)
    if args.extract:
        console.print(f"extracted into {args.extract}", highlight=False)
    return 0
