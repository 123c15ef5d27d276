"""Building blocks of the YAML configs (``peftkit train``, ``peftkit eval``).

Kept outside ``peftkit.training`` and ``peftkit.evaluation`` so that either package can use them
without importing the other.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


def import_user_module(name: str) -> None:
    """Import ``name``: a dotted module, or a path to a ``.py`` file (loaded once per process)."""
    if name.endswith(".py"):
        path = Path(name).resolve()
        if not path.is_file():
            raise ValueError(f"imports: {name} does not exist")
        module_name = f"peftkit_user_{path.stem}_{abs(hash(str(path))) % 10**8}"
        if module_name in sys.modules:
            return
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise ValueError(f"imports: cannot load {name}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
        return
    try:
        importlib.import_module(name)
    except ImportError as exc:
        raise ValueError(f"imports: cannot import {name!r} ({exc})") from None


class Section(BaseModel):
    """A config section: unknown keys are errors, and each field's docstring documents it."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


class ImportsUserCode(Section):
    """A whole config file (``peftkit train`` / ``peftkit eval``) whose ``imports`` load first."""

    imports: list[str] = Field(default_factory=list)
    """Python modules (``my_pkg.formatters``) or ``.py`` files imported before the rest of the config is
    read: where your own formatters, losses, metrics, parsers, callbacks and gradient hooks register."""

    @model_validator(mode="before")
    @classmethod
    def _import_user_code(cls, value: Any) -> Any:
        if isinstance(value, dict):
            for name in value.get("imports") or []:
                import_user_module(str(name))
        return value
