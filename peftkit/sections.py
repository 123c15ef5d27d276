"""Building blocks of the YAML configs (``peftkit train``, ``peftkit eval``).

Kept outside ``peftkit.training`` and ``peftkit.evaluation`` so that either package can use them
without importing the other.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


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


class ModelConfig(Section):
    """The frozen base model."""

    name: str = "smollm2-135m-instruct"
    """Embedded alias (``peftkit models list``) or a local Hugging Face model folder."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Dtype of the frozen base model's weights. Adapters create their own (the soft-prompt methods
    keep theirs in float32)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about 30% more compute."""
    device: str = "auto"
    """Where the model runs: ``auto`` (the GPU when there is one; under ``torchrun`` each process's
    own), ``cpu``, ``cuda`` or ``cuda:N``. Asking for a GPU that is not there is an error."""

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        from peftkit.device import check_device_setting

        return check_device_setting(value)


class SourceConfig(Section):
    """One data source: exactly one of ``path``, ``builtin`` or ``records``.

    A plain string is read as a built-in dataset name if there is one, else as a path.
    """

    path: str | None = None
    """A JSONL, CSV or Parquet file (``.gz`` / ``.bz2`` compressed JSONL and CSV too)."""
    format: Literal["jsonl", "csv", "parquet"] | None = None
    """File format; by default inferred from the file name."""
    builtin: str | None = None
    """A built-in dataset (``rotten_tomatoes``)."""
    options: dict[str, Any] = Field(default_factory=dict)
    """Options of the built-in dataset, e.g. ``{split: test, test_size: 400, seed: 0}``."""
    records: list[dict[str, Any]] | None = None
    """Records written inline in the config."""
    streaming: bool = False
    """Read the file lazily, a window at a time, instead of tokenising it all up front (needs
    ``training.max_steps``: the length of a stream is unknown until it has been read)."""
    limit: int | None = Field(None, ge=1)
    """Use only the first ``limit`` records."""

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        if isinstance(value, str):
            from peftkit.data.sources import known_datasets

            return {"builtin": value} if value in known_datasets() else {"path": value}
        return value

    @model_validator(mode="after")
    def _exactly_one(self) -> SourceConfig:
        given = [k for k in ("path", "builtin", "records") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of path, builtin or records (got {given or 'none'})")
        if self.builtin is not None:
            from peftkit.data.sources import check_dataset_options

            check_dataset_options(self.builtin, self.options)
        if self.streaming and self.path is None:
            raise ValueError("streaming=true applies to files (path) only")
        if self.options and self.builtin is None:
            raise ValueError("options apply to built-in datasets only")
        return self
