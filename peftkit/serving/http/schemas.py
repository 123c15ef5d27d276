"""The request bodies of ``/v1/completions`` and ``/v1/chat/completions``, as OpenAI defines them.

Fields this server cannot honour are refused (400 naming the field) rather than ignored: ``n > 1``,
``best_of > 1``, ``echo``, ``logprobs``, ``suffix``, a non-empty ``logit_bias``, tools, and
``stream_options`` without ``stream: true`` (as OpenAI refuses it). Unknown
fields are refused too, as OpenAI's API does, so a misspelt setting never silently does nothing.

Two fields are peftkit's own (the OpenAI client sends them with ``extra_body``): ``fallback``, the
experts to try when ``model`` is not loaded, and ``top_k`` / ``min_p`` / ``repetition_penalty`` (vLLM
accepts the same names).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

# OpenAI field -> DecodingSettings field. ``max_completion_tokens`` (chat) is the newer max_tokens.
DECODING_FIELD_OF = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "max_tokens": "max_new_tokens",
    "max_completion_tokens": "max_new_tokens",
    "stop": "stop",
    "seed": "seed",
}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False
    """Send one last chunk, before ``[DONE]``, with ``usage`` and no choices."""


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    """The JSON Schema the output must validate against (decoded under a grammar)."""
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """``text`` (no constraint: also drops an expert's manifest grammar), ``json_object`` (any JSON
    object) or ``json_schema`` (``{"json_schema": {"name", "schema"}}``)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs a json_schema object ({name, schema})")
        return self

    def grammar(self) -> dict[str, Any] | None:
        """The ``DecodingSettings.grammar`` value (``None`` for ``text``)."""
        if self.type == "json_object":
            return {"json_schema": {"type": "object"}}
        if self.type == "json_schema":
            assert self.json_schema is not None
            return {"json_schema": self.json_schema.schema_}
        return None


class GenerationRequest(BaseModel):
    """The fields both endpoints share."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    """The expert that answers (``base``: the bare model)."""
    fallback: list[str] = Field(default_factory=list)
    """Experts to try, in order, when ``model`` is not loaded (peftkit's own field)."""
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    response_format: ResponseFormat | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int | None) -> int | None:
        if value is not None and value != 1:
            raise ValueError("only n=1 is supported (one choice per request); send several requests instead")
        return value

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, value: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if value is not None and "stream" in info.data and not info.data["stream"]:  # a bad stream: its own error
            raise ValueError("stream_options is only allowed when stream is true")
        return value

    @field_validator("top_k")
    @classmethod
    def _vllm_top_k_off(cls, value: int | None) -> int | None:
        return 0 if value == -1 else value  # vLLM's "off"

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value:
            raise ValueError("logit_bias is not supported")
        return value

    def decoding_values(self) -> list[tuple[str, str, Any]]:
        """``(openai field, DecodingSettings field, value)`` for each decoding field the request sets."""
        given = []
        for name, target in DECODING_FIELD_OF.items():
            value = getattr(self, name, None)
            if value is not None:
                given.append((name, target, value))
        if self.response_format is not None and self.response_format.type != "text":
            given.append(("response_format", "grammar", self.response_format.grammar()))
        return given

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(GenerationRequest):
    """``POST /v1/completions``: ``prompt`` is a string or a list of token ids (one prompt)."""

    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool | None = None
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: Any) -> Any:
        if isinstance(value, list) and value and isinstance(value[0], (str, list)):
            if len(value) != 1:
                raise ValueError(f"one prompt per request (got {len(value)}); send several requests instead")
            value = value[0]
        if len(value) == 0:
            raise ValueError("the prompt is empty")
        return value

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("echo is not supported")
        return value

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: int | None) -> int | None:
        if value is not None:
            raise ValueError("logprobs are not supported")
        return value

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, value: int | None) -> int | None:
        if value is not None and value != 1:
            raise ValueError("only best_of=1 is supported")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        if value:
            raise ValueError("suffix (insertion) is not supported")
        return value


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def as_template_message(self) -> dict[str, str]:
        """``{role, content}`` for the chat template (``developer`` is OpenAI's newer ``system``)."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatCompletionRequest(GenerationRequest):
    """``POST /v1/chat/completions``: ``messages`` rendered with the tokenizer's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("logprobs are not supported")
        return value

    @model_validator(mode="after")
    def _one_max(self) -> ChatCompletionRequest:
        both = self.max_tokens is not None and self.max_completion_tokens is not None
        if both and self.max_tokens != self.max_completion_tokens:
            raise ValueError("max_tokens and max_completion_tokens disagree; give one")
        return self


class LoadExpert(BaseModel):
    """``POST /admin/experts/load``: a path inside the server's experts folder."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1)


class UnloadExpert(BaseModel):
    """``POST /admin/experts/unload``."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
