"""Prompt tuning: a learned ``(n_virtual, D)`` embedding table prepended to every input.

    input ids ──embed──► [t0 t1 ... tL]
    prompt    ─────────► [v0 ... vn]  ──concat──► [v0 ... vn t0 ... tL] ──► frozen model

Only ``embedding.weight`` trains. Saved as PEFT's ``prompt_embeddings`` ``(n_virtual, token_dim)``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from peftkit.methods.base import expect_tensor, seeded_generator
from peftkit.methods.prompt_tuning.config import PromptTuningConfig, PromptTuningInit
from peftkit.methods.soft_prompt import EmbeddingSoftPrompt


class PromptTuning(EmbeddingSoftPrompt):
    """The prompt-tuning adapter. ``embedding.weight`` is ``(num_virtual_tokens, token_dim)``."""

    def __init__(self, config: PromptTuningConfig) -> None:
        super().__init__()
        if config.token_dim is None:
            raise ValueError("token_dim is not set; build the adapter with PromptTuning.create(model, config)")
        self.config = config
        self.embedding = nn.Embedding(config.num_virtual_tokens, config.token_dim)

    @classmethod
    def create(
        cls, base_model: nn.Module, config: PromptTuningConfig, adapter_name: str = "default", **context: Any
    ) -> PromptTuning:
        """Build the adapter for ``base_model`` and initialise it as the config says."""
        config = config.resolved_for(base_model.config)
        adapter = cls(config)
        word_embeddings = base_model.get_input_embeddings()
        if not config.inference_mode and context.get("initialize", True):
            with torch.no_grad():
                adapter.embedding.weight.copy_(initial_prompt(config, word_embeddings, context.get("tokenizer")))
        return adapter.to(word_embeddings.weight.device)

    def prompt(self) -> Tensor:
        return self.embedding.weight

    def adapter_state_dict(self) -> dict[str, Tensor]:
        return {"prompt_embeddings": self.embedding.weight.detach()}

    def load_adapter_state_dict(self, state_dict: dict[str, Tensor], *, trainable: bool) -> None:
        tensor = expect_tensor(state_dict, "prompt_embeddings", tuple(self.embedding.weight.shape))
        with torch.no_grad():
            self.embedding.weight.copy_(tensor)


def initial_prompt(config: PromptTuningConfig, word_embeddings: nn.Module, tokenizer: Any = None) -> Tensor:
    """``(n_virtual, token_dim)`` starting embeddings for the configured init."""
    n = config.num_virtual_tokens
    device = word_embeddings.weight.device
    generator = seeded_generator(config.init_seed, device)
    vocab = word_embeddings.weight.shape[0]
    with torch.no_grad():
        if config.prompt_tuning_init == PromptTuningInit.TEXT:
            ids = text_init_ids(config, tokenizer)
            return word_embeddings(torch.tensor(ids, device=device)).float()
        if config.prompt_tuning_init == PromptTuningInit.SAMPLE_VOCAB:
            ids = torch.randint(0, vocab, (n,), generator=generator, device=device)
            return word_embeddings(ids).float()
        # RANDOM: match the scale of real token embeddings (as the model sees them, e.g. Gemma's
        # scaled embeddings), dimension by dimension, instead of N(0, 1).
        sample = torch.randperm(vocab, generator=generator, device=device)[:8192]
        reference = word_embeddings(sample).float()
        mean, std = reference.mean(0), reference.std(0)
        noise = torch.randn(n, reference.shape[1], generator=generator, device=device)
        return mean + std * noise


def text_init_ids(config: PromptTuningConfig, tokenizer: Any = None) -> list[int]:
    """Token ids of the init text, tiled or truncated to ``num_virtual_tokens`` (as PEFT does)."""
    if tokenizer is None:
        from peftkit.models.loading import load_tokenizer

        tokenizer = load_tokenizer(config.tokenizer_name_or_path, **(config.tokenizer_kwargs or {}))
    ids = list(tokenizer(config.prompt_tuning_init_text)["input_ids"])
    if not ids:
        raise ValueError("prompt_tuning_init_text tokenises to no tokens")
    n = config.num_virtual_tokens
    return (ids * (n // len(ids) + 1))[:n]
