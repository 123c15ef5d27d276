"""Safe, atomic file writing. Weights are safetensors only; nothing here reads pickle."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import Tensor


def atomic_save_safetensors(
    tensors: dict[str, Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    """Write ``tensors`` to ``path`` via a temporary file and a rename, so a reader never sees half a file."""
    path = Path(path)
    data = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with _temporary_beside(path) as tmp:
        save_file(data, str(tmp), metadata={"format": "pt", **(metadata or {})})


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    with _temporary_beside(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def _temporary_beside(target: Path) -> Iterator[Path]:
    """Yield a temp path in ``target``'s folder; rename it over ``target`` if the block succeeds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
