"""Reading a run config: YAML file + ``key=value`` overrides → validated :class:`RunConfig`.

The file and override rules are :mod:`peftkit.config_files`' (shared with ``peftkit eval``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from peftkit.config_files import ConfigError, apply_overrides, describe_errors, parse_override, read_config_tree
from peftkit.training.config import RunConfig

__all__ = ["apply_overrides", "dump_run_config", "load_run_config", "parse_override", "read_config_tree"]


def validate_config(tree: dict[str, Any]) -> RunConfig:
    """Validate a config tree; every problem becomes one line of the :class:`ConfigError`."""
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(describe_errors(exc, model=RunConfig)) from None
    except ValueError as exc:  # raised before field validation (e.g. an import that fails)
        raise ConfigError([str(exc)]) from None


def load_run_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Read ``path``, apply ``overrides``, validate."""
    return validate_config(apply_overrides(read_config_tree(path), overrides))


def dump_run_config(config: RunConfig) -> str:
    """The resolved config (every default filled in) as YAML; reading it back gives the same config."""
    tree = config.model_dump(mode="json")
    tree["loss"] = [{"name": c.name, "weight": c.weight, **c.options} for c in config.loss]
    tree["callbacks"] = [{"name": c.name, **c.options} for c in config.callbacks]
    return yaml.safe_dump(tree, sort_keys=False, default_flow_style=False, allow_unicode=True)
