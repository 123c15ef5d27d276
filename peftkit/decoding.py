"""The one decoding-settings type: ``generate``, evaluation, expert manifests and the CLI all use it.

::

    DecodingSettings(temperature=0.1, top_p=0.9, stop=("\\n\\n",), grammar=Grammar(json_schema={...}))

Ranges follow OpenAI-style servers (temperature 0–2, top_p in (0, 1], top_k ≥ 0, max tokens ≥ 1,
presence and frequency penalties in [-2, 2]).
``temperature == 0`` decodes greedily; above 0 samples. :func:`resolve_decoding` layers the
sources (defaults < manifest < command-line flags) and records where each value came from, so a
command can print ``temperature=0.1 (manifest)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

__all__ = [
    "DECODING_FIELDS",
    "DecodingSettings",
    "Grammar",
    "PresenceFrequencyPenalty",
    "StopScanner",
    "resolve_decoding",
]


class Grammar(BaseModel):
    """A constraint on the generated text: exactly one of ``json_schema`` or ``gbnf``.

    Any JSON object or array: ``json_schema: {type: [object, array]}``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    json_schema: dict[str, Any] | None = None
    """A JSON Schema: the output is compact JSON that validates against it."""
    gbnf: str | None = None
    """A grammar in llama.cpp's GBNF syntax (``root ::= ...``)."""

    @model_validator(mode="after")
    def _exactly_one(self) -> Grammar:
        given = [k for k in ("json_schema", "gbnf") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"grammar: give exactly one of json_schema or gbnf (got {given or 'none'})")
        if self.gbnf is not None and not self.gbnf.strip():
            raise ValueError("grammar.gbnf is empty")
        if self.json_schema is not None:
            from peftkit.evaluation.metrics.answers import schema_validator

            schema_validator(self.json_schema)  # an invalid schema is an error now, not at decode time
        return self

    @property
    def kind(self) -> str:
        return "json_schema" if self.json_schema is not None else "gbnf"


class DecodingSettings(BaseModel):
    """How text is generated. Every field is applied by every decoder in peftkit."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    temperature: float = Field(0.0, ge=0, le=2)
    """0 decodes greedily; above 0 samples from the softmax at this temperature (0–2)."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches ``top_p`` (0, 1]."""
    top_k: int = Field(0, ge=0)
    """Keep the ``top_k`` most likely tokens; 0 = off."""
    min_p: float = Field(0.0, ge=0, le=1)
    """Drop tokens less likely than ``min_p`` × the most likely one; 0 = off."""
    repetition_penalty: float = Field(1.0, gt=0)
    """CTRL-style penalty on tokens already in the sequence, prompt included (1 = off); applies to greedy
    decoding too."""
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    """OpenAI's presence penalty (-2–2, 0 = off): subtracted once from the logit of every token that
    already appears in the generated text (not the prompt); positive values favour new tokens."""
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    """OpenAI's frequency penalty (-2–2, 0 = off): subtracted from a token's logit once per time it
    already appears in the generated text (not the prompt); positive values discourage repetition."""
    max_new_tokens: int = Field(256, ge=1)
    """The most tokens generated per answer."""
    stop: tuple[str, ...] = ()
    """Stop sequences: generation ends when one appears (it may span several tokens); the output is
    cut just before it."""
    seed: int | None = Field(None, ge=0)
    """Seeds sampling, for reproducible samples (``None``: not seeded)."""
    grammar: Grammar | None = None
    """Constrain decoding to a grammar (JSON Schema or GBNF); see :mod:`peftkit.grammar`."""

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return (value,)
        return value

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if any(not s for s in value):
            raise ValueError("stop cannot contain an empty string")
        return value

    @classmethod
    def checked(cls, **values: Any) -> DecodingSettings:
        """Validate ``values``; an error names each bad field, its value and the rule (``ValueError``)."""
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            raise ValueError(describe_validation(exc)) from None

    @property
    def do_sample(self) -> bool:
        return self.temperature > 0

    @property
    def has_penalties(self) -> bool:
        """Any of the repetition, presence or frequency penalties is on."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def processors(self, constraints: Sequence[Any] = (), *, prompt_length: int | None = None) -> LogitsProcessorList:
        """The score transforms: penalties, then ``constraints`` (e.g. a grammar mask), then temperature,
        top-k, top-p and min-p. Constraints come before the sampling warpers so that top-k / top-p
        choose among the allowed tokens only.

        Args:
            prompt_length: where the generated tokens start in the ``input_ids`` the processors are
                called with (for the presence / frequency penalties); ``None``: the length of the
                first call's ``input_ids``, so a fresh list must be used per generation.
        """
        steps = LogitsProcessorList()
        if self.repetition_penalty != 1.0:
            steps.append(RepetitionPenaltyLogitsProcessor(self.repetition_penalty))
        if self.presence_penalty != 0.0 or self.frequency_penalty != 0.0:
            steps.append(PresenceFrequencyPenalty(self.presence_penalty, self.frequency_penalty, prompt_length))
        steps.extend(constraints)
        if self.do_sample:
            if self.temperature != 1.0:
                steps.append(TemperatureLogitsWarper(self.temperature))
            if self.top_k > 0:
                steps.append(TopKLogitsWarper(self.top_k))
            if self.top_p < 1.0:
                steps.append(TopPLogitsWarper(self.top_p))
            if self.min_p > 0:
                steps.append(MinPLogitsWarper(self.min_p))
        return steps

    def describe(self, sources: Mapping[str, str] | None = None) -> list[str]:
        """One ``name=value (source)`` line per field."""
        lines = []
        for name in DECODING_FIELDS:
            value = getattr(self, name)
            shown = value.kind if isinstance(value, Grammar) else list(value) if isinstance(value, tuple) else value
            source = (sources or {}).get(name, "default")
            lines.append(f"{name}={shown!r} ({source})" if isinstance(shown, str) else f"{name}={shown} ({source})")
        return lines


DECODING_FIELDS = tuple(DecodingSettings.model_fields)


class PresenceFrequencyPenalty:
    """OpenAI's presence and frequency penalties, an ``(input_ids, scores) -> scores`` processor.

    ``scores[t] -= frequency * c[t] + presence * (c[t] > 0)``, where ``c[t]`` counts ``t`` among the
    generated tokens only (``input_ids[:, prompt_length:]``), as OpenAI and vLLM define them
    (https://platform.openai.com/docs/advanced-usage#frequency-and-presence-penalties).

    Args:
        prompt_length: where generation starts in ``input_ids``; ``None`` takes the first call's length
            (the prompt, before anything was generated).
    """

    def __init__(self, presence: float, frequency: float, prompt_length: int | None = None) -> None:
        self.presence, self.frequency, self.prompt_length = presence, frequency, prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.prompt_length is None:
            self.prompt_length = input_ids.shape[1]
        generated = input_ids[:, self.prompt_length :]  # (B, new)
        if generated.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


def resolve_decoding(
    *layers: tuple[str, Mapping[str, Any] | None], base: DecodingSettings | None = None
) -> tuple[DecodingSettings, dict[str, str]]:
    """Apply ``(source, values)`` layers in order over ``base`` (later layers win).

    ``None`` values in a layer mean "not given". Returns the validated settings and, per field, the
    source of its value (``default`` when no layer gave it).

    Raises:
        ValueError: an unknown field, or a value out of range (the message names the field and source).
    """
    values = (base or DecodingSettings()).model_dump(exclude_none=False)
    sources = dict.fromkeys(DECODING_FIELDS, "default")
    for source, layer in layers:
        for name, value in (layer or {}).items():
            if value is None:
                continue
            if name not in DECODING_FIELDS:
                raise ValueError(f"{source}: unknown decoding setting {name!r}; known: {', '.join(DECODING_FIELDS)}")
            try:
                DecodingSettings.checked(**{**values, name: value})
            except ValueError as exc:
                raise ValueError(f"{source}: {exc}") from None
            values[name], sources[name] = value, source
    return DecodingSettings.model_validate(values), sources


def describe_validation(exc: ValidationError) -> str:
    """``field=value: rule`` for each error of ``exc``, joined by ``; ``."""
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"]) or "value"
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] in ("value_error", "assertion_error", "missing") or "input" not in error:
            parts.append(f"{where}: {message}")
        else:
            parts.append(f"{where}={error['input']!r}: {message}")
    return "; ".join(parts)


class StopScanner:
    """Streams text while holding back what could still become a stop sequence.

    Feed the whole decoded text so far with :meth:`update`; it returns the newly safe text and
    whether a stop sequence has appeared. A stop sequence may span any number of tokens: text is
    released only once no stop sequence can start in it.
    """

    def __init__(self, stop: tuple[str, ...]) -> None:
        self.stop = stop
        self.released = 0
        self.stopped = False
        self.text = ""

    def update(self, text: str, final: bool = False) -> str:
        self.text = text
        cut = min((p for p in (text.find(s) for s in self.stop) if p >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            safe = cut
        elif final:
            safe = len(text)
        else:
            safe = len(text) - self._held_back(text)
            if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for its next byte
                safe = min(safe, len(text.rstrip("\ufffd")))
        safe = max(safe, self.released)
        out, self.released = text[self.released : safe], safe
        return out

    def _held_back(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop sequence."""
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:n]):
                    longest = n
                    break
        return longest

    @property
    def output(self) -> str:
        """Everything released so far (the final output once stopped or finalised)."""
        return self.text[: self.released]
