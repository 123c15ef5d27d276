"""Prompt tuning: a learned ``(n_virtual, D)`` embedding table prepended to every input.

    input ids ──embed──► [t0 t1 ... tL]
    prompt    ─────────► [v0 ... vn]  ──concat──► [v0 ... vn t0 ... tL] ──► frozen model

Only ``embedding.weight`` trains. Saved as PEFT's ``prompt_embeddings`` ``(n_virtual, token_dim)``.

A bank (``expert_ids`` in the config) holds ``N`` prompts in the same parameter,
``(N * n_virtual, token_dim)``, viewed as ``table`` ``(N, n_virtual, token_dim)``; each row of a
batch gathers its own prompt (:class:`~peftkit.methods.soft_prompt.PromptBank`). Saved as
``prompt_embeddings`` ``(N, n_virtual, token_dim)``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from peftkit.methods.base import seeded_generator
from peftkit.methods.prompt_tuning.config import PromptTuningConfig, PromptTuningInit
from peftkit.methods.soft_prompt import EmbeddingSoftPrompt, PromptBank


class PromptTuning(PromptBank, EmbeddingSoftPrompt):
    """The prompt-tuning adapter. ``embedding.weight`` is ``(num_experts * num_virtual_tokens, token_dim)``."""

    def __init__(self, config: PromptTuningConfig) -> None:
        super().__init__()
        if config.token_dim is None:
            raise ValueError("token_dim is not set; build the adapter with PromptTuning.create(model, config)")
        self.config = config
        self._setup_bank(config.token_dim)

    @classmethod
    def create(
        cls, base_model: nn.Module, config: PromptTuningConfig, adapter_name: str = "default", **context: Any
    ) -> PromptTuning:
        """Build the adapter for ``base_model`` and initialise it as the config says."""
        config = config.resolved_for(base_model.config)
        adapter = cls(config)
        word_embeddings = base_model.get_input_embeddings()
        tokenizer = context.get("tokenizer")
        shared: list[Tensor] = []

        def new_rows(count: int) -> Tensor:
            # A text or seeded init gives every expert the start it would get as a single adapter
            # (so an expert trained in a bank starts where it would start alone).
            if config.prompt_tuning_init == PromptTuningInit.TEXT or config.init_seed is not None:
                if not shared:
                    shared.append(initial_prompts(config, word_embeddings, tokenizer)[0])
                return shared[0].expand(count, -1, -1)
            return initial_prompts(config, word_embeddings, tokenizer, count)

        adapter._new_rows = new_rows
        if not config.inference_mode and context.get("initialize", True):
            with torch.no_grad():
                adapter.table.copy_(new_rows(adapter.num_experts))
        return adapter.to(word_embeddings.weight.device)

    def prompt(self) -> Tensor:
        if self.num_experts != 1:
            raise ValueError(f"this adapter is a bank of {self.num_experts} prompts: use table[e] or rows")
        return self.embedding.weight

    def row_prompts(self, rows: Tensor) -> Tensor:
        return self.gather_rows(rows)

    def adapter_state_dict(self) -> dict[str, Tensor]:
        return self.bank_state_dict()

    def load_adapter_state_dict(self, state_dict: dict[str, Tensor], *, trainable: bool) -> None:
        self.load_bank_state_dict(state_dict)


def initial_prompt(config: PromptTuningConfig, word_embeddings: nn.Module, tokenizer: Any = None) -> Tensor:
    """``(n_virtual, token_dim)`` starting embeddings for the configured init."""
    return initial_prompts(config, word_embeddings, tokenizer)[0]


def initial_prompts(
    config: PromptTuningConfig, word_embeddings: nn.Module, tokenizer: Any = None, count: int = 1
) -> Tensor:
    """``(count, n_virtual, token_dim)`` starting embeddings for the configured init, drawn together."""
    n = config.num_virtual_tokens
    device = word_embeddings.weight.device
    generator = seeded_generator(config.init_seed, device)
    vocab = word_embeddings.weight.shape[0]
    with torch.no_grad():
        if config.prompt_tuning_init == PromptTuningInit.TEXT:
            ids = text_init_ids(config, tokenizer)
            return word_embeddings(torch.tensor(ids, device=device)).float().expand(count, -1, -1)
        if config.prompt_tuning_init == PromptTuningInit.SAMPLE_VOCAB:
            ids = torch.randint(0, vocab, (count, n), generator=generator, device=device)
            return word_embeddings(ids).float()
        # RANDOM: match the scale of real token embeddings (as the model sees them, e.g. Gemma's
        # scaled embeddings), dimension by dimension, instead of N(0, 1).
        sample = torch.randperm(vocab, generator=generator, device=device)[:8192]
        reference = word_embeddings(sample).float()
        mean, std = reference.mean(0), reference.std(0)
        noise = torch.randn(count, n, reference.shape[1], generator=generator, device=device)
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
