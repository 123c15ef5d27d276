"""The ``peftkit`` command line. Each subcommand is documented in ``docs/cli.md``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peftkit", description="One frozen language model, many small experts.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="the main job: tune a soft prompt for sentiment on the embedded model")
    demo.add_argument("--model", default="smollm2-135m-instruct", help="model alias or local HF folder")
    demo.add_argument("--steps", type=int, default=200, help="optimiser steps (default 200)")
    demo.add_argument("--batch-size", type=int, default=8, help="reviews per step (default 8)")
    demo.add_argument("--lr", type=float, default=1e-2, help="AdamW learning rate (default 1e-2)")
    demo.add_argument("--tokens", type=int, default=20, help="virtual tokens (default 20)")
    demo.add_argument("--test-size", type=int, default=400, help="held-out reviews (default 400)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        default="fp32",
        help="bf16: bf16 matmuls (fp32 weights under autocast on CPU, a bf16 base on GPU; default fp32)",
    )
    demo.add_argument("--output", type=Path, default=Path("runs/demo"), help="where the adapter and summary go")
    demo.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu, cuda or cuda:N")

    train = commands.add_parser(
        "train",
        help="train adapters as a YAML config says (any registered method; runs under torchrun too)",
        description="Train the adapters a YAML run config describes. See docs/training.md for every field.",
    )
    train.add_argument("config", type=Path, help="the run config (YAML), or an expert manifest")
    train.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="override config values, e.g. training.lr=3e-3"
    )
    train.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    train.add_argument("--resume-from", type=Path, metavar="CHECKPOINT", help="continue from this checkpoint folder")
    train.add_argument("--overwrite", action="store_true", help="delete output_dir's checkpoints and start over")
    train.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    train.add_argument("--no-progress", action="store_true", help="no live progress bar")

    evaluate = commands.add_parser(
        "eval",
        help="compare the base model and adapters on metrics and quality targets (exit 1 if a target fails)",
        description="Evaluate the variants a YAML eval config lists. See docs/evaluation.md for every field.",
    )
    evaluate.add_argument("config", nargs="?", type=Path, help="the eval config (YAML); optional with overrides")
    evaluate.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="override config values, e.g. data.eval.limit=50"
    )
    evaluate.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    evaluate.add_argument("--no-progress", action="store_true", help="no live progress bars")

    models = commands.add_parser("models", help="list or prepare the embedded base models")
    models_cmd = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    models_cmd.add_parser("list", help="embedded model aliases and whether they are cached")
    prepare = models_cmd.add_parser("prepare", help="convert an embedded model into the local cache now")
    prepare.add_argument("alias")

    from peftkit.cli import experts

    experts.add_parsers(commands)

    from peftkit.cli import export

    export.add_parser(commands)

    from peftkit.bench.cli import add_bench_parser

    add_bench_parser(commands)

    from peftkit.cli.serve import add_parser as add_serve_parser

    add_serve_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides may also come after flags: `train run.yaml --resume training.lr=1e-3`
        if args.command not in ("train", "eval") or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    console = Console()
    try:
        if args.command == "demo":
            from peftkit.cli.demo import DemoSettings, run_demo

            settings = DemoSettings(
                model=args.model,
                steps=args.steps,
                batch_size=args.batch_size,
                lr=args.lr,
                num_virtual_tokens=args.tokens,
                test_size=args.test_size,
                seed=args.seed,
                output=args.output,
                device=args.device,
                precision=args.precision,
            )
            run_demo(settings, console)
        elif args.command == "train":
            return _train(args, console)
        elif args.command == "eval":
            return _eval(args, console)
        elif args.command == "models":
            return _models(args, console)
        elif args.command == "export":
            from peftkit.cli import export

            return export.run(args, console)
        elif args.command == "bench":
            from peftkit.bench.cli import run_bench

            return run_bench(args, console)
        elif args.command == "serve":
            from peftkit.cli.serve import run_serve

            return run_serve(args, console)
        else:
            from peftkit.cli import experts

            return experts.run(args, console)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False)
        return 2
    return 0


def _train(args: argparse.Namespace, console: Console) -> int:
    from peftkit.experts.train import looks_like_manifest, manifest_run_config
    from peftkit.training.overrides import dump_run_config, load_run_config
    from peftkit.training.run import run_training
    from peftkit.training.trainer import TrainingDivergedError

    loader = manifest_run_config if looks_like_manifest(args.config) else load_run_config
    config = loader(args.config, args.overrides)
    if args.print_config:
        console.print(dump_run_config(config), highlight=False, markup=False, end="")
        return 0
    resume = args.resume_from or args.resume
    try:
        run_training(config, resume=resume, overwrite=args.overwrite, progress=not args.no_progress, console=console)
    except TrainingDivergedError as exc:
        console.print(f"[bold red]diverged:[/] {exc}", highlight=False)
        return 3
    return 0


def _eval(args: argparse.Namespace, console: Console) -> int:
    """Exit status: 0 every target holds, 1 a target fails, 2 invalid config or data."""
    from peftkit.evaluation.run import dump_eval_config, load_eval_config, run_evaluation

    config_path, overrides = args.config, list(args.overrides)
    if config_path is not None and "=" in str(config_path) and not config_path.is_file():
        config_path, overrides = None, [str(args.config), *overrides]  # no file: everything is an override
    config = load_eval_config(config_path, overrides)
    if args.print_config:
        console.print(dump_eval_config(config), highlight=False, markup=False, end="")
        return 0
    report = run_evaluation(config, progress=not args.no_progress, console=console)
    if not report.passed:
        failed = [f"{t.target.text} ({t.variant}: {t.value})" for t in report.targets if not t.passed]
        console.print(f"[bold red]targets failed:[/] {'; '.join(failed)}", highlight=False)
        return 1
    return 0


def _models(args: argparse.Namespace, console: Console) -> int:
    from peftkit.models.loading import EMBEDDED_MODELS, cache_folder, cache_problem, ensure_cached

    if args.models_command == "list":
        table = Table(title="Embedded models")
        for column in ("alias", "package", "cache", "description"):
            table.add_column(column)
        for alias, model in EMBEDDED_MODELS.items():
            folder = cache_folder(model)
            problem = cache_problem(folder)
            table.add_row(alias, model.distribution, str(folder) if problem is None else problem, model.description)
        console.print(table)
        return 0
    if args.alias not in EMBEDDED_MODELS:
        console.print(f"[bold red]error:[/] unknown alias {args.alias!r}; known: {', '.join(EMBEDDED_MODELS)}")
        return 2
    folder = ensure_cached(EMBEDDED_MODELS[args.alias])
    console.print(f"{args.alias}: ready in {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
