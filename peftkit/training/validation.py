"""Config error messages, shared by the run config and its loader.

:func:`describe_errors` turns a pydantic ``ValidationError`` into one line per problem, each naming
the field path, the value given and what is allowed::

    training.lr = -1: Input should be greater than 0
    training.lrr: unknown field; known fields here: adam_beta1, adam_beta2, ...
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError


class ConfigError(ValueError):
    """An invalid run configuration; ``problems`` holds one line per invalid field."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid training config:\n  " + "\n  ".join(problems))


def describe_errors(exc: ValidationError, prefix: str = "", model: type[BaseModel] | None = None) -> list[str]:
    """One line per pydantic error: ``field.path = value: what is allowed``."""
    lines = []
    for error in exc.errors():
        loc = [str(part) for part in error["loc"] if not _is_internal(part)]
        path = ".".join([prefix, *loc] if prefix else loc) or "(config)"
        message = error["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
        if error["type"] == "extra_forbidden":
            known = _fields_at(model, loc[:-1]) if model else []
            hint = f"; known fields here: {', '.join(known)}" if known else ""
            lines.append(f"{path}: unknown field{hint}")
        elif error["type"] == "missing":
            lines.append(f"{path}: required field is missing")
        elif error["type"] == "value_error" and loc and message.startswith(tuple(f"{p}." for p in loc[:1])):
            lines.append(message)
        else:
            value = error.get("input")
            shown = f" = {value!r}" if not isinstance(value, dict) and value is not None else ""
            lines.append(f"{path}{shown}: {message}")
    return lines


def _is_internal(part: Any) -> bool:
    return isinstance(part, str) and ("[" in part or part in ("function-after", "function-before"))


def _fields_at(model: type[BaseModel] | None, loc: list[str]) -> list[str]:
    """Field names of the nested model reached by following ``loc`` from ``model``."""
    current: Any = model
    for part in loc:
        if current is None or not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        info = current.model_fields.get(part)
        if info is None:
            return []
        current = _model_in(info.annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return sorted(current.model_fields)
    return []


def _model_in(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_in(arg)
        if found is not None:
            return found
    return None
