"""Configuration of prompt tuning (Lester et al., 2021, https://arxiv.org/abs/2104.08691)."""

from __future__ import annotations

import enum
from typing import Any, ClassVar, Literal, Self

from pydantic import field_validator, model_validator

from peftkit.config import coerce_upper
from peftkit.methods.soft_prompt import PromptLearningConfig


class PromptTuningInit(enum.StrEnum):
    """How the virtual token embeddings start."""

    RANDOM = "RANDOM"
    """Random, scaled to the per-dimension mean and spread of the model's word embeddings."""
    TEXT = "TEXT"
    """Embeddings of ``prompt_tuning_init_text``, tiled or truncated to ``num_virtual_tokens``."""
    SAMPLE_VOCAB = "SAMPLE_VOCAB"
    """Embeddings of tokens drawn uniformly from the vocabulary."""


class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning: ``num_virtual_tokens`` learned embeddings prepended to the input.

    Trainable parameters: ``num_virtual_tokens * token_dim``.
    """

    extension_fields: ClassVar[frozenset[str]] = PromptLearningConfig.extension_fields | {"init_seed"}

    peft_type: Literal["PROMPT_TUNING"] = "PROMPT_TUNING"
    prompt_tuning_init: PromptTuningInit = PromptTuningInit.RANDOM
    """Initialisation: ``RANDOM`` (default), ``TEXT`` or ``SAMPLE_VOCAB`` (any case)."""
    prompt_tuning_init_text: str | None = None
    """Text whose token embeddings initialise the prompt (required for ``TEXT``)."""
    tokenizer_name_or_path: str | None = None
    """Tokenizer for ``TEXT`` init: a model alias (e.g. ``smollm2-135m-instruct``) or a folder."""
    tokenizer_kwargs: dict[str, Any] | None = None
    """Extra keyword arguments for loading that tokenizer."""
    init_seed: int | None = None
    """Seed for ``RANDOM`` / ``SAMPLE_VOCAB`` init (default: torch's global generator)."""

    @field_validator("prompt_tuning_init", mode="before")
    @classmethod
    def _any_case(cls, value: Any) -> Any:
        return coerce_upper(value)

    @model_validator(mode="after")
    def _text_init_needs_text_and_tokenizer(self) -> Self:
        if self.prompt_tuning_init == PromptTuningInit.TEXT:
            if not self.prompt_tuning_init_text:
                raise ValueError("prompt_tuning_init_text required when prompt_tuning_init is 'TEXT'")
            if not self.tokenizer_name_or_path:
                raise ValueError("tokenizer_name_or_path required when prompt_tuning_init is 'TEXT'")
        if self.tokenizer_kwargs and self.prompt_tuning_init != PromptTuningInit.TEXT:
            raise ValueError("tokenizer_kwargs is only used with prompt_tuning_init 'TEXT'")
        return self
