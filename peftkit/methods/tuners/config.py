"""Config fields every weight adapter shares (targeting and ``modules_to_save``), with PEFT's names.

Each method's config subclasses :class:`TunerConfig` (or :class:`LayeredTunerConfig` when PEFT's
config also has ``layers_to_transform`` / ``layers_pattern``) and declares exactly PEFT's other
fields, so the ``adapter_config.json`` files of both libraries carry the same keys.
"""

from __future__ import annotations

from typing import Any

from pydantic import field_validator, model_validator

from peftkit.config import PeftConfig


def module_names(value: Any, field: str) -> Any:
    """Accept a list/tuple/set of names (sets are sorted, as PEFT writes them) or a regex string."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, set | frozenset | tuple | list):
        items = sorted(value) if isinstance(value, set | frozenset) else list(value)
        if not all(isinstance(v, str) for v in items):
            raise ValueError(f"{field} must hold module names (strings), got {value!r}")
        return items
    raise ValueError(f"{field} must be a list of module names or a regex string, got {value!r}")


class TunerConfig(PeftConfig):
    """Targeting fields shared by the weight adapters (PEFT's names and meaning)."""

    target_modules: list[str] | str | None = None
    """Modules to adapt: names (a module matches if its path ends with ``.name``), a regex matched
    against the whole path, ``"all-linear"`` (every Linear/Conv1D but the output head), or ``None``
    for the method's default for the model type."""
    exclude_modules: list[str] | str | None = None
    """Modules never adapted, matched like ``target_modules``."""
    modules_to_save: list[str] | None = None
    """Modules (e.g. ``lm_head``) trained in full as a copy beside the frozen original and saved whole."""

    @field_validator("target_modules", "exclude_modules", "modules_to_save", mode="before")
    @classmethod
    def _module_names(cls, value: Any, info: Any) -> Any:
        value = module_names(value, info.field_name)
        if info.field_name == "modules_to_save" and isinstance(value, str):
            return [value]
        return value


class LayeredTunerConfig(TunerConfig):
    """Adds PEFT's layer selection: adapt only some decoder layers."""

    layers_to_transform: list[int] | int | None = None
    """Decoder-layer indices to adapt (``None``: all). Needs list-form ``target_modules``."""
    layers_pattern: list[str] | str | None = None
    """Name of the module list holding the decoder layers (e.g. ``"layers"``, ``"h"``); the layer index is
    the number after it. ``None``: the first numbered path segment."""

    @field_validator("layers_to_transform")
    @classmethod
    def _non_negative_layers(cls, value: Any) -> Any:
        indices = [value] if isinstance(value, int) else value or []
        if any(i < 0 for i in indices):
            raise ValueError(f"layers_to_transform must hold layer indices >= 0, got {value!r}")
        return value

    @model_validator(mode="after")
    def _layers_need_name_targets(self) -> LayeredTunerConfig:
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError(
                f"layers_to_transform={self.layers_to_transform!r} cannot be combined with a regex "
                f"target_modules={self.target_modules!r}; list module names instead, or encode the layers in the regex"
            )
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError(f"layers_pattern={self.layers_pattern!r} needs layers_to_transform to be set")
        return self


def check_bias(value: str, only: str) -> str:
    """Validate PEFT's ``bias`` field: ``"none"``, ``"all"`` or ``only`` (e.g. ``"lora_only"``)."""
    allowed = ("none", "all", only)
    if value not in allowed:
        raise ValueError(f"bias={value!r} is not supported; use one of {list(allowed)}")
    return value


def check_positive(value: int | float, field: str, allow_zero: bool = False) -> Any:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{field} must be {bound}, got {value}")
    return value


def check_probability(value: float, field: str) -> float:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{field} must be in [0, 1), got {value}")
    return value
