"""``peftkit export --format vllm --experts SRC --output DIR``: experts for another server.

Registered by ``peftkit/cli/main.py`` (:func:`add_parser`, :func:`run`); the work is in
:mod:`peftkit.serving.vllm_export` (see ``docs/vllm-export.md``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.console import Console

FORMATS = ("vllm",)


def add_parser(commands: Any) -> None:
    export = commands.add_parser(
        "export",
        help="write experts for another server (vllm: LoRA folders, prompt_embeds tensors, a client)",
        description="Export experts. See docs/vllm-export.md.",
    )
    export.add_argument("--format", required=True, choices=FORMATS, help="the target server")
    export.add_argument(
        "--experts", required=True, type=Path, help="an .expert file, an adapter or bank folder, or a folder of those"
    )
    export.add_argument("--output", required=True, type=Path, help="the folder to write (new or empty)")
    export.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")


def run(args: argparse.Namespace, console: Console) -> int:
    from peftkit.serving.vllm_export import export_vllm

    index = export_vllm(args.experts, args.output, overwrite=args.overwrite)
    for name, entry in index["experts"].items():
        what = [f"LoRA {entry['lora']}"] if "lora" in entry else []
        if "prompt_embeds" in entry:
            what.append(f"soft prompt {entry['prompt_embeds']} ({entry['num_virtual_tokens']} tokens)")
        console.print(f"{name}: {', '.join(what)}", highlight=False)
    for name, reason in index["skipped"].items():
        console.print(f"[yellow]skipped[/] {name}: {reason}", highlight=False)
    console.print(f"wrote {args.output}/index.json and client_example.py; serve them with:", highlight=False)
    print(index["vllm_serve"])  # one line, to copy
    return 0
