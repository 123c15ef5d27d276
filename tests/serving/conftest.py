"""Serving fixtures: a tiny Llama with prompt-tuning and prefix-tuning experts, as PeftModel adapters (the
``generate`` oracle) and as the engine's ``ServedExpert``s."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from peftkit import PrefixTuningConfig, PromptTuningConfig, get_peft_model
from peftkit.serving.prefix_store import soft_prompt_of
from peftkit.serving.types import ServedExpert
from tests.conftest import VOCAB, tiny_model

# name -> (config, adapter kind); different lengths so rows of one batch have different prefixes
EXPERTS = {
    "pt4": lambda: PromptTuningConfig(num_virtual_tokens=4, init_seed=1),
    "pt7": lambda: PromptTuningConfig(num_virtual_tokens=7, init_seed=2),
    "px3": lambda: PrefixTuningConfig(num_virtual_tokens=3),
    "px5": lambda: PrefixTuningConfig(num_virtual_tokens=5),
}


class TinyTokenizer:
    """One character per id (ids below 3 are special); enough for stop strings and streaming."""

    pad_token_id = 0
    eos_token_id = 2
    bos_token_id = 1

    def decode(self, ids, skip_special_tokens: bool = False, **kwargs) -> str:
        return "".join("" if (skip_special_tokens and i < 3) else chr(0x41 + (int(i) - 3) % 58) for i in ids)

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [3 + (ord(c) - 0x41) % 58 for c in text]}


@dataclass
class Served:
    """The base model, the PeftModel holding every expert as an adapter, and the experts as served."""

    base: torch.nn.Module
    peft: object
    experts: dict[str, ServedExpert]
    tokenizer: TinyTokenizer


def build_served(seed: int = 0, arch: str = "llama") -> Served:
    base = tiny_model(arch, seed=seed)
    torch.manual_seed(seed)
    names = list(EXPERTS)
    peft = get_peft_model(base, EXPERTS[names[0]](), adapter_name=names[0])
    for name in names[1:]:
        peft.add_adapter(name, EXPERTS[name]())
    experts = {
        name: ServedExpert(name=name, version=1, soft_prompt=soft_prompt_of(peft.prompt_encoder[name]))
        for name in names
    }
    return Served(base, peft, experts, TinyTokenizer())


@pytest.fixture
def served() -> Served:
    return build_served()


def generate_alone(served: Served, expert: str | None, prompt: list[int], settings) -> list[int]:
    """The oracle: peftkit's ``PeftModel.generate`` on this one request, with its expert (or the bare model)."""
    ids = torch.tensor([prompt])
    if expert is None:
        with served.peft.disable_adapter():
            out = served.peft.generate(input_ids=ids, decoding=settings, eos_token_id=2)
    else:
        out = served.peft.generate(input_ids=ids, decoding=settings, eos_token_id=2, adapter_names=[expert])
    new = out[0, len(prompt) :].tolist()
    if 2 in new:  # generate pads a finished row with its eos: keep up to the first eos
        new = new[: new.index(2) + 1]
    return new


def random_prompt(generator: torch.Generator, length: int) -> list[int]:
    return torch.randint(3, VOCAB, (length,), generator=generator).tolist()
