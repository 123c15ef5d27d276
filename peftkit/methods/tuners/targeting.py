"""Which modules of a base model a weight adapter wraps, matched exactly as Hugging Face PEFT does.

``target_modules`` may be:

- a list of names: a module matches when its path *is* the name or ends with ``"." + name``
  (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``; ``"mlp.c_proj"`` matches GPT-2's MLP
  projection but not its attention one);
- a string: a regular expression that must match the whole module path (``re.fullmatch``);
- ``"all-linear"``: every ``nn.Linear`` and GPT-2 ``Conv1D`` except the output head;
- ``None``: the method's default for the model type (PEFT's tables in :mod:`~peftkit.methods.tuners.defaults`,
  e.g. ``q_proj, v_proj`` for Llama).

``layers_to_transform`` (an index or a list) keeps only modules inside those decoder layers; the layer
index is the number after ``layers_pattern`` (or, without a pattern, the first numbered path segment).
``exclude_modules`` removes modules by the same rules as ``target_modules``. A target that matches
nothing, or a module of a type the method cannot wrap, fails with the candidate module names.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from torch import nn
from transformers.pytorch_utils import Conv1D

from peftkit.methods.tuners.defaults import DEFAULT_TARGETS

ALL_LINEAR = "all-linear"

LINEAR_TYPES = (nn.Linear, Conv1D)


def model_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def default_targets(model: nn.Module, table: str, field: str = "target_modules") -> list[str] | str:
    """PEFT's default targets for ``model``'s type (``table`` of :data:`DEFAULT_TARGETS`), or an error saying
    to set ``field``."""
    kind = model_type(model)
    targets = DEFAULT_TARGETS[table].get(kind or "")
    if targets is None:
        raise ValueError(
            f"{field} is not set and there is no default for model type {kind!r} "
            f"(PEFT's defaults cover {sorted(DEFAULT_TARGETS[table])}); pass {field} explicitly"
        )
    return targets if isinstance(targets, str) else list(targets)


def output_head_name(model: nn.Module) -> str | None:
    """Path of the vocabulary projection (excluded from ``"all-linear"``)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return None
    return next((name for name, module in model.named_modules() if module is head), None)


def matches_name(names: str | Sequence[str], path: str) -> bool:
    """PEFT's rule: a regex string must match the whole path; a list entry matches the path or its tail."""
    if isinstance(names, str):
        return re.fullmatch(names, path) is not None
    return any(path == name or path.endswith(f".{name}") for name in names)


def layer_index(path: str, layers_pattern: str | Sequence[str] | None) -> int | None:
    """The decoder-layer number in ``path`` (``model.layers.3.mlp`` → 3), found as PEFT finds it."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", path)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern)
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", path)
            if match:
                break
    return int(match.group("idx")) if match else None


def in_selected_layers(path: str, config: Any) -> bool:
    wanted = getattr(config, "layers_to_transform", None)
    if wanted is None or (isinstance(wanted, list) and not wanted):
        return True
    index = layer_index(path, getattr(config, "layers_pattern", None))
    if index is None:
        return False
    return index == wanted if isinstance(wanted, int) else index in wanted


def is_saved_module(path: str, modules_to_save: Iterable[str] | None) -> bool:
    return any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", path) for m in modules_to_save or ())


def find_targets(
    model: nn.Module,
    config: Any,
    supported: tuple[type[nn.Module], ...] = LINEAR_TYPES,
    field: str = "target_modules",
) -> list[str]:
    """Paths of the modules ``config`` targets in ``model``, in model order.

    Raises:
        ValueError: nothing matches (the message lists candidate module names), or a matched module
            has a type the method cannot wrap.
    """
    targets = getattr(config, field)
    all_linear = isinstance(targets, str) and targets.lower() == ALL_LINEAR
    head = output_head_name(model) if all_linear else None
    exclude = getattr(config, "exclude_modules", None)
    saved = getattr(config, "modules_to_save", None)
    found, unsupported = [], []
    for path, module in base_modules(model):
        if not path or is_saved_module(path, saved) or (exclude and matches_name(exclude, path)):
            continue
        if all_linear:
            hit = isinstance(module, LINEAR_TYPES) and path != head
        else:
            hit = matches_name(targets, path) and (isinstance(targets, str) or in_selected_layers(path, config))
        if not hit:
            continue
        (found if isinstance(module, supported) else unsupported).append(path)
    if unsupported:
        modules = dict(base_modules(model))
        kinds = sorted({type(modules[p]).__name__ for p in unsupported})
        raise ValueError(
            f"{field}={targets!r} matches modules this method cannot wrap: {unsupported[:6]} "
            f"(types {kinds}; supported: {[t.__name__ for t in supported]}). "
            f"Candidates: {candidate_names(model, supported)}"
        )
    if not found:
        layers = getattr(config, "layers_to_transform", None)
        where = f" in layers {layers!r}" if layers is not None else ""
        raise ValueError(
            f"{field}={targets!r} matches no module{where}. "
            f"Candidates ({'/'.join(t.__name__ for t in supported)}): {candidate_names(model, supported)}"
        )
    return found


def base_modules(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """``named_modules()`` of the base model as it was: a wrapped layer appears as its base layer, and
    the adapters' own modules inside wrappers are skipped."""
    from peftkit.methods.tuners.layer import AdaptedLayer

    if isinstance(model, AdaptedLayer):
        yield prefix, model.base_layer
        return
    yield prefix, model
    for name, child in model.named_children():
        yield from base_modules(child, f"{prefix}.{name}" if prefix else name)


def candidate_names(model: nn.Module, supported: tuple[type[nn.Module], ...] = LINEAR_TYPES) -> list[str]:
    """Distinct tails of wrappable module paths (``self_attn.q_proj``, ``mlp.c_proj``, ...): each is a
    valid ``target_modules`` entry. For error messages."""
    names: dict[str, None] = {}
    for path, module in base_modules(model):
        if path and isinstance(module, supported):
            names[".".join(path.split(".")[-2:])] = None
    return list(names)


def find_saved_modules(model: nn.Module, modules_to_save: Sequence[str] | None) -> list[str]:
    """Paths of the modules ``modules_to_save`` names (path or path tail), each kept whole."""
    if not modules_to_save:
        return []
    paths = [p for p, _ in base_modules(model) if p and any(p == m or p.endswith(f".{m}") for m in modules_to_save)]
    missing = [m for m in modules_to_save if not any(p == m or p.endswith(f".{m}") for p in paths)]
    if missing:
        tops = [p for p, _ in base_modules(model) if p and p.count(".") <= 1]
        raise ValueError(f"modules_to_save names {missing}, which match no module; top-level modules: {tops}")
    # A module inside another saved module is saved with it.
    return [p for p in paths if not any(p.startswith(f"{q}.") for q in paths)]


def pattern_value(patterns: dict[str, Any] | None, path: str, default: Any) -> Any:
    """``rank_pattern`` / ``alpha_pattern`` lookup: the first key that matches the path's tail (PEFT's rule)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default
