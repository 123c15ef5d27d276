"""``peftkit generate`` and ``peftkit chat``: decode with an expert, settings from its manifest.

Precedence: command-line flags > the manifest's ``decoding`` (unless ``--ignore-manifest-decoding``)
> defaults. At start-up one line per setting, on stderr, says its value and where it came from
(``temperature=0.1 (manifest)``, ``top_p=0.9 (--top-p)``, ``top_k=0 (default)``). The reply streams
to stdout token by token. ``chat`` reads turns from a terminal or from piped stdin (one line a turn).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, TextIO

from peftkit.decoding import DecodingSettings, resolve_decoding

FLAGS = {  # field -> (flag, type)
    "temperature": ("--temperature", float),
    "top_p": ("--top-p", float),
    "top_k": ("--top-k", int),
    "min_p": ("--min-p", float),
    "repetition_penalty": ("--repetition-penalty", float),
    "presence_penalty": ("--presence-penalty", float),
    "frequency_penalty": ("--frequency-penalty", float),
    "max_new_tokens": ("--max-new-tokens", int),
    "seed": ("--seed", int),
}


def add_decoding_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--expert", type=Path, help="an expert file (NAME-VERSION.expert)")
    source.add_argument("--model", help="a base model alone (alias or folder), no expert")
    for field, (flag, kind) in FLAGS.items():
        parser.add_argument(flag, dest=field, type=kind, default=None, help=f"override {field}")
    parser.add_argument("--max-tokens", dest="max_new_tokens", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--stop", action="append", default=None, help="a stop sequence (repeat for several)")
    parser.add_argument("--json-schema", type=Path, help="constrain the output to this JSON Schema file")
    parser.add_argument("--gbnf", type=Path, help="constrain the output to this GBNF grammar file")
    parser.add_argument("--no-grammar", action="store_true", help="drop the manifest's grammar")
    parser.add_argument(
        "--ignore-manifest-decoding", action="store_true", help="use defaults and flags only, not the manifest"
    )
    parser.add_argument("--system", help="a system message")
    parser.add_argument("--no-chat-template", action="store_true", help="plain text prompt, no chat template")
    kv = parser.add_mutually_exclusive_group()
    kv.add_argument("--kv-cache", dest="kv_cache", action="store_true", default=None, help="keep the KV cache")
    kv.add_argument("--no-kv-cache", dest="kv_cache", action="store_false", help="recompute every turn")


def flag_values(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, str]]:
    """Decoding values given on the command line, and the flag that gave each."""
    values: dict[str, Any] = {f: getattr(args, f) for f in FLAGS if getattr(args, f) is not None}
    names = {f: FLAGS[f][0] for f in values}
    if args.stop:
        values["stop"], names["stop"] = list(args.stop), "--stop"
    if args.json_schema and args.gbnf:
        raise ValueError("give --json-schema or --gbnf, not both")
    if args.json_schema:
        try:
            schema = json.loads(args.json_schema.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"--json-schema {args.json_schema}: {exc}") from None
        values["grammar"], names["grammar"] = {"json_schema": schema}, "--json-schema"
    elif args.gbnf:
        values["grammar"], names["grammar"] = {"gbnf": args.gbnf.read_text()}, "--gbnf"
    return values, names


def resolve(args: argparse.Namespace, manifest: Any) -> tuple[DecodingSettings, dict[str, str]]:
    flags, names = flag_values(args)
    layers: list[tuple[str, dict[str, Any] | None]] = []
    if manifest is not None and not args.ignore_manifest_decoding:
        given = manifest.decoding.model_dump(exclude_unset=True)
        layers.append(("manifest", {k: getattr(manifest.decoding, k) for k in given}))
    layers += [(names[k], {k: v}) for k, v in flags.items()]
    settings, sources = resolve_decoding(*layers)
    if args.no_grammar and settings.grammar is not None:
        settings, sources["grammar"] = settings.model_copy(update={"grammar": None}), "--no-grammar"
    return settings, sources


def open_model(args: argparse.Namespace, err: TextIO) -> tuple[Any, Any, Any, list[str]]:
    """``(peft model, tokenizer, manifest or None, runtime lines)``."""
    if args.expert is not None:
        import warnings

        from peftkit.experts.load import load_expert

        with warnings.catch_warnings():  # a kernel fallback is printed below, as one of the start-up lines
            warnings.simplefilter("ignore", UserWarning)
            expert = load_expert(args.expert)
        hints = expert.manifest.runtime
        persist = hints.requires_kv_cache_persistence if args.kv_cache is None else args.kv_cache
        lines = [
            f"expert={expert.manifest.name} {expert.manifest.version} ({', '.join(expert.model.active_adapters)})",
            f"attention_kernel={expert.attention_kernel} "
            f"({'manifest' if hints.attention_kernel else 'default'}{', fallback' if expert.notes else ''})",
            f"kv_cache_persistence={persist} ({'manifest' if args.kv_cache is None else 'flag'})",
            *[f"warning: {n}" for n in expert.notes],
        ]
        args.kv_cache = persist
        return expert.model, expert.tokenizer, expert.manifest, lines
    from peftkit.models.loading import DEFAULT_MODEL, load_base

    model, tokenizer = load_base(args.model or DEFAULT_MODEL)
    wrapped = _bare(model)
    args.kv_cache = bool(args.kv_cache)
    return wrapped, tokenizer, None, [f"model={args.model or DEFAULT_MODEL} (no expert)"]


def _bare(model: Any) -> Any:
    """A PeftModel without adapters around ``model`` (decoding needs its input preparation)."""
    from peftkit.models.peft_model import PeftModel

    return PeftModel(model, None)


def run_generate(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    from peftkit.session import ChatTemplate, DecodingSession

    out, err = out or sys.stdout, err or sys.stderr
    model, tokenizer, manifest, lines = open_model(args, err)
    settings, sources = resolve(args, manifest)
    for line in [*lines, *settings.describe(sources)]:
        print(line, file=err)
    session = DecodingSession(model, tokenizer, settings, persist_cache=False)
    template = ChatTemplate(tokenizer, args.system, use_template=not args.no_chat_template)
    prompt = args.prompt if args.prompt != "-" else sys.stdin.read()
    for piece in session.stream(template.prompt_ids(prompt)):
        out.write(piece)
        out.flush()
    out.write("\n")
    print(f"[{len(session.reply_ids)} tokens, stopped: {session.stop_reason}]", file=err)
    return 0


def run_chat(
    args: argparse.Namespace, stdin: TextIO | None = None, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    from peftkit.session import ChatTemplate, DecodingSession

    stdin, out, err = stdin or sys.stdin, out or sys.stdout, err or sys.stderr
    model, tokenizer, manifest, lines = open_model(args, err)
    settings, sources = resolve(args, manifest)
    for line in [*lines, *settings.describe(sources)]:
        print(line, file=err)
    interactive = stdin.isatty()
    if interactive:
        print("Type a message; /reset starts over, /exit or Ctrl-D quits.", file=err)
    session = DecodingSession(model, tokenizer, settings, persist_cache=bool(args.kv_cache))
    template = ChatTemplate(tokenizer, args.system, use_template=not args.no_chat_template)
    while True:
        if interactive:  # the prompt goes to stderr: stdout carries only replies, in a terminal or a pipe
            err.write("> ")
            err.flush()
        line = stdin.readline()
        if not line:
            break
        text = line.rstrip("\n")
        if not text.strip():
            continue
        if text.strip() == "/exit":
            break
        if text.strip() == "/reset":
            session.reset()
            template = ChatTemplate(tokenizer, args.system, use_template=not args.no_chat_template)
            continue
        ids = template.user_turn(text, session.history[-1] if session.history else None)
        for piece in session.stream(ids):
            out.write(piece)
            out.flush()
        out.write("\n")
        out.flush()
        print(f"[{len(session.reply_ids)} tokens, computed {session.computed_tokens[-1]} positions, "
              f"stopped: {session.stop_reason}]", file=err)  # fmt: skip
    return 0
