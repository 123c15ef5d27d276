"""Checkpoints: the whole training state, written atomically, never pickled.

A checkpoint is a folder ``<output_dir>/checkpoints/step-000120/``::

    adapter/                     the adapters in PEFT's format (adapter_config.json + safetensors),
                                 loadable by peftkit and by PEFT
    training_state.safetensors   every trainable tensor (param/<name>), the optimiser's tensors
                                 (optim/<index>/<key>), each process's torch RNG state, and any
                                 adapter training-only tensors (adapter/<name>/<key>)
    training_state.json          step counters, data position, scheduler, optimiser hyper-parameters,
                                 python/numpy RNG states, callback states, parameter names
    config.yaml                  the resolved run configuration

It is assembled in a hidden temporary folder beside the others (``.tmp-step-000120-<pid>``), each
file flushed to disk, and renamed into place in one step: a reader (or a resumed run) sees either
the complete checkpoint or none. A run killed at any moment leaves the previous checkpoints intact.

Tensors go to safetensors and everything else to JSON: loading a checkpoint executes no code
(no ``torch.load``, no pickle).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

STATE_TENSORS = "training_state.safetensors"
STATE_JSON = "training_state.json"
CONFIG_FILE = "config.yaml"
ADAPTER_DIR = "adapter"
FORMAT_VERSION = 1
_NAME = re.compile(r"^step-(\d+)$")


# ---------------------------------------------------------------------- random number generators
def capture_rng() -> tuple[dict[str, Any], dict[str, Tensor]]:
    """This process's RNG states: python and numpy as JSON, torch (CPU, CUDA) as tensors."""
    version, internal, gauss = random.getstate()
    states: dict[str, Any] = {"python": [version, list(internal), gauss]}
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        states["numpy"] = [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    except ImportError:  # pragma: no cover - numpy ships with torch
        pass
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = state
    return states, tensors


def restore_rng(states: dict[str, Any], tensors: dict[str, Tensor]) -> None:
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if "numpy" in states:
        import numpy as np

        kind, keys, pos, has_gauss, cached = states["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


# ---------------------------------------------------------------------- optimiser state
def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Split ``optimizer.state_dict()`` into JSON (hyper-parameters, scalars) and tensors."""
    full = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in full["state"].items():
        for key, value in entry.items():
            if isinstance(value, Tensor):
                tensors[f"optim/{index}/{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in full["param_groups"]]
    return {"param_groups": groups, "scalars": scalars}, tensors


def load_optimizer_state(optimizer: torch.optim.Optimizer, meta: dict[str, Any], tensors: dict[str, Tensor]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            _, index, name = key.split("/", 2)
            state.setdefault(int(index), {})[name] = value
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# ---------------------------------------------------------------------- writing and reading
@dataclass
class Checkpoint:
    """A checkpoint read back: its folder, JSON state and tensors."""

    path: Path
    meta: dict[str, Any]
    tensors: dict[str, Tensor]

    @property
    def step(self) -> int:
        return int(self.meta["trainer"]["step"])


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def write_checkpoint(
    root: Path,
    step: int,
    *,
    model: Any,
    meta: dict[str, Any],
    tensors: dict[str, Tensor],
    config_text: str | None,
    keep: int | None = None,
) -> Path:
    """Write ``root/step-NNNNNN`` atomically; then delete all but the newest ``keep`` checkpoints."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        model.save_pretrained(tmp / ADAPTER_DIR)
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / STATE_TENSORS))
        (tmp / STATE_JSON).write_text(json.dumps({"format": FORMAT_VERSION, **meta}, indent=1) + "\n")
        if config_text is not None:
            (tmp / CONFIG_FILE).write_text(config_text)
        _sync_tree(tmp)
        if final.exists():  # the same step written again (e.g. a run resumed from it): swap it out
            old = root / f".old-{final.name}-{os.getpid()}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
        _sync_dir(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if keep is not None:
        for old_step in list_checkpoints(root)[:-keep]:
            shutil.rmtree(root / checkpoint_name(old_step), ignore_errors=True)
    return final


def read_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    for name in (STATE_JSON, STATE_TENSORS):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path} is not a complete checkpoint: {name} is missing")
    meta = json.loads((path / STATE_JSON).read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format {meta.get('format')!r}, this peftkit reads {FORMAT_VERSION}")
    return Checkpoint(path, meta, load_file(str(path / STATE_TENSORS)))


def list_checkpoints(root: Path) -> list[int]:
    """Steps of the complete checkpoints under ``root``, oldest first (temporary folders are skipped)."""
    if not root.is_dir():
        return []
    steps = []
    for child in root.iterdir():
        match = _NAME.match(child.name)
        if match and (child / STATE_JSON).is_file():
            steps.append(int(match.group(1)))
    return sorted(steps)


def latest_checkpoint(root: Path) -> Path | None:
    steps = list_checkpoints(root)
    return root / checkpoint_name(steps[-1]) if steps else None


def remove_stale_temporaries(root: Path) -> None:
    """Delete half-written folders a killed run left behind."""
    if root.is_dir():
        for child in root.iterdir():
            if child.name.startswith((".tmp-", ".old-")):
                shutil.rmtree(child, ignore_errors=True)


def trainable_tensors(named: Sequence[tuple[str, nn.Parameter]]) -> dict[str, Tensor]:
    return {f"param/{name}": p.detach() for name, p in named}


def load_trainable_tensors(named: Sequence[tuple[str, nn.Parameter]], tensors: dict[str, Tensor]) -> None:
    saved = {k.removeprefix("param/") for k in tensors if k.startswith("param/")}
    names = {n for n, _ in named}
    if saved != names:
        raise ValueError(
            "the checkpoint's trainable tensors do not match this model's: "
            f"missing {sorted(names - saved)[:5]}, unexpected {sorted(saved - names)[:5]} "
            "(was the config's adapters section changed?)"
        )
    with torch.no_grad():
        for name, param in named:
            param.copy_(tensors[f"param/{name}"])


def _sync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    for path in [folder, *[p for p in folder.rglob("*") if p.is_dir()]]:
        _sync_dir(path)


def _sync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
