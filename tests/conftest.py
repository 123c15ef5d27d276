"""Shared fixtures: tiny random models of four architectures, built from config classes (no download)."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

ARCHS = ["llama", "qwen2", "gemma3", "gpt2"]
VOCAB = 128

# Under pytest-xdist each worker gets one core's worth of threads.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


def tiny_model(arch: str, seed: int = 0) -> torch.nn.Module:
    """A 2-layer random causal LM of the given architecture, in eval mode."""
    torch.manual_seed(seed)
    common = {"vocab_size": VOCAB, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    if arch == "llama":  # grouped-query attention: 4 query heads, 2 key/value heads
        model = LlamaForCausalLM(
            LlamaConfig(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=256,
                **common,
            )
        )
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(
            Qwen2Config(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=1,
                max_position_embeddings=256,
                **common,
            )
        )
    elif arch == "gemma3":  # head_dim (16) is not hidden/heads (8); embeddings are scaled by sqrt(hidden)
        model = Gemma3ForCausalLM(
            Gemma3TextConfig(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=1,
                head_dim=16,
                max_position_embeddings=256,
                sliding_window=512,
                **common,
            )
        )
    elif arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=256, **common))
    else:
        raise ValueError(arch)
    return model.eval()


@pytest.fixture(params=ARCHS)
def arch(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def model(arch: str) -> torch.nn.Module:
    return tiny_model(arch)


@pytest.fixture
def llama() -> torch.nn.Module:
    return tiny_model("llama")


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    """Two rows; the second is left-padded by two positions."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, VOCAB, (2, 7), generator=generator)
    mask = torch.ones_like(input_ids)
    mask[1, :2] = 0
    input_ids[1, :2] = 0
    return {"input_ids": input_ids, "attention_mask": mask}


@pytest.fixture(autouse=True)
def _quiet_known_warnings():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*generation flags.*")
        yield


class CharTokenizer:
    """A tiny deterministic tokenizer (one id per character) for tests that need text."""

    pad_token_id = 0
    eos_token_id = 2

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [3 + (ord(c) % (VOCAB - 3)) for c in text]}


@pytest.fixture
def char_tokenizer() -> CharTokenizer:
    return CharTokenizer()
