"""Reading YAML configs: the file, ``key=value`` overrides, and error messages that name the field.

Shared by ``peftkit train`` (:mod:`peftkit.training.overrides`) and ``peftkit eval``
(:mod:`peftkit.evaluation.run`), so neither package imports the other for it.

Overrides use dotted paths into the YAML tree; list items are addressed by index::

    peftkit train run.yaml training.lr=3e-3 adapters.default.num_virtual_tokens=10 callbacks.0.patience=5

Values are parsed as YAML scalars (``3e-3`` is a float, ``true`` a bool, ``null`` None, ``[a, b]``
a list); quote a value to keep it a string (``output_dir='"001"'``). YAML files are read with the
same rules, so ``lr: 1e-3`` is a float even though YAML 1.1 would read it as a string.

:func:`describe_errors` turns a pydantic ``ValidationError`` into one line per problem, each naming
the field path, the value given and what is allowed::

    training.lr = -1: Input should be greater than 0
    training.lrr: unknown field; known fields here: adam_beta1, adam_beta2, ...
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError


class ConfigError(ValueError):
    """An invalid configuration; ``problems`` holds one line per invalid field."""

    kind = "training"

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(f"invalid {self.kind} config:\n  " + "\n  ".join(problems))


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


class _Loader(yaml.SafeLoader):
    """Safe YAML with YAML 1.2 floats (``1e-3`` without a dot is a float)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: builds no objects


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"training.lr=3e-3"`` → ``(["training", "lr"], 0.003)``."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError([f"override {item!r} must look like key=value (e.g. training.lr=3e-3)"])
    path = key.strip().split(".")
    if any(not part for part in path):
        raise ConfigError([f"override {item!r} has an empty key part"])
    try:
        value = parse_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError([f"override {key}: cannot parse {raw!r} as a YAML value ({exc.problem})"]) from None
    return path, value


def apply_overrides(tree: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Set each ``key=value`` in ``tree`` (in place; missing mappings are created) and return it."""
    for item in overrides:
        path, value = parse_override(item)
        node: Any = tree
        for depth, part in enumerate(path[:-1]):
            node = _child(node, part, path[: depth + 1], create=True)
        last = path[-1]
        if isinstance(node, list):
            index = _index(node, last, path)
            node[index] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise ConfigError([f"override {'.'.join(path)}: {'.'.join(path[:-1])} is {node!r}, not a mapping"])
    return tree


def _child(node: Any, part: str, path: list[str], create: bool) -> Any:
    if isinstance(node, list):
        return node[_index(node, part, path)]
    if not isinstance(node, dict):
        raise ConfigError([f"override {'.'.join(path)}: {'.'.join(path[:-1])} is {node!r}, not a mapping"])
    if node.get(part) is None and create:
        node[part] = {}
    elif isinstance(node.get(part), str) and create:
        # a shorthand string (``loss: cross_entropy``, ``train: data.jsonl``) becomes a mapping to extend
        node[part] = _expand_shorthand(path, node[part])
    return node[part]


def _expand_shorthand(path: list[str], value: str) -> Any:
    if path[-1] == "loss":
        return [{"name": value}]
    from peftkit.data.sources import known_datasets

    return {"builtin": value} if value in known_datasets() else {"path": value}


def _index(node: list, part: str, path: list[str]) -> int:
    if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
        raise ConfigError([f"override {'.'.join(path)}: {part!r} is not an index of a list of {len(node)} items"])
    return int(part)


def read_config_tree(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"config file {path} does not exist"])
    try:
        tree = parse_yaml(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path} is not valid YAML: {exc}"]) from None
    if not isinstance(tree, dict):
        raise ConfigError([f"{path} must hold a mapping of sections (model, adapters, data, training, ...)"])
    return tree
