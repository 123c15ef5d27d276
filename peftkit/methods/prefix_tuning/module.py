"""Prefix tuning: learned key/value states that every layer attends to before the sequence.

    embedding (n, 2·L·td) ──[optional: Linear→tanh→Linear]──► view (n, 2L, H_kv, d)
        layer l: keys = slot 2l, values = slot 2l+1   (PEFT's layout)
        ──► attention cache, positions 0..n-1; the user's tokens start at position n

The prefix enters through the attention cache, so it works with gradient checkpointing (the
cache layer never mutates during training; PEFT refuses this combination). Saved as PEFT's
``prompt_embeddings`` ``(n, num_layers*2*token_dim)``; with projection the MLP weights are saved
too (``peftkit_encoder.*``) so training can resume, which PEFT cannot do.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn

from peftkit.methods.base import ModelInputs, expect_tensor
from peftkit.methods.prefix_tuning.config import PrefixTuningConfig
from peftkit.methods.soft_prompt import ENCODER_PREFIX, SoftPrompt


class PrefixTuning(SoftPrompt):
    """The prefix-tuning adapter."""

    def __init__(self, config: PrefixTuningConfig) -> None:
        super().__init__()
        if config.token_dim is None or config.num_layers is None or config.num_attention_heads is None:
            raise ValueError("geometry is not set; build the adapter with PrefixTuning.create(model, config)")
        self.config = config
        n, width = config.num_virtual_tokens, config.num_layers * 2 * config.token_dim
        self.transform: nn.Sequential | None = None
        if config.prefix_projection:
            hidden = config.encoder_hidden_size or config.token_dim
            self.embedding = nn.Embedding(n, config.token_dim)
            self.transform = nn.Sequential(nn.Linear(config.token_dim, hidden), nn.Tanh(), nn.Linear(hidden, width))
            if config.init_weights == "zero":
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(n, width)
            if config.init_weights == "zero":
                nn.init.zeros_(self.embedding.weight)

    @classmethod
    def create(
        cls, base_model: nn.Module, config: PrefixTuningConfig, adapter_name: str = "default", **context: Any
    ) -> PrefixTuning:
        config = config.resolved_for(base_model.config)
        return cls(config).to(base_model.get_input_embeddings().weight.device)

    def flat_prefix(self) -> Tensor:
        """``(n, num_layers * 2 * token_dim)`` the prefix in PEFT's saved layout."""
        if self.transform is not None:
            return self.transform(self.embedding.weight)
        return self.embedding.weight

    def key_values(self) -> Tensor:
        """``(2 * num_layers, H_kv, n, d_head)``: keys of layer l at ``2l``, values at ``2l + 1``."""
        c = self.config
        heads = c.num_attention_heads
        flat = self.flat_prefix()
        return flat.view(c.num_virtual_tokens, 2 * c.num_layers, heads, c.token_dim // heads).permute(1, 2, 0, 3)

    def forward(self, batch_size: int) -> list[tuple[Tensor, Tensor]]:
        """Per layer ``(keys, values)``, each ``(batch_size, H_kv, n, d_head)``."""
        kv = self.key_values().unsqueeze(1).expand(-1, batch_size, -1, -1, -1)
        return [(kv[2 * i], kv[2 * i + 1]) for i in range(self.config.num_layers)]

    def prepare_inputs(self, inputs: ModelInputs, rows: Tensor) -> ModelInputs:
        selected = self.check_rows(rows)
        batch = inputs.batch_size
        kv = self.key_values().to(inputs.inputs_embeds.dtype)
        kv = torch.where(selected[None, :, None, None, None], kv.unsqueeze(1), 0.0)  # (2L, B, H, n, d)
        layers = [(kv[2 * i], kv[2 * i + 1]) for i in range(self.config.num_layers)]
        mask = selected.long().unsqueeze(1).expand(batch, self.config.num_virtual_tokens)
        if inputs.prefix is not None:
            layers = [
                (torch.cat([k0, k], dim=2), torch.cat([v0, v], dim=2))
                for (k0, v0), (k, v) in zip(inputs.prefix, layers, strict=True)
            ]
            mask = torch.cat([inputs.prefix_mask, mask], dim=1)
        return inputs.with_(prefix=layers, prefix_mask=mask)

    def adapter_state_dict(self) -> dict[str, Tensor]:
        state = {"prompt_embeddings": self.flat_prefix().detach()}
        if self.transform is not None:
            state.update({ENCODER_PREFIX + k: v.detach() for k, v in self.state_dict().items()})
        return state

    def load_adapter_state_dict(self, state_dict: dict[str, Tensor], *, trainable: bool) -> None:
        c = self.config
        flat = expect_tensor(state_dict, "prompt_embeddings", (c.num_virtual_tokens, c.num_layers * 2 * c.token_dim))
        encoder = {k.removeprefix(ENCODER_PREFIX): v for k, v in state_dict.items() if k.startswith(ENCODER_PREFIX)}
        if self.transform is not None and encoder:
            self.load_state_dict(encoder, strict=True)
            return
        if self.transform is not None:
            # A PEFT file: only the projection's output was saved. Train that output directly.
            if trainable:
                warnings.warn(
                    "prefix_projection adapter saved without its MLP weights (PEFT saves only the output): "
                    "further training updates the saved prefix directly",
                    UserWarning,
                    stacklevel=3,
                )
            self.transform = None
            self.embedding = nn.Embedding(*flat.shape, device=flat.device)
        with torch.no_grad():
            self.embedding.weight.copy_(flat)
