"""Names PEFT exports for methods and helpers peftkit does not ship.

Each imports fine, so a script written for PEFT loads; using it raises :class:`UnsupportedMethodError`
that names the method and lists the methods peftkit ships. Nothing here ever runs a substitute.
"""

from __future__ import annotations

import enum
from typing import Any, NoReturn

from peftkit.config import SHIPPED_METHODS
from peftkit.errors import PeftError


class UnsupportedMethodError(PeftError, NotImplementedError):
    """A PEFT method or helper that peftkit does not implement was used."""


def _refuse(name: str, what: str) -> NoReturn:
    raise UnsupportedMethodError(
        f"{name}: {what} is not implemented by peftkit. peftkit ships these methods: "
        f"{', '.join(SHIPPED_METHODS)} (configs: PromptTuningConfig, PrefixTuningConfig, PromptEncoderConfig, "
        "LoraConfig (LoRA/DoRA), IA3Config, AdaLoraConfig, LoHaConfig, LoKrConfig, OFTConfig, BOFTConfig, VeraConfig); "
        "see docs/peft-compatibility.md"
    )


class _Unsupported:
    """Base of the placeholder classes: constructing one (or loading one) raises."""

    _what: str = ""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _refuse(type(self).__name__, self._what)

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> NoReturn:
        _refuse(cls.__name__, cls._what)


def unsupported_class(name: str, what: str) -> type:
    """A placeholder class ``name`` for ``what`` (e.g. ``"the XLoRA method (peft_type XLORA)"``)."""
    doc = f"PEFT's ``{name}``: {what} is not implemented by peftkit; constructing it raises."
    return type(name, (_Unsupported,), {"_what": what, "__doc__": doc, "__module__": __name__})


def unsupported_function(name: str, what: str) -> Any:
    """A placeholder function ``name`` that raises when called."""

    def refuse(*args: Any, **kwargs: Any) -> NoReturn:
        _refuse(name, what)

    refuse.__name__ = refuse.__qualname__ = name
    refuse.__doc__ = f"PEFT's ``{name}``: {what} is not implemented by peftkit; calling it raises."
    return refuse


#: PEFT method (``peft_type``) → the names PEFT exports for it (config, then tuner model / encoder).
UNSUPPORTED_METHODS: dict[str, tuple[str, ...]] = {
    "ADAMSS": ("AdamssConfig", "AdamssModel"),
    "ADAPTION_PROMPT": ("AdaptionPromptConfig", "AdaptionPromptModel"),
    "BEFT": ("BeftConfig", "BeftModel"),
    "C3A": ("C3AConfig", "C3AModel"),
    "CPT": ("CPTConfig", "CPTEmbedding"),
    "CARTRIDGE": ("CartridgeConfig", "CartridgeEncoder"),
    "DEFT": ("DeftConfig", "DeftModel"),
    "DELORA": ("DeloraConfig", "DeloraModel"),
    "FOURIERFT": ("FourierFTConfig", "FourierFTModel"),
    "FROD": ("FrodConfig", "FrodModel"),
    "GLORA": ("GloraConfig", "GloraModel"),
    "GRALORA": ("GraloraConfig", "GraloraModel"),
    "HRA": ("HRAConfig", "HRAModel"),
    "HIRA": ("HiraConfig", "HiraModel"),
    "LN_TUNING": ("LNTuningConfig", "LNTuningModel"),
    "LILY": ("LilyConfig", "LilyModel"),
    "MISS": ("MissConfig", "MissModel"),
    "MULTITASK_PROMPT_TUNING": ("MultitaskPromptTuningConfig",),
    "OSF": ("OSFConfig", "OSFModel"),
    "PEANUT": ("PeanutConfig", "PeanutModel"),
    "POLY": ("PolyConfig", "PolyModel"),
    "PSOFT": ("PsoftConfig", "PsoftModel"),
    "PVERA": ("PveraConfig", "PveraModel"),
    "RANDLORA": ("RandLoraConfig", "RandLoraModel"),
    "ROAD": ("RoadConfig", "RoadModel"),
    "SHADOW": ("ShadowConfig", "ShadowModel"),
    "SHIRA": ("ShiraConfig", "ShiraModel"),
    "SUPERTUNING": ("SupertuningConfig", "SupertuningModel"),
    "TINYLORA": ("TinyLoraConfig", "TinyLoraModel"),
    "TRAINABLE_TOKENS": ("TrainableTokensConfig", "TrainableTokensModel"),
    "UNILORA": ("UniLoraConfig", "UniLoraModel"),
    "VBLORA": ("VBLoRAConfig", "VBLoRAModel"),
    "WAVEFT": ("WaveFTConfig", "WaveFTModel"),
    "XLORA": ("XLoraConfig", "XLoraModel"),
}

#: LoRA variants and helpers PEFT configures through separate objects or functions.
UNSUPPORTED_FEATURES: dict[str, str] = {
    "ArrowConfig": "LoRA Arrow routing",
    "BdLoraConfig": "block-diagonal LoRA (BD-LoRA)",
    "EvaConfig": "EVA initialisation of LoRA",
    "KasaConfig": "KaSA (LoRA variant)",
    "LoftQConfig": "LoftQ initialisation of LoRA",
    "LoraGAConfig": "LoRA-GA initialisation",
    "LoraRuntimeConfig": "LoRA runtime options (ephemeral GPU offload)",
    "MontecloraConfig": "MonteCLoRA (LoRA variant)",
    "VeloraConfig": "VeLoRA (LoRA variant)",
}
UNSUPPORTED_FUNCTIONS: dict[str, str] = {
    "bloom_model_postprocess_past_key_value": "BLOOM's prefix-cache layout",
    "compose_cartridge_adapters": "the Cartridge method",
    "convert_to_lora": "converting other adapters to LoRA",
    "create_arrow_model": "LoRA Arrow routing",
    "find_kappa_target_modules": "kappa-based target selection",
    "get_eva_state_dict": "EVA initialisation of LoRA",
    "initialize_kv_prefix_from_past_key_values": "the Cartridge method",
    "initialize_kv_prefix_from_text": "the Cartridge method",
    "initialize_lora_eva_weights": "EVA initialisation of LoRA",
    "preprocess_loraga": "LoRA-GA initialisation",
    "prompt_embeddings_from_past_key_values": "the Cartridge method",
    "replace_lora_weights_loftq": "LoftQ initialisation of LoRA",
    "save_as_lora": "converting other adapters to LoRA",
}


class MultitaskPromptTuningInit(enum.StrEnum):
    """PEFT's enum for multitask prompt tuning (a method peftkit does not ship; the names resolve)."""

    TEXT = "TEXT"
    RANDOM = "RANDOM"
    AVERAGE_SOURCE_TASKS = "AVERAGE_SOURCE_TASKS"
    EXACT_SOURCE_TASK = "EXACT_SOURCE_TASK"
    ONLY_SOURCE_SHARED = "ONLY_SOURCE_SHARED"


def _build() -> dict[str, Any]:
    names: dict[str, Any] = {}
    for peft_type, exported in UNSUPPORTED_METHODS.items():
        for name in exported:
            names[name] = unsupported_class(name, f"the {peft_type} method")
    for name, what in UNSUPPORTED_FEATURES.items():
        names[name] = unsupported_class(name, what)
    for name, what in UNSUPPORTED_FUNCTIONS.items():
        names[name] = unsupported_function(name, what)
    return names


PLACEHOLDERS: dict[str, Any] = _build()
globals().update(PLACEHOLDERS)
