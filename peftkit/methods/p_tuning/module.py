"""P-tuning: a prompt encoder produces the virtual token embeddings.

    embedding (n, D) ──► MLP, or bi-LSTM + MLP ──► prompt (n, D) ──► prepended like prompt tuning

PEFT saves only the encoder's output (``prompt_embeddings``), so a PEFT checkpoint cannot resume
training. peftkit writes that output too (so PEFT can load the file) and also the encoder weights
under ``peftkit_encoder.*``, from which training resumes exactly. A file without encoder weights
loads as a fixed prompt, trained directly if training continues.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn

from peftkit.methods.base import expect_tensor
from peftkit.methods.p_tuning.config import PromptEncoderConfig, PromptEncoderReparameterizationType
from peftkit.methods.soft_prompt import ENCODER_PREFIX, EmbeddingSoftPrompt


class PromptEncoder(EmbeddingSoftPrompt):
    """The p-tuning adapter (PEFT's ``PromptEncoder`` module names)."""

    def __init__(self, config: PromptEncoderConfig) -> None:
        super().__init__()
        if config.token_dim is None:
            raise ValueError("token_dim is not set; build the adapter with PromptEncoder.create(model, config)")
        self.config = config
        dim, hidden = config.token_dim, config.encoder_hidden_size or config.token_dim
        self.embedding = nn.Embedding(config.num_virtual_tokens, dim)
        self.lstm_head: nn.LSTM | None = None
        self.mlp_head: nn.Sequential | None
        if config.encoder_reparameterization_type == PromptEncoderReparameterizationType.LSTM:
            self.lstm_head = nn.LSTM(
                input_size=dim,
                hidden_size=hidden,
                num_layers=config.encoder_num_layers,
                dropout=config.encoder_dropout,
                bidirectional=True,
                batch_first=True,
            )
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, dim))
        else:
            self.mlp_head = nn.Sequential(
                nn.Linear(dim, hidden),
                nn.ReLU(),
                nn.Linear(hidden, hidden),
                nn.ReLU(),
                nn.Linear(hidden, dim),
            )

    @classmethod
    def create(
        cls, base_model: nn.Module, config: PromptEncoderConfig, adapter_name: str = "default", **context: Any
    ) -> PromptEncoder:
        config = config.resolved_for(base_model.config)
        return cls(config).to(base_model.get_input_embeddings().weight.device)

    @property
    def has_encoder(self) -> bool:
        return self.mlp_head is not None

    def prompt(self) -> Tensor:
        embeds = self.embedding.weight
        if self.mlp_head is None:  # loaded from encoder outputs only
            return embeds
        if self.lstm_head is not None:
            embeds = self.lstm_head(embeds.unsqueeze(0))[0].squeeze(0)
        return self.mlp_head(embeds)

    def adapter_state_dict(self) -> dict[str, Tensor]:
        state = {"prompt_embeddings": self.prompt().detach()}
        if self.has_encoder:
            state.update({ENCODER_PREFIX + k: v.detach() for k, v in self.state_dict().items()})
        return state

    def load_adapter_state_dict(self, state_dict: dict[str, Tensor], *, trainable: bool) -> None:
        c = self.config
        output = expect_tensor(state_dict, "prompt_embeddings", (c.num_virtual_tokens, c.token_dim))
        encoder = {k.removeprefix(ENCODER_PREFIX): v for k, v in state_dict.items() if k.startswith(ENCODER_PREFIX)}
        if encoder:
            self.load_state_dict(encoder, strict=True)
            return
        if trainable:
            warnings.warn(
                "p-tuning adapter saved without its encoder weights (PEFT saves only the encoder output): "
                "further training updates the saved prompt directly",
                UserWarning,
                stacklevel=3,
            )
        self.lstm_head = None
        self.mlp_head = None
        with torch.no_grad():
            self.embedding.weight.copy_(output)
