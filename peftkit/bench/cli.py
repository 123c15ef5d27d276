"""``peftkit bench personas | many-experts | serve``: argument parsing (the work is in the bench modules)."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path
from typing import Any

from rich.console import Console


def add_bench_parser(commands: Any) -> None:
    """Register ``bench`` and its two actions on the top-level subparsers."""
    from peftkit.bench.many_experts import ManyExpertsSettings
    from peftkit.bench.persona_table import PersonaBenchSettings
    from peftkit.bench.serve import ServeBenchSettings

    bench = commands.add_parser("bench", help="benchmarks: the persona table, many experts vs one at a time")
    actions = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    personas = actions.add_parser("personas", help="seed 001's table on the persona benchmark (docs/benchmarks.md)")
    personas.add_argument("--quick", action="store_true", help="smoke run: 16 personas, 4 per-persona LoRAs, 2 epochs")
    _add_fields(personas, PersonaBenchSettings)
    many = actions.add_parser("many-experts", help="one bank of persona prompts vs HF PEFT one persona at a time")
    _add_fields(many, ManyExpertsSettings)
    serve = actions.add_parser("serve", help="the serving engine vs HF PEFT one adapter at a time vs the bare model")
    _add_fields(serve, ServeBenchSettings)


def _add_fields(parser: argparse.ArgumentParser, settings: type) -> None:
    """One ``--flag`` per settings field (defaults from the dataclass; ``None`` = unset)."""
    for f in fields(settings):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "progress":
            parser.add_argument(flag, action="store_true", help="live progress bars")
        elif f.type in ("Path",):
            parser.add_argument(flag, type=Path, default=None, help=f"default {f.default}")
        elif f.type in ("str",):
            parser.add_argument(flag, default=None, help=f"default {f.default}")
        else:
            kind = float if "float" in str(f.type) else int
            parser.add_argument(flag, type=kind, default=None, help=f"default {f.default}")


def run_bench(args: argparse.Namespace, console: Console) -> int:
    from peftkit.bench.many_experts import ManyExpertsSettings, run_many_experts
    from peftkit.bench.persona_table import QUICK, PersonaBenchSettings, run_persona_bench

    if args.bench_command == "personas":
        chosen = _chosen(args, PersonaBenchSettings)
        settings = PersonaBenchSettings(**((QUICK if args.quick else {}) | chosen))
        run_persona_bench(settings, console)
    elif args.bench_command == "serve":
        from peftkit.bench.serve import ServeBenchSettings, run_serve_bench

        run_serve_bench(ServeBenchSettings(**_chosen(args, ServeBenchSettings)), console)
    else:
        run_many_experts(ManyExpertsSettings(**_chosen(args, ManyExpertsSettings)), console)
    return 0


def _chosen(args: argparse.Namespace, settings: type) -> dict[str, Any]:
    names = {f.name for f in fields(settings)}
    return {k: v for k, v in vars(args).items() if k in names and v not in (None, False)}
