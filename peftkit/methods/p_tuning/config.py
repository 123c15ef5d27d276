"""Configuration of p-tuning (Liu et al., 2021, https://arxiv.org/abs/2103.10385)."""

from __future__ import annotations

import enum
from typing import Any, Literal, Self

from pydantic import field_validator, model_validator

from peftkit.config import coerce_upper
from peftkit.methods.soft_prompt import PromptLearningConfig


class PromptEncoderReparameterizationType(enum.StrEnum):
    """The network that turns virtual token embeddings into the prompt."""

    MLP = "MLP"
    LSTM = "LSTM"


class PromptEncoderConfig(PromptLearningConfig):
    """P-tuning: virtual token embeddings passed through a prompt encoder (MLP or LSTM).

    MLP: ``Linear(D, h) → ReLU → Linear(h, h) → ReLU → Linear(h, D)``.
    LSTM: a bidirectional ``encoder_num_layers``-layer LSTM (hidden ``h``) then
    ``Linear(2h, 2h) → ReLU → Linear(2h, D)``.
    """

    peft_type: Literal["P_TUNING"] = "P_TUNING"
    encoder_reparameterization_type: PromptEncoderReparameterizationType = PromptEncoderReparameterizationType.MLP
    """``MLP`` (default) or ``LSTM``."""
    encoder_hidden_size: int | None = None
    """Hidden width ``h`` of the encoder (default: ``token_dim``)."""
    encoder_num_layers: int = 2
    """LSTM layers. The MLP encoder always has two hidden layers, so it must stay 2 for MLP."""
    encoder_dropout: float = 0.0
    """Dropout between LSTM layers (unused by the MLP encoder, so it must stay 0 for MLP)."""

    @field_validator("encoder_reparameterization_type", mode="before")
    @classmethod
    def _any_case(cls, value: Any) -> Any:
        return coerce_upper(value)

    @field_validator("expert_ids")
    @classmethod
    def _no_bank(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            raise ValueError(
                "expert_ids (a bank) is not supported by p-tuning: its prompt encoder would be shared by every "
                "expert; use prompt tuning or prefix tuning for a bank"
            )
        return value

    @field_validator("encoder_num_layers")
    @classmethod
    def _positive_layers(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"encoder_num_layers must be >= 1, got {value}")
        return value

    @field_validator("encoder_dropout")
    @classmethod
    def _dropout_range(cls, value: float) -> float:
        if not 0.0 <= value < 1.0:
            raise ValueError(f"encoder_dropout must be in [0, 1), got {value}")
        return value

    @model_validator(mode="after")
    def _mlp_fields(self) -> Self:
        if self.encoder_reparameterization_type == PromptEncoderReparameterizationType.MLP:
            if self.encoder_num_layers != 2:
                raise ValueError(
                    f"encoder_num_layers={self.encoder_num_layers} has no effect on the MLP encoder "
                    "(it always has 2 hidden layers); use encoder_reparameterization_type='LSTM' or leave it at 2"
                )
            if self.encoder_dropout != 0.0:
                raise ValueError(
                    f"encoder_dropout={self.encoder_dropout} has no effect on the MLP encoder; "
                    "use encoder_reparameterization_type='LSTM' or leave it at 0"
                )
        return self

    def resolved_for(self, model_config: Any) -> PromptEncoderConfig:
        config = super().resolved_for(model_config)
        if config.encoder_hidden_size is None:
            config = config.model_copy(update={"encoder_hidden_size": config.token_dim})
        return config
