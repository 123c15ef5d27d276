"""Adapter configuration shared by every method.

Configs are pydantic models: every field is validated with a message that names it, the JSON
layout is Hugging Face PEFT's ``adapter_config.json``, and ``model_json_schema()`` exports a schema.

Nothing is silently ignored. Constructing a config with an unknown field is an error. Reading an
``adapter_config.json`` that carries keys this version does not know keeps PEFT's behaviour (the
keys are dropped) but warns with their names, and PEFT fields that peftkit does not implement are
accepted only at PEFT's default value.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import warnings
from pathlib import Path
from typing import Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict, field_validator

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


class TaskType(enum.StrEnum):
    """The task the adapted model solves (PEFT's members).

    Weight adapters serve every task (the base model's own forward runs with the adapters inside its
    layers); soft prompts need a causal LM (``CAUSAL_LM`` or ``None``).
    """

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


class PeftType(enum.StrEnum):
    """The adaptation method, spelled as in PEFT's ``peft_type`` field.

    Every PEFT member exists so that a name read from a file or a script resolves; only the methods
    in :data:`SHIPPED_METHODS` are implemented, the others raise an error naming them.
    """

    PROMPT_TUNING = "PROMPT_TUNING"
    MULTITASK_PROMPT_TUNING = "MULTITASK_PROMPT_TUNING"
    P_TUNING = "P_TUNING"
    PREFIX_TUNING = "PREFIX_TUNING"
    LORA = "LORA"
    ADALORA = "ADALORA"
    ADAMSS = "ADAMSS"
    BOFT = "BOFT"
    ADAPTION_PROMPT = "ADAPTION_PROMPT"
    IA3 = "IA3"
    BEFT = "BEFT"
    LILY = "LILY"
    LOHA = "LOHA"
    LOKR = "LOKR"
    OFT = "OFT"
    POLY = "POLY"
    LN_TUNING = "LN_TUNING"
    VERA = "VERA"
    FROD = "FROD"
    PVERA = "PVERA"
    FOURIERFT = "FOURIERFT"
    GLORA = "GLORA"
    XLORA = "XLORA"
    HRA = "HRA"
    VBLORA = "VBLORA"
    UNILORA = "UNILORA"
    CPT = "CPT"
    MISS = "MISS"
    RANDLORA = "RANDLORA"
    ROAD = "ROAD"
    TRAINABLE_TOKENS = "TRAINABLE_TOKENS"
    HIRA = "HIRA"
    SHIRA = "SHIRA"
    C3A = "C3A"
    WAVEFT = "WAVEFT"
    OSF = "OSF"
    DELORA = "DELORA"
    GRALORA = "GRALORA"
    CARTRIDGE = "CARTRIDGE"
    TINYLORA = "TINYLORA"
    PSOFT = "PSOFT"
    PEANUT = "PEANUT"
    SHADOW = "SHADOW"
    SUPERTUNING = "SUPERTUNING"
    DEFT = "DEFT"


#: The methods peftkit implements (the other :class:`PeftType` members are names only).
SHIPPED_METHODS = (
    "PROMPT_TUNING",
    "PREFIX_TUNING",
    "P_TUNING",
    "LORA",
    "ADALORA",
    "IA3",
    "LOHA",
    "LOKR",
    "OFT",
    "BOFT",
    "VERA",
)


class PeftConfig(BaseModel):
    """Fields every adapter config has (PEFT's ``PeftConfig``).

    PEFT's configs are dataclasses and user code treats them so (``dataclasses.replace(config, r=16)``,
    ``dataclasses.fields``, ``dataclasses.asdict``). Each subclass therefore also carries the stdlib
    dataclass field table, built from its pydantic fields (see ``__pydantic_init_subclass__``), so those
    functions work while every construction still goes through pydantic validation.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_enum_values=True)

    #: Method name written to ``adapter_config.json``; each subclass fixes it.
    peft_type: str
    task_type: TaskType | None = TaskType.CAUSAL_LM
    """Only ``CAUSAL_LM`` (or ``None``, read as causal LM) is supported."""
    base_model_name_or_path: str | None = None
    """Name or folder of the base model the adapter was trained on (informational)."""
    revision: str | None = None
    """Base model revision (informational)."""
    inference_mode: bool = False
    """True when the adapter was loaded for inference only (its parameters are frozen)."""
    auto_mapping: dict[str, Any] | None = None
    """Kept for PEFT compatibility; peftkit does not use it."""
    peft_version: str | None = None
    """Version of the library that wrote the file, when PEFT wrote it (informational)."""

    #: PEFT fields that peftkit does not implement, with the only value accepted for each.
    unsupported_defaults: ClassVar[dict[str, Any]] = {}
    #: peftkit-only fields; written to ``adapter_config.json`` only when set (PEFT warns on unknown keys).
    extension_fields: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        cls.__dataclass_fields__ = _dataclass_fields(cls)  # type: ignore[misc]
        cls.__dataclass_params__ = dataclasses._DataclassParams(  # type: ignore[attr-defined,misc]
            init=True, repr=True, eq=True, order=False, unsafe_hash=False, frozen=False
        )

    @field_validator("task_type", mode="before")
    @classmethod
    def _check_task_type(cls, value: Any) -> Any:
        value = getattr(value, "value", value)
        if value is None or value == TaskType.CAUSAL_LM.value:
            return value
        from peftkit.methods.soft_prompt import PromptLearningConfig

        if value in TaskType.__members__ and issubclass(cls, PromptLearningConfig):
            raise ValueError(
                f"task_type={value!r} is not supported for soft prompts: peftkit's soft prompts adapt causal LMs "
                "(use 'CAUSAL_LM'); weight adapters (LoRA, IA3, ...) serve every task type"
            )
        if value in TaskType.__members__:
            return value
        raise ValueError(f"task_type={value!r} is not a task type; allowed: {list(TaskType.__members__)} or None")

    @property
    def is_prompt_learning(self) -> bool:
        """True for soft-prompt methods (prompt tuning, prefix tuning, p-tuning)."""
        return False

    @property
    def is_adaption_prompt(self) -> bool:
        """True for adaption prompt (not shipped by peftkit: always False)."""
        return False

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready dict written to ``adapter_config.json`` (PEFT layout)."""
        data = self.model_dump(mode="json")
        data.update(self.unsupported_defaults)
        return {k: v for k, v in data.items() if not (k in self.extension_fields and v is None)}

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> Path:
        """Write ``adapter_config.json`` into ``save_directory`` and return its path.

        ``kwargs``: PEFT accepts hub options here; peftkit writes locally and refuses any it is given.
        """
        _refuse_hub_options("save_pretrained", kwargs)
        path = Path(save_directory) / CONFIG_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json_string())
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        """Build a config from an ``adapter_config.json`` dict.

        Called on the base class, dispatches on ``peft_type`` through the method registry.
        Unknown keys are dropped with a warning that names them; PEFT fields peftkit does not
        implement must hold PEFT's default value.
        """
        data = dict(data)
        target = cls
        if cls is PeftConfig or "peft_type" in data:
            from peftkit.methods.registry import config_class_for

            if "peft_type" not in data:
                raise ValueError("adapter config has no 'peft_type' field")
            target = config_class_for(data["peft_type"])
            if cls is not PeftConfig and not issubclass(target, cls):
                raise ValueError(f"peft_type={data['peft_type']!r} does not belong to {cls.__name__}")
        for key, only in target.unsupported_defaults.items():
            value = data.pop(key, None)
            if value is not None and value != only:
                raise ValueError(
                    f"{target.__name__}: field {key!r} is not supported by peftkit "
                    f"(only {only!r} is accepted); the adapter would behave differently than it was trained"
                )
        known = set(target.model_fields)
        unknown = sorted(set(data) - known)
        if unknown:
            warnings.warn(
                f"{target.__name__}: ignoring keys peftkit does not know: {unknown}",
                UserWarning,
                stacklevel=2,
            )
        return target(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_peft_type(cls, **kwargs: Any) -> PeftConfig:
        """Build the config class that ``kwargs["peft_type"]`` names (PEFT's ``from_peft_type``)."""
        return cls.from_dict(kwargs)

    @classmethod
    def from_json_file(cls, path_json_file: str | Path, **kwargs: Any) -> Self:
        _refuse_hub_options("from_json_file", kwargs)
        return cls.from_dict(json.loads(Path(path_json_file).read_text()))

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | Path, subfolder: str | None = None, **kwargs: Any
    ) -> Self:
        """Read ``adapter_config.json`` from an adapter folder (optionally a named subfolder).

        peftkit reads local folders only (no Hub download): a hub option in ``kwargs`` is refused.
        """
        _refuse_hub_options("from_pretrained", kwargs)
        directory = pretrained_model_name_or_path
        folder = Path(directory) / subfolder if subfolder else Path(directory)
        path = folder / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no {CONFIG_NAME} in {folder}")
        return cls.from_json_file(path)


def _dataclass_fields(cls: type[PeftConfig]) -> dict[str, dataclasses.Field]:
    """The stdlib dataclass field table of a pydantic config class (name, type, default)."""
    table: dict[str, dataclasses.Field] = {}
    for name, info in cls.model_fields.items():
        if info.default_factory is not None:
            field = dataclasses.field(default_factory=info.default_factory)  # type: ignore[arg-type]
        elif info.is_required():
            field = dataclasses.field()
        else:
            field = dataclasses.field(default=info.default)
        field.name = name
        field.type = info.annotation
        field._field_type = dataclasses._FIELD  # type: ignore[attr-defined]
        table[name] = field
    return table


def _refuse_hub_options(where: str, kwargs: dict[str, Any]) -> None:
    if kwargs:
        raise TypeError(
            f"{where}() got options {sorted(kwargs)}: peftkit reads and writes local folders only "
            "(no Hugging Face Hub download or upload)"
        )


PeftConfig.__dataclass_fields__ = _dataclass_fields(PeftConfig)  # type: ignore[misc]


def coerce_upper(value: Any) -> Any:
    """Accept enum-like values in any case (``"text"``, ``"TEXT"``, an enum member)."""
    value = getattr(value, "value", value)
    return value.upper() if isinstance(value, str) else value
