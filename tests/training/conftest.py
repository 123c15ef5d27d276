"""Helpers for training tests: tiny prompt-tuned models, small data, and a tiny model on disk."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from peftkit import PromptTuningConfig, get_peft_model
from peftkit.data.formatters import get_formatter
from peftkit.data.pipeline import TokenizedData
from peftkit.data.sources import MemorySource
from tests.conftest import CharTokenizer, tiny_model


def records(n: int = 32, seed: int = 0) -> list[dict[str, str]]:
    """Prompts of varying length; completions of 1-3 characters (so label counts differ per row)."""
    rng = random.Random(seed)
    return [
        {"prompt": "".join(rng.choice("abcdefgh") for _ in range(rng.randint(2, 9))), "completion": "xyz"[: 1 + i % 3]}
        for i in range(n)
    ]


def prompt_model(seed: int = 0, tokens: int = 4, arch: str = "llama"):
    torch.manual_seed(seed)
    return get_peft_model(tiny_model(arch), PromptTuningConfig(num_virtual_tokens=tokens))


def data(n: int = 32, batch_size: int = 4, **kwargs) -> TokenizedData:
    return TokenizedData(
        MemorySource(records(n)), get_formatter("prompt_completion"), CharTokenizer(), batch_size=batch_size, **kwargs
    )


def write_tiny_folder(folder: Path, n_records: int = 48) -> Path:
    """A tiny Llama + word-level tokenizer saved as a local Hugging Face folder, and train.jsonl."""
    from tests.models.test_loading import write_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    tiny_model("llama").save_pretrained(folder)
    write_tokenizer(folder)
    rng = random.Random(0)
    with open(folder / "train.jsonl", "w") as handle:
        for _ in range(n_records):
            words = [f"w{rng.randint(3, 60)}" for _ in range(rng.randint(2, 10))]
            handle.write(json.dumps({"prompt": " ".join(words), "completion": f" w{100 + len(words) % 5}"}) + "\n")
    return folder


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    return write_tiny_folder(tmp_path_factory.mktemp("tiny-llama"))


def run_yaml(tiny: Path, output: Path, **training) -> str:
    """A run config on the tiny folder (as YAML text)."""
    settings = {"lr": 0.05, "max_steps": 12, "batch_size": 8, "warmup_steps": 2, "checkpoint_every": 4, **training}
    lines = "\n".join(f"  {k}: {json.dumps(v)}" for k, v in settings.items())
    return (
        f"model: {{name: {tiny}}}\n"
        "adapters:\n  default: {peft_type: PROMPT_TUNING, num_virtual_tokens: 4}\n"
        f"data:\n  train: {tiny / 'train.jsonl'}\n"
        f"training:\n{lines}\n"
        f"output_dir: {output}\n"
    )
