"""Adapter folders in Hugging Face PEFT's layout: ``adapter_config.json`` + ``adapter_model.safetensors``.

The adapter named ``default`` is written at the top of the folder, every other one in a subfolder
of its name (as PEFT does). Weights are safetensors only: a folder holding only a pickle
(``adapter_model.bin``) is refused with an error that says so, never loaded.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file

from peftkit.config import CONFIG_NAME, WEIGHTS_NAME
from peftkit.io import atomic_save_safetensors

if TYPE_CHECKING:
    from peftkit.methods.base import Adapter
    from peftkit.models.peft_model import PeftModel


def save_adapters(model: PeftModel, save_directory: str | Path, names: Sequence[str]) -> None:
    """Write each named adapter's config and weights (configs saved with ``inference_mode=True``)."""
    root = Path(save_directory)
    if root.is_file():
        raise ValueError(f"{root} is a file, expected a directory")
    for name in names:
        folder = root if name == "default" else root / name
        folder.mkdir(parents=True, exist_ok=True)
        config = model.peft_config[name].model_copy(update={"inference_mode": True})
        if config.base_model_name_or_path is None:
            base_name = getattr(getattr(model.base_model, "config", None), "name_or_path", None) or None
            config = config.model_copy(update={"base_model_name_or_path": base_name})
        atomic_save_safetensors(model.adapters[name].adapter_state_dict(), folder / WEIGHTS_NAME)
        config.save_pretrained(folder)


def load_adapter_weights(adapter: Adapter, folder: str | Path, *, trainable: bool, device: torch.device) -> None:
    """Load ``folder``'s safetensors weights into ``adapter``; freeze it unless ``trainable``."""
    folder = Path(folder)
    path = folder / WEIGHTS_NAME
    if not path.is_file():
        legacy = [p.name for p in folder.glob("adapter_model.*")]
        hint = f" (found {legacy}: peftkit never loads pickle files)" if legacy else ""
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {folder}{hint}")
    if not (folder / CONFIG_NAME).is_file():
        warnings.warn(f"no {CONFIG_NAME} beside {path}", UserWarning, stacklevel=4)
    adapter.load_adapter_state_dict(load_file(path, device=str(device)), trainable=trainable)
    if trainable:
        adapter.unfreeze()
    else:
        adapter.freeze()
