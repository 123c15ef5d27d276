"""The method registry: ``peft_type`` → config class → adapter class.

Each method registers itself in one line from its package ``__init__``::

    register_method(PromptTuningConfig, PromptTuning)

An adapter class provides ``create(base_model, config, adapter_name, **context)`` returning an
object that follows :class:`~peftkit.methods.base.Adapter`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from peftkit.config import PeftConfig

_CONFIGS: dict[str, type[PeftConfig]] = {}
_ADAPTERS: dict[str, type[Any]] = {}


def register_method(config_cls: type[PeftConfig], adapter_cls: type[Any]) -> None:
    """Register a method under its config's ``peft_type``."""
    peft_type = config_cls.model_fields["peft_type"].default
    if not peft_type:
        raise ValueError(f"{config_cls.__name__} must give peft_type a default")
    if peft_type in _CONFIGS and _CONFIGS[peft_type] is not config_cls:
        raise ValueError(f"peft_type {peft_type!r} is already registered by {_CONFIGS[peft_type].__name__}")
    _CONFIGS[peft_type] = config_cls
    _ADAPTERS[peft_type] = adapter_cls


def known_methods() -> list[str]:
    """Registered ``peft_type`` names."""
    _ensure_builtin_methods()
    return sorted(_CONFIGS)


def config_class_for(peft_type: str) -> type[PeftConfig]:
    _ensure_builtin_methods()
    key = str(getattr(peft_type, "value", peft_type)).upper()
    if key not in _CONFIGS:
        from peftkit.config import PeftType

        if key in PeftType.__members__:
            raise NotImplementedError(
                f"peft_type {key!r} is a PEFT method that peftkit does not implement; "
                f"peftkit ships: {', '.join(sorted(_CONFIGS))}"
            )
        raise ValueError(f"unknown peft_type {peft_type!r}; known methods: {', '.join(sorted(_CONFIGS))}")
    return _CONFIGS[key]


def adapter_class_for(config: PeftConfig) -> type[Any]:
    _ensure_builtin_methods()
    if config.peft_type not in _ADAPTERS:
        raise ValueError(f"unknown peft_type {config.peft_type!r}; known methods: {', '.join(sorted(_ADAPTERS))}")
    return _ADAPTERS[config.peft_type]


def _ensure_builtin_methods() -> None:
    import peftkit.methods  # noqa: F401  (each method package registers itself on import)
