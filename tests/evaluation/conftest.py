"""Helpers for evaluation tests: a tiny Llama + word tokenizer on disk, and adapters saved from it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from peftkit import PromptTuningConfig, get_peft_model, load_base
from tests.training.conftest import write_tiny_folder

CHOICES = [" w100", " w101", " w102", " w103", " w104"]
"""The tiny folder's completions (one word-level token each)."""


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    return write_tiny_folder(tmp_path_factory.mktemp("tiny-llama"))


def save_adapter(folder: Path, target: Path, seed: int = 0, tokens: int = 4) -> Path:
    """A randomly initialised prompt-tuning adapter for the tiny model, in PEFT format."""
    model, _ = load_base(folder)
    torch.manual_seed(seed)
    get_peft_model(model, PromptTuningConfig(num_virtual_tokens=tokens)).save_pretrained(target)
    return target


def records(folder: Path, n: int = 12) -> list[dict]:
    lines = (folder / "train.jsonl").read_text().splitlines()[:n]
    return [json.loads(line) for line in lines]


def write_char_folder(folder: Path) -> Path:
    """A tiny Llama with a character-level tokenizer that can spell JSON (for grammar tests)."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    from tests.conftest import tiny_model

    chars = list('{}[]":,.-0123456789abcdefghijklmnopqrstuvwxyz ')
    # byte-level spelling (a space is "Ġ"), so grammar engines (llguidance) can read the vocabulary
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c.replace(" ", "Ġ"): 3 + i for i, c in enumerate(chars)}}
    core = Tokenizer(BPE(vocab, [], unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>", bos_token="<s>")
    folder.mkdir(parents=True, exist_ok=True)
    tiny_model("llama").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
