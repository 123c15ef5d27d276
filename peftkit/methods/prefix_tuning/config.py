"""Configuration of prefix tuning (Li & Liang, 2021, https://arxiv.org/abs/2101.00190)."""

from __future__ import annotations

from typing import Any, Literal, Self

from pydantic import model_validator

from peftkit.methods.soft_prompt import PromptLearningConfig, model_geometry


class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning: learned key/value states placed before the sequence in every layer.

    For grouped-query attention the prefix has one key/value per *key/value head*, so
    ``token_dim = head_dim * num_key_value_heads`` and ``num_attention_heads = num_key_value_heads``
    (PEFT's convention). Trainable parameters: ``num_virtual_tokens * num_layers * 2 * token_dim``
    without projection; with projection, the embedding plus a two-layer MLP.
    """

    peft_type: Literal["PREFIX_TUNING"] = "PREFIX_TUNING"
    encoder_hidden_size: int | None = None
    """Hidden width of the projection MLP (default: ``token_dim``)."""
    prefix_projection: bool = False
    """Reparameterise the prefix through ``Linear → tanh → Linear`` (Li & Liang, §4.3)."""
    init_weights: Literal["zero"] | None = None
    """``None``: PEFT's default init (N(0, 1) embeddings); ``"zero"``: start from a zero prefix."""

    @model_validator(mode="after")
    def _bank_without_projection(self) -> Self:
        if self.expert_ids is not None and self.prefix_projection:
            raise ValueError(
                "expert_ids (a bank) cannot be combined with prefix_projection=True: the projection MLP would be "
                "shared by every expert; use prefix_projection=False"
            )
        return self

    def resolved_for(self, model_config: Any) -> PrefixTuningConfig:
        config = super().resolved_for(model_config)
        geometry = model_geometry(model_config)
        updates: dict[str, Any] = {}
        if self.token_dim is None:
            updates["token_dim"] = geometry.head_dim * geometry.num_kv_heads
        if self.num_attention_heads is None:
            updates["num_attention_heads"] = geometry.num_kv_heads
        config = config.model_copy(update=updates)
        if config.encoder_hidden_size is None:
            config = config.model_copy(update={"encoder_hidden_size": config.token_dim})
        return config
