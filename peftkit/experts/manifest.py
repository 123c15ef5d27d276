"""The expert manifest: what an expert is, how it was trained and how it must decode.

A YAML or JSON file (``expert.yaml``), validated by :class:`ExpertManifest`. Its JSON Schema is
``schemas/expert-manifest.schema.json`` (``python -m peftkit.experts.schema`` rewrites it; a test
keeps the two equal). Unknown keys are errors: no field is silently ignored.

::

    name: json-expert
    version: 0.1.0
    base_model: {name: smollm2-135m-instruct, fingerprint: {architecture: LlamaForCausalLM, ...}}
    soft_prompts: [{name: json_strict, tokens: 16, init_method: text, init_text: "Generate valid, compact JSON..."}]
    adapters: [{name: lora, type: LORA, config: {r: 8, target_modules: [q_proj, v_proj]}}]
    training: {data: {train: data/train.jsonl}, formatter: prompt_completion, config: {lr: 3.0e-2, max_steps: 60}}
    decoding: {temperature: 0.2, stop: ["\\n\\n"], grammar: {json_schema: {...}}}
    runtime: {attention_kernel: sdpa, requires_kv_cache_persistence: true}
    quality_targets: ["schema_compliance >= 0.95"]
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from peftkit.decoding import DecodingSettings, describe_validation
from peftkit.sections import Section

NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
VERSION = re.compile(r"^\d+\.\d+\.\d+([.+-][0-9A-Za-z.-]+)?$")
IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")
ATTENTION_KERNELS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


class ManifestError(ValueError):
    """An invalid manifest (the message names every bad field)."""


class Fingerprint(Section):
    """What identifies the base model's shape (and, where known, its exact weights)."""

    architecture: str
    """The model class, e.g. ``LlamaForCausalLM`` (``config.architectures[0]``)."""
    hidden_size: int = Field(ge=1)
    """Width of the hidden states (a soft prompt's tensor is ``[tokens, hidden_size]``)."""
    num_layers: int = Field(ge=1)
    """Transformer blocks (``num_hidden_layers``)."""
    vocab_size: int = Field(ge=1)
    """Rows of the embedding matrix."""
    weights_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    """SHA-256 of the weights file (``model.safetensors``) where one is known."""

    def differences(self, other: Fingerprint) -> list[str]:
        """``field: self vs other`` for every field that differs (a missing hash is no difference)."""
        out = []
        for name in type(self).model_fields:
            a, b = getattr(self, name), getattr(other, name)
            if name == "weights_sha256" and (a is None or b is None):
                continue
            if a != b:
                out.append(f"{name}: {a} vs {b}")
        return out

    def short(self) -> str:
        digest = f", weights {self.weights_sha256[:12]}" if self.weights_sha256 else ""
        shape = f"hidden {self.hidden_size}, {self.num_layers} layers, vocab {self.vocab_size}"
        return f"{self.architecture} ({shape}{digest})"


class BaseModelSpec(Section):
    """The frozen base model the expert was trained on."""

    name: str
    """An embedded alias (``smollm2-135m-instruct``) or the path of a local Hugging Face model folder."""
    fingerprint: Fingerprint | None = None
    """Its shape (and weights hash); checked against the model actually loaded. ``peftkit package``
    fills it in."""


class SoftPromptSpec(Section):
    """A soft prompt: ``tokens`` trained virtual-token embeddings put before the user's text."""

    name: str = Field(pattern=IDENTIFIER.pattern)
    """Its name (an identifier); it becomes the name of its prompt-tuning adapter."""
    tokens: int = Field(ge=1, le=1024)
    """Number of virtual tokens."""
    init_method: Literal["text", "random", "vocab_sample"] = "random"
    """``text``: the embeddings of ``init_text`` (repeated to fill); ``random``: small random values;
    ``vocab_sample``: embeddings of randomly drawn vocabulary tokens."""
    init_text: str | None = None
    """The text for ``init_method: text``."""
    purpose: str | None = None
    """What it is for (documentation, shown by ``inspect``)."""
    weights: str | None = None
    """Its tensor file inside the package (``soft_prompts/<name>/adapter_model.safetensors``); set by
    ``peftkit package``."""

    @model_validator(mode="after")
    def _init_text(self) -> SoftPromptSpec:
        if self.init_method == "text" and not self.init_text:
            raise ValueError(f"soft prompt {self.name!r}: init_method text needs init_text")
        if self.init_method != "text" and self.init_text is not None:
            raise ValueError(f"soft prompt {self.name!r}: init_text applies to init_method text only")
        return self

    def peft_config(self, tokenizer_name: str) -> dict[str, Any]:
        """The prompt-tuning adapter config (``adapters.<name>`` of a training run)."""
        init = {"text": "TEXT", "random": "RANDOM", "vocab_sample": "SAMPLE_VOCAB"}[self.init_method]
        config: dict[str, Any] = {
            "peft_type": "PROMPT_TUNING",
            "num_virtual_tokens": self.tokens,
            "prompt_tuning_init": init,
        }
        if self.init_method == "text":
            config |= {"prompt_tuning_init_text": self.init_text, "tokenizer_name_or_path": tokenizer_name}
        return config


class AdapterSpec(Section):
    """A weight adapter (LoRA, DoRA, IA³, ...) trained with the soft prompts."""

    name: str = Field(pattern=IDENTIFIER.pattern)
    """Its name (an identifier)."""
    type: str
    """The PEFT method: ``LORA``, ``IA3``, ``LOHA``, ``LOKR``, ``OFT``, ``BOFT``, ``VERA``, ``ADALORA``
    (DoRA is ``LORA`` with ``use_dora: true``)."""
    config: dict[str, Any] = Field(default_factory=dict)
    """The method's config fields (as in ``adapter_config.json``, without ``peft_type``)."""
    weights: str | None = None
    """Its tensor file inside the package; set by ``peftkit package``."""

    @model_validator(mode="after")
    def _valid_config(self) -> AdapterSpec:
        from peftkit.training.config import resolve_adapter

        if "peft_type" in self.config:
            raise ValueError(f"adapter {self.name!r}: give the method as type, not config.peft_type")
        resolved = resolve_adapter(self.name, {"peft_type": self.type.upper(), **self.config})
        if resolved.get("task_type") not in (None, "CAUSAL_LM"):
            raise ValueError(f"adapter {self.name!r}: task_type must be CAUSAL_LM")
        return self

    def peft_config(self) -> dict[str, Any]:
        return {"peft_type": self.type.upper(), **self.config}


class TrainingSpec(Section):
    """How ``peftkit train MANIFEST`` trains the soft prompts and adapters, jointly."""

    data: dict[str, Any]
    """Sources as in a run config's ``data`` section: ``train`` (required), ``eval``, ``max_length``, ..."""
    formatter: str = "prompt_completion"
    """Record → prompt/completion formatter (``prompt_completion``, ``chat``, ``template``, ...)."""
    formatter_options: dict[str, Any] = Field(default_factory=dict)
    """Options of the formatter."""
    config: dict[str, Any] = Field(default_factory=dict)
    """The run config's ``training`` section: ``lr``, ``max_steps``, ``batch_size``, ``warmup_steps``, ..."""
    output_dir: str | None = None
    """Where the run writes (default ``runs/experts/<name>``)."""

    @model_validator(mode="after")
    def _valid(self) -> TrainingSpec:
        from peftkit.training.config import DataConfig, TrainingConfig

        for key in ("formatter", "formatter_options"):
            if key in self.data:
                raise ValueError(f"training.data.{key}: give it as training.{key}")
        try:
            DataConfig(**self.data, formatter=self.formatter, formatter_options=self.formatter_options)
        except ValidationError as exc:
            raise ValueError(f"training.data: {describe_validation(exc)}") from None
        try:
            TrainingConfig(**self.config)
        except ValidationError as exc:
            raise ValueError(f"training.config: {describe_validation(exc)}") from None
        return self


class RuntimeHints(Section):
    """How the expert wants to be run."""

    attention_kernel: Literal["eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention"] | None = None
    """transformers' attention implementation: ``eager``, ``sdpa``, ``flash_attention_2``,
    ``flash_attention_3``, ``flex_attention``. An unavailable one falls back (with a warning naming both)."""
    requires_kv_cache_persistence: bool = False
    """``chat`` keeps the attention cache across turns: a turn computes only its new tokens."""


class ExpertManifest(Section):
    """One expert: the base model, its soft prompts and adapters, training, decoding, runtime and targets."""

    schema_version: Literal[1] = 1
    """The manifest format version."""
    name: str = Field(pattern=NAME.pattern)
    """Lower-case name: letters, digits, ``.``, ``_``, ``-`` (at most 64); the package is ``NAME-VERSION.expert``."""
    version: str = Field(pattern=VERSION.pattern)
    """Semantic version, e.g. ``0.1.0``."""
    description: str = ""
    """What the expert does."""
    base_model: BaseModelSpec
    """The frozen base model."""
    soft_prompts: list[SoftPromptSpec] = Field(default_factory=list)
    """Soft prompts, all active together (several per expert allowed)."""
    adapters: list[AdapterSpec] = Field(default_factory=list)
    """Weight adapters, trained jointly with the soft prompts."""
    training: TrainingSpec | None = None
    """How to train (``peftkit train MANIFEST``)."""
    decoding: DecodingSettings = Field(default_factory=DecodingSettings)
    """Decoding settings: ``chat`` and ``generate`` use them; command-line flags override them."""
    runtime: RuntimeHints = Field(default_factory=RuntimeHints)
    """Runtime hints."""
    quality_targets: list[str | dict[str, Any]] = Field(default_factory=list)
    """Quality targets in the evaluation targets' syntax (``schema_compliance >= 0.95``), checked against
    the evaluation report packaged with the expert."""

    @field_validator("quality_targets")
    @classmethod
    def _targets(cls, value: list[Any]) -> list[Any]:
        from peftkit.evaluation.targets import parse_target

        for target in value:
            parse_target(target)
        return value

    @model_validator(mode="after")
    def _unique_names(self) -> ExpertManifest:
        names = [p.name for p in self.soft_prompts] + [a.name for a in self.adapters]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"soft prompt / adapter names must be unique; repeated: {duplicated}")
        if not names:
            raise ValueError("an expert needs at least one soft prompt or adapter")
        return self

    @property
    def package_name(self) -> str:
        return f"{self.name}-{self.version}.expert"

    def adapter_names(self) -> list[str]:
        return [p.name for p in self.soft_prompts] + [a.name for a in self.adapters]


def parse_manifest(data: Any, source: str = "manifest") -> ExpertManifest:
    """Validate manifest data; errors name each field, value and rule (:class:`ManifestError`)."""
    if not isinstance(data, dict):
        raise ManifestError(f"{source}: a manifest is a mapping, got {type(data).__name__}")
    try:
        return ExpertManifest.model_validate(data)
    except ValidationError as exc:
        raise ManifestError(f"{source}: {describe_validation(exc)}") from None
    except ValueError as exc:  # raised by nested helpers outside pydantic's wrapping
        raise ManifestError(f"{source}: {exc}") from None


def read_manifest_data(path: str | Path) -> Any:
    """The raw mapping of a ``.yaml`` / ``.yml`` / ``.json`` manifest file."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: no such manifest file")
    try:
        text = path.read_text(encoding="utf-8")
        return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except UnicodeDecodeError:
        raise ManifestError(f"{path}: not UTF-8 text") from None
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ManifestError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} ({exc})") from None


def load_manifest(path: str | Path) -> ExpertManifest:
    """Read and validate a manifest file."""
    return parse_manifest(read_manifest_data(path), str(path))
