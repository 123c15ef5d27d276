"""Ask a vLLM server for a completion through one exported peftkit expert (written by
``peftkit export --format vllm``; it sits beside ``index.json``).

Start the server with the command in ``index.json`` (``vllm_serve``), e.g.::

    vllm serve BASE_MODEL_FOLDER --enable-prompt-embeds --enable-lora --lora-modules NAME=DIR/lora/NAME

then::

    python client_example.py --expert NAME --prompt "Some text" [--chat] [--base BASE_MODEL_FOLDER]

A soft-prompt expert's request is ``prompt_embeds``: its virtual tokens ``(n, D)`` followed by the
prompt's tokens embedded with the base model's input embedding table, as one ``(n + L, D)`` tensor
sent as base64 of ``torch.save(tensor)`` (vLLM's wire format), with the expert's ``cache_salt`` so
vLLM's prefix cache never shares blocks between experts. An expert with a LoRA names it in ``model``.

Needs ``torch``, ``safetensors``, ``transformers`` and ``openai``; not peftkit.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent


def build_prompt_embeds(soft_prompt: torch.Tensor, token_ids: Sequence[int], input_embeddings: torch.nn.Module):
    """``(n + L, D)``: the soft prompt, then the tokens through the base model's input embeddings."""
    weight = next(input_embeddings.parameters())
    ids = torch.as_tensor(list(token_ids), dtype=torch.long, device=weight.device)
    with torch.no_grad():
        tokens = input_embeddings(ids)  # (L, D)
    return torch.cat([soft_prompt.to(device=tokens.device, dtype=tokens.dtype), tokens], dim=0)


def encode(embeds: torch.Tensor) -> str:
    """vLLM's ``prompt_embeds`` wire format: base64 of ``torch.save(tensor)``."""
    buffer = io.BytesIO()
    torch.save(embeds.detach().cpu().contiguous(), buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def load_input_embeddings(base: str) -> torch.nn.Module:
    """The base model's input embedding module (the rest of the model is dropped)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return model.get_input_embeddings().eval()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--expert", required=True, help="an expert name from index.json")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    parser.add_argument("--base", help="the base model folder or id vLLM serves (default: index.json's)")
    parser.add_argument("--url", default="http://localhost:8000/v1")
    parser.add_argument("--api-key", default="EMPTY")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args(argv)

    from openai import OpenAI
    from transformers import AutoTokenizer

    index = json.loads((HERE / "index.json").read_text())
    if args.expert not in index["experts"]:
        raise SystemExit(f"unknown expert {args.expert!r}; known: {', '.join(index['experts'])}")
    entry = index["experts"][args.expert]
    base = args.base or entry["base_model"]
    if not base:
        raise SystemExit(f"{args.expert}: index.json does not name its base model; pass --base")
    client = OpenAI(base_url=args.url, api_key=args.api_key)
    model = entry.get("model") or client.models.list().data[0].id  # the LoRA's name, else the base
    request: dict = {"model": model, "max_tokens": args.max_tokens, "temperature": 0.0}
    extra = {"cache_salt": entry["cache_salt"]}
    tokenizer = AutoTokenizer.from_pretrained(base)
    if args.chat:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": args.prompt}], add_generation_prompt=True, tokenize=False
        )
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(args.prompt)["input_ids"]
    if "prompt_embeds" in entry:
        soft_prompt = load_file(str(HERE / entry["prompt_embeds"]))["prompt_embeds"]
        embeds = build_prompt_embeds(soft_prompt, ids, load_input_embeddings(base))
        extra["prompt_embeds"] = encode(embeds)
        request["prompt"] = ""  # the OpenAI client needs a prompt; vLLM reads prompt_embeds
    else:
        request["prompt"] = ids
    completion = client.completions.create(**request, extra_body=extra)
    print(completion.choices[0].text)


if __name__ == "__main__":
    main()
