"""Prefix tuning: learned key/value states that every layer attends to before the sequence.

    embedding (n, 2·L·td) ──[optional: Linear→tanh→Linear]──► view (n, 2L, H_kv, d)
        layer l: keys = slot 2l, values = slot 2l+1   (PEFT's layout)
        ──► attention cache, positions 0..n-1; the user's tokens start at position n

The prefix enters through the attention cache, so it works with gradient checkpointing (the
cache layer never mutates during training; PEFT refuses this combination). Saved as PEFT's
``prompt_embeddings`` ``(n, num_layers*2*token_dim)``; with projection the MLP weights are saved
too (``peftkit_encoder.*``) so training can resume, which PEFT cannot do.

A bank (``expert_ids`` in the config, no projection) holds ``N`` prefixes in one parameter,
``(N * n, num_layers*2*token_dim)``, viewed as ``table`` ``(N, n, num_layers*2*token_dim)``; each row
of a batch gathers its own prefix keys/values. Saved as ``prompt_embeddings`` ``(N, n, 2·L·td)``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from peftkit.experts.bank import SINGLE_EXPERT_ID, ExpertIndex, expert_row
from peftkit.methods.base import ModelInputs, expect_tensor
from peftkit.methods.prefix_tuning.config import PrefixTuningConfig
from peftkit.methods.soft_prompt import ENCODER_PREFIX, PromptBank, SoftPrompt


class PrefixTuning(PromptBank, SoftPrompt):
    """The prefix-tuning adapter."""

    def __init__(self, config: PrefixTuningConfig) -> None:
        super().__init__()
        if config.token_dim is None or config.num_layers is None or config.num_attention_heads is None:
            raise ValueError("geometry is not set; build the adapter with PrefixTuning.create(model, config)")
        self.config = config
        n, width = config.num_virtual_tokens, config.num_layers * 2 * config.token_dim
        self.transform: nn.Sequential | None = None
        if config.prefix_projection and config.expert_ids is not None:
            raise ValueError(
                "expert_ids (a bank) cannot be combined with prefix_projection: the projection MLP would be "
                "shared by every expert; use prefix_projection=False"
            )
        if config.prefix_projection:
            self.experts = ExpertIndex([SINGLE_EXPERT_ID])
            self._new_rows = None
            hidden = config.encoder_hidden_size or config.token_dim
            self.embedding = nn.Embedding(n, config.token_dim)
            self.transform = nn.Sequential(nn.Linear(config.token_dim, hidden), nn.Tanh(), nn.Linear(hidden, width))
            if config.init_weights == "zero":
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self._setup_bank(width, self._initial_rows)
            if config.init_weights == "zero":
                nn.init.zeros_(self.embedding.weight)

    def _initial_rows(self, count: int) -> Tensor:
        """``(count, n, width)`` new prefixes: N(0, 1) as ``nn.Embedding`` starts, or zeros."""
        shape = (count, self.config.num_virtual_tokens, self.embedding.weight.shape[1])
        if self.config.init_weights == "zero":
            return torch.zeros(shape)
        return torch.randn(shape)

    @classmethod
    def create(
        cls, base_model: nn.Module, config: PrefixTuningConfig, adapter_name: str = "default", **context: Any
    ) -> PrefixTuning:
        config = config.resolved_for(base_model.config)
        return cls(config).to(base_model.get_input_embeddings().weight.device)

    def flat_prefix(self) -> Tensor:
        """``(n, num_layers * 2 * token_dim)`` the prefix in PEFT's saved layout (a single prefix)."""
        if self.transform is not None:
            return self.transform(self.embedding.weight)
        if self.num_experts != 1:
            raise ValueError(f"this adapter is a bank of {self.num_experts} prefixes: use table[e] or rows")
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

    def row_key_values(self, rows: Tensor) -> Tensor:
        """``(2 * num_layers, B or 1, H_kv, n, d_head)``: each row's own prefix (one gather for a bank)."""
        if self.transform is not None or self.num_experts == 1:
            return self.key_values().unsqueeze(1)
        c = self.config
        heads = c.num_attention_heads
        flat = self.gather_rows(rows)  # (B, n, 2L*td)
        batch = flat.shape[0]
        return flat.view(batch, c.num_virtual_tokens, 2 * c.num_layers, heads, -1).permute(2, 0, 3, 1, 4)

    @torch.no_grad()
    def served_prompt(self, row: int = 0) -> Any:
        """``SoftPrompt("prefix", n, key_values)``: per layer ``(keys, values)``, each ``(H_kv, n, d_head)``
        (its parameters in the attention's layout; the projection run once when there is one)."""
        from peftkit.serving.types import SoftPrompt as ServedPrompt

        self.check_rows(self._row_index(row))
        kv = self.row_key_values(self._row_index(row))[:, 0].detach().clone()  # (2L, H_kv, n, d)
        layers = tuple((kv[2 * i], kv[2 * i + 1]) for i in range(self.config.num_layers))
        return ServedPrompt("prefix", self.config.num_virtual_tokens, key_values=layers)

    def prepare_inputs(self, inputs: ModelInputs, rows: Tensor) -> ModelInputs:
        selected = self.check_rows(rows)
        batch = inputs.batch_size
        kv = self.row_key_values(rows).to(inputs.inputs_embeds.dtype)
        kv = torch.where(selected[None, :, None, None, None], kv, 0.0)  # (2L, B, H, n, d)
        layers = [(kv[2 * i], kv[2 * i + 1]) for i in range(self.config.num_layers)]
        mask = selected.long().unsqueeze(1).expand(batch, self.config.num_virtual_tokens)
        if inputs.prefix is not None:
            layers = [
                (torch.cat([k0, k], dim=2), torch.cat([v0, v], dim=2))
                for (k0, v0), (k, v) in zip(inputs.prefix, layers, strict=True)
            ]
            mask = torch.cat([inputs.prefix_mask, mask], dim=1)
        return inputs.with_(prefix=layers, prefix_mask=mask)

    def add_experts(self, ids: Sequence[str], values: Tensor | None = None) -> range:
        if self.transform is not None:
            raise ValueError("a prefix_projection adapter cannot hold a bank (its MLP would be shared by every expert)")
        return super().add_experts(ids, values)

    def expert_state_dict(self, expert: str | int) -> dict[str, Tensor]:
        if self.transform is not None:
            expert_row(self, expert)
            return {"prompt_embeddings": self.flat_prefix().detach().clone()}
        return super().expert_state_dict(expert)

    def adapter_state_dict(self) -> dict[str, Tensor]:
        if self.transform is None:
            return self.bank_state_dict()
        state = {"prompt_embeddings": self.flat_prefix().detach()}
        state.update({ENCODER_PREFIX + k: v.detach() for k, v in self.state_dict().items()})
        return state

    def load_adapter_state_dict(self, state_dict: dict[str, Tensor], *, trainable: bool) -> None:
        c = self.config
        if not c.prefix_projection:
            self.load_bank_state_dict(state_dict)
            return
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
