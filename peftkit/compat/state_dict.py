"""PEFT's state-dict helpers: adapter tensors in file layout, base tensors under their original keys.

- :func:`get_peft_model_state_dict` / :func:`set_peft_model_state_dict`: an adapter's tensors keyed as in
  ``adapter_model.safetensors`` (``base_model.model.<path>.lora_A.weight``, ``prompt_embeddings``, ...).
  Loading is strict: a missing, unexpected or mis-shaped key raises (PEFT warns and leaves the adapter
  at its initial values).
- :func:`get_base_model_state_dict` / :func:`set_base_model_state_dict`: the base model's own tensors
  under the keys it had before adapters were placed in it (``q_proj.weight``, not
  ``q_proj.base_layer.weight``), adapter tensors left out.
- :func:`load_peft_weights`: an adapter folder's safetensors file as a dict (never a pickle).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.nn.modules.module import _IncompatibleKeys

from peftkit.config import WEIGHTS_NAME
from peftkit.methods.tuners.layer import AdaptedLayer
from peftkit.models.peft_model import PeftModel


def get_peft_model_state_dict(
    model: PeftModel,
    state_dict: dict[str, Tensor] | None = None,
    adapter_name: str = "default",
    unwrap_compiled: bool = False,
    save_embedding_layers: bool | str = "auto",
) -> dict[str, Tensor]:
    """The adapter's tensors, keyed as in PEFT's ``adapter_model.safetensors``.

    ``state_dict`` (a full ``model.state_dict()``) is not needed: the adapter knows its tensors; it is
    accepted for PEFT compatibility only when ``None``.
    """
    if state_dict is not None or save_embedding_layers is True or unwrap_compiled:
        raise NotImplementedError("state_dict=, save_embedding_layers=True and unwrap_compiled=True are not supported")
    model._check_names([adapter_name])
    return model.adapters[adapter_name].adapter_state_dict()


def set_peft_model_state_dict(
    model: PeftModel,
    peft_model_state_dict: dict[str, Tensor],
    adapter_name: str = "default",
    ignore_mismatched_sizes: bool = False,
    low_cpu_mem_usage: bool = False,
) -> _IncompatibleKeys:
    """Load PEFT-layout tensors into the adapter; every key must fit (else an error names the keys)."""
    if ignore_mismatched_sizes:
        raise NotImplementedError("ignore_mismatched_sizes=True is not supported: a mis-shaped tensor is an error")
    model._check_names([adapter_name])
    adapter = model.adapters[adapter_name]
    adapter.load_adapter_state_dict(dict(peft_model_state_dict), trainable=not adapter.is_frozen)
    return _IncompatibleKeys(missing_keys=[], unexpected_keys=[])


def _adapted_layers(model: nn.Module) -> dict[str, AdaptedLayer]:
    return {path: m for path, m in model.named_modules() if isinstance(m, AdaptedLayer)}


def _original_key(key: str, layers: dict[str, AdaptedLayer]) -> str | None:
    """The base model's own key for a live key, ``None`` for an adapter tensor."""
    for path, layer in layers.items():
        prefix = f"{path}." if path else ""
        if not key.startswith(prefix):
            continue
        slot = key[len(prefix) :].split(".", 1)[0]
        if slot != "base_layer":
            return None if slot in layer._modules else key
        return prefix + key[len(prefix) + len("base_layer.") :]
    return key


def get_base_model_state_dict(model: PeftModel) -> dict[str, Tensor]:
    """The base model's tensors under their original keys (adapter tensors left out)."""
    base = model.get_base_model()
    layers = dict(sorted(_adapted_layers(base).items(), key=lambda item: -len(item[0])))  # innermost first
    result: dict[str, Tensor] = {}
    for key, value in base.state_dict().items():
        original = _original_key(key, layers)
        if original is not None:
            result[original] = value
    return result


def set_base_model_state_dict(
    model: PeftModel, state_dict: dict[str, Tensor], strict: bool = True
) -> _IncompatibleKeys:
    """Load base tensors given under their original keys into the adapted model."""
    base = model.get_base_model()
    layers = dict(sorted(_adapted_layers(base).items(), key=lambda item: -len(item[0])))
    live = {original: key for key in base.state_dict() if (original := _original_key(key, layers)) is not None}
    missing = sorted(set(live) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(live))
    if strict and (missing or unexpected):
        raise RuntimeError(
            f"base state dict does not fit: missing keys {missing[:4]}, unexpected keys {unexpected[:4]}"
        )
    base.load_state_dict({live[k]: v for k, v in state_dict.items() if k in live}, strict=False)
    return _IncompatibleKeys(missing_keys=missing, unexpected_keys=unexpected)


def load_peft_weights(
    model_id: str | Path, device: str | None = None, key_mapping: dict[str, str] | None = None, **kwargs: Any
) -> dict[str, Tensor]:
    """Read ``adapter_model.safetensors`` from a local adapter folder (pickle files are never loaded)."""
    if kwargs or key_mapping:
        raise TypeError(
            f"load_peft_weights() got options peftkit does not support: {sorted(kwargs) or ['key_mapping']}"
        )
    folder = Path(model_id)
    path = folder / WEIGHTS_NAME
    if not path.is_file():
        legacy = [p.name for p in folder.glob("adapter_model.*")]
        hint = f" (found {legacy}: peftkit never loads pickle files)" if legacy else ""
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {folder}{hint}")
    return load_file(path, device=device or ("cuda" if torch.cuda.is_available() else "cpu"))
