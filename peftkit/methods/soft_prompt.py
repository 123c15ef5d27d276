"""What the three soft-prompt methods share: config fields, placement, and token insertion.

Virtual tokens go *right before the user's first real token*, after any left padding::

    user row (left-padded):   [pad pad  t0 t1 t2]
    PEFT puts them first:     [v0 v1 pad pad t0 t1 t2]      (positions of t* shift with padding)
    peftkit:                  [pad pad v0 v1 t0 t1 t2]      (same positions as the unpadded row)

so a padded row computes exactly what the same row computes alone. Positions count only attended
tokens (:meth:`ModelInputs.position_ids`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from pydantic import field_validator
from torch import Tensor, nn

from peftkit.config import PeftConfig
from peftkit.methods.base import IGNORE_INDEX, ModelInputs, ParameterOwner

if TYPE_CHECKING:
    from collections.abc import Iterator

    from peftkit.models.peft_model import PeftModel


#: Key prefix for prompt-encoder weights that PEFT does not save (they make training resumable).
ENCODER_PREFIX = "peftkit_encoder."


class PromptLearningConfig(PeftConfig):
    """Fields shared by soft-prompt configs (PEFT's ``PromptLearningConfig``).

    The geometry fields (``token_dim``, ``num_layers``, ``num_attention_heads``) are filled from the
    base model by :func:`~peftkit.get_peft_model` and written to ``adapter_config.json``.
    """

    num_virtual_tokens: int = 20
    """Number of virtual tokens (soft-prompt length); must be > 0."""
    token_dim: int | None = None
    """Width of one virtual token: the hidden size (prefix tuning: ``head_dim * num_kv_heads``)."""
    num_transformer_submodules: int | None = None
    """1 for decoder-only models (PEFT uses 2 for encoder-decoders)."""
    num_attention_heads: int | None = None
    """Attention heads of the base model (prefix tuning: key/value heads)."""
    num_layers: int | None = None
    """Decoder layers of the base model."""
    modules_to_save: list[str] | None = None
    """Not used by soft-prompt methods; must stay empty."""

    @property
    def is_prompt_learning(self) -> bool:
        return True

    @field_validator("num_virtual_tokens")
    @classmethod
    def _positive_tokens(cls, value: int) -> int:
        if value <= 0:
            raise ValueError(f"num_virtual_tokens must be > 0, got {value}")
        return value

    @field_validator("num_transformer_submodules")
    @classmethod
    def _decoder_only(cls, value: int | None) -> int | None:
        if value not in (None, 1):
            raise ValueError(f"num_transformer_submodules must be 1 for causal LMs, got {value}")
        return value

    @field_validator("modules_to_save")
    @classmethod
    def _no_modules_to_save(cls, value: list[str] | None) -> list[str] | None:
        if value:
            raise ValueError(f"modules_to_save is not supported for soft-prompt methods, got {value}")
        return value

    def resolved_for(self, model_config: Any) -> PromptLearningConfig:
        """A copy with the geometry fields filled from the base model's config."""
        geometry = model_geometry(model_config)
        updates: dict[str, Any] = {"num_transformer_submodules": 1}
        if self.num_layers is None:
            updates["num_layers"] = geometry.num_layers
        if self.token_dim is None:
            updates["token_dim"] = geometry.hidden_size
        if self.num_attention_heads is None:
            updates["num_attention_heads"] = geometry.num_heads
        return self.model_copy(update=updates)


class ModelGeometry:
    """Sizes of a decoder-only transformer, read from its Hugging Face config."""

    def __init__(self, model_config: Any) -> None:
        cfg = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config

        def first(*names: str) -> Any:
            for name in names:
                value = getattr(cfg, name, None)
                if value is not None:
                    return value
            raise ValueError(f"cannot read {names[0]} from the base model config ({type(cfg).__name__})")

        self.hidden_size: int = first("hidden_size", "n_embd", "d_model")
        self.num_layers: int = first("num_hidden_layers", "n_layer", "num_layers")
        self.num_heads: int = first("num_attention_heads", "n_head", "num_heads")
        self.num_kv_heads: int = getattr(cfg, "num_key_value_heads", None) or self.num_heads
        self.head_dim: int = getattr(cfg, "head_dim", None) or self.hidden_size // self.num_heads


def model_geometry(model_config: Any) -> ModelGeometry:
    return ModelGeometry(model_config)


class SoftPrompt(ParameterOwner, nn.Module):
    """Base class of the soft-prompt adapters: they live in ``PeftModel.prompt_encoder[name]``."""

    config: PromptLearningConfig

    def attach(self, model: PeftModel, adapter_name: str) -> None:
        model.prompt_encoder[adapter_name] = self

    def detach(self, model: PeftModel, adapter_name: str) -> None:
        del model.prompt_encoder[adapter_name]

    def adapter_parameters(self) -> Iterator[nn.Parameter]:
        return iter(self.parameters())

    def check_rows(self, rows: Tensor) -> Tensor:
        """``(B,)`` bool: which rows use this prompt. A single prompt has one table entry (0)."""
        if rows.numel() and int(rows.max()) > 0:
            raise IndexError(f"rows index expert {int(rows.max())}, but this adapter holds 1 prompt")
        return rows >= 0


class EmbeddingSoftPrompt(SoftPrompt):
    """A soft prompt that enters as extra input embeddings (prompt tuning, p-tuning)."""

    def prompt(self) -> Tensor:
        """``(n_virtual, D)`` the virtual token embeddings."""
        raise NotImplementedError

    def forward(self, batch_size: int) -> Tensor:
        """``(batch_size, n_virtual, D)`` the prompt repeated for every row (identical rows)."""
        return self.prompt().unsqueeze(0).expand(batch_size, -1, -1)

    def prepare_inputs(self, inputs: ModelInputs, rows: Tensor) -> ModelInputs:
        selected = self.check_rows(rows)
        return insert_virtual_embeddings(inputs, self.prompt(), selected)


def leading_padding(attention_mask: Tensor) -> Tensor:
    """``(B,)`` how many masked positions open each row (its left padding)."""
    length = attention_mask.shape[1]
    first_real = attention_mask.ne(0).int().argmax(-1)
    return torch.where(attention_mask.ne(0).any(-1), first_real, torch.full_like(first_real, length))


def insert_virtual_embeddings(inputs: ModelInputs, prompt: Tensor, selected: Tensor) -> ModelInputs:
    """Insert ``prompt`` ``(n, D)`` into the rows where ``selected`` ``(B,)`` is True.

    The virtual tokens go after each row's left padding; rows that are not selected receive ``n``
    masked slots at the front (they behave as extra padding). Labels get ``-100`` at virtual
    positions and ``user_positions`` follow the user's tokens.
    """
    embeds, mask = inputs.inputs_embeds, inputs.attention_mask
    batch, length, dim = embeds.shape
    n = prompt.shape[0]
    virtual = prompt.to(embeds.dtype).unsqueeze(0).expand(batch, n, dim)
    virtual_mask = selected.long().unsqueeze(1).expand(batch, n)
    lead = torch.where(selected, leading_padding(mask), torch.zeros_like(selected, dtype=torch.long))

    labels = inputs.labels
    if not bool(lead.any()):  # the common case: virtual tokens simply go first
        new_embeds = torch.cat([torch.where(selected[:, None, None], virtual, 0.0), embeds], dim=1)
        new_mask = torch.cat([virtual_mask, mask], dim=1)
        if labels is not None:
            labels = torch.cat([torch.full_like(labels[:, :1], IGNORE_INDEX).expand(batch, n), labels], 1)
        return inputs.with_(
            inputs_embeds=new_embeds,
            attention_mask=new_mask,
            labels=labels,
            user_positions=inputs.user_positions + n,
        )

    # Source index into cat(virtual, sequence) for every output position j:
    #   j < lead           -> sequence[j]       (left padding stays in front)
    #   lead <= j < lead+n -> virtual[j - lead]
    #   j >= lead + n      -> sequence[j - n]
    j = torch.arange(length + n, device=embeds.device).unsqueeze(0)
    lead_ = lead.unsqueeze(1)
    source = torch.where(j < lead_, j + n, torch.where(j < lead_ + n, j - lead_, j))
    stacked = torch.cat([torch.where(selected[:, None, None], virtual, 0.0), embeds], dim=1)
    new_embeds = stacked.gather(1, source.unsqueeze(-1).expand(-1, -1, dim))
    new_mask = torch.cat([virtual_mask, mask], dim=1).gather(1, source)
    if labels is not None:
        padded = torch.cat([torch.full_like(labels[:, :1], IGNORE_INDEX).expand(batch, n), labels], 1)
        labels = padded.gather(1, source)
    user_positions = inputs.user_positions + n * (inputs.user_positions >= lead_).long()
    return inputs.with_(inputs_embeds=new_embeds, attention_mask=new_mask, labels=labels, user_positions=user_positions)
