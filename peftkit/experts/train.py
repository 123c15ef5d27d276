"""``peftkit train MANIFEST``: the manifest's soft prompts and adapters, trained jointly on the training engine.

The manifest becomes an ordinary run config (``peftkit train MANIFEST --print-config`` shows it):
each soft prompt is a prompt-tuning adapter of its own name, each weight adapter keeps its name, and
all of them are active and optimised together in every step. Several soft prompts are concatenated
in manifest order before the user's tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from peftkit.experts.manifest import ExpertManifest, read_manifest_data


def looks_like_manifest(path: str | Path) -> bool:
    """Whether a YAML / JSON file is an expert manifest (it has ``base_model``) rather than a run config."""
    try:
        data = read_manifest_data(path)
    except ValueError:
        return False
    return isinstance(data, dict) and "base_model" in data


def default_output_dir(manifest: ExpertManifest) -> str:
    return f"runs/experts/{manifest.name}"


def _relative_to(value: Any, base: Path) -> Any:
    """A data source path, resolved against the manifest's folder when the file is there."""
    if isinstance(value, str) and not Path(value).is_absolute() and (base / value).exists():
        return str(base / value)
    if isinstance(value, dict) and isinstance(value.get("path"), str):
        return {**value, "path": _relative_to(value["path"], base)}
    return value


def run_config_data(manifest: ExpertManifest, base_dir: Path, resolve: bool = False) -> dict[str, Any]:
    """The run config (as a mapping) that trains ``manifest``; ``resolve`` fills in every default."""
    if manifest.training is None:
        raise ValueError(f"{manifest.name}: the manifest has no training section")
    training = manifest.training
    adapters = {p.name: p.peft_config(manifest.base_model.name) for p in manifest.soft_prompts}
    adapters |= {a.name: a.peft_config() for a in manifest.adapters}
    data = {k: _relative_to(v, base_dir) if k in ("train", "eval") else v for k, v in training.data.items()}
    tree = {
        "model": {"name": manifest.base_model.name},
        "adapters": adapters,
        "data": {**data, "formatter": training.formatter, "formatter_options": training.formatter_options},
        "training": training.config,
        "output_dir": training.output_dir or default_output_dir(manifest),
    }
    if resolve:
        from peftkit.training.overrides import validate_config

        return validate_config(tree).model_dump(mode="json")
    return tree


def manifest_run_config(path: str | Path, overrides: Sequence[str] = ()) -> Any:
    """The validated ``RunConfig`` for a manifest file, with ``key=value`` overrides applied."""
    from peftkit.experts.manifest import load_manifest
    from peftkit.training.overrides import apply_overrides, validate_config

    manifest = load_manifest(path)
    return validate_config(apply_overrides(run_config_data(manifest, Path(path).parent), overrides))
