"""Bank folders and PEFT interop: export one expert, build a bank from many PEFT folders.

A bank is saved like any adapter (``PeftModel.save_pretrained``): ``adapter_config.json`` carries
the ordered index (``expert_ids``) and ``adapter_model.safetensors`` one tensor,
``prompt_embeddings`` ``(N, n_virtual, W)``. It loads back with ``PeftModel.from_pretrained`` /
``load_adapter``: one file read, whatever N. Each expert also exports to a standard PEFT
prompt-tuning or prefix-tuning folder (``prompt_embeddings`` ``(n_virtual, W)``, no
``expert_ids``) that Hugging Face PEFT loads, and :func:`bank_from_folders` gathers many such
folders (written by PEFT or by peftkit) into one bank.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open

from peftkit.config import WEIGHTS_NAME, PeftConfig
from peftkit.experts.bank import ExpertBank
from peftkit.io import atomic_save_safetensors

if TYPE_CHECKING:
    from peftkit.models.peft_model import PeftModel

#: Config fields that must agree between the folders of one bank (the table's geometry).
GEOMETRY_FIELDS = ("peft_type", "num_virtual_tokens", "token_dim", "num_layers", "num_attention_heads")


def bank_adapter(model: PeftModel, adapter_name: str) -> ExpertBank:
    """The bank adapter ``adapter_name`` of ``model``, with an error naming what it is otherwise."""
    if adapter_name not in model.adapters:
        raise ValueError(f"unknown adapter {adapter_name!r}; this model has {sorted(model.adapters)}")
    adapter = model.adapters[adapter_name]
    if not isinstance(adapter, ExpertBank):
        raise TypeError(f"adapter {adapter_name!r} ({type(adapter).__name__}) is not an expert bank")
    return adapter


def export_expert(model: PeftModel, adapter_name: str, expert: str | int, save_directory: str | Path) -> Path:
    """Write one expert of a bank as a standard PEFT adapter folder; returns the folder.

    The folder holds ``adapter_config.json`` (the bank's config without ``expert_ids``) and
    ``adapter_model.safetensors`` with ``prompt_embeddings`` ``(n_virtual, W)``: Hugging Face PEFT
    loads it with ``PeftModel.from_pretrained`` and computes what the bank computes for that expert.
    """
    adapter = bank_adapter(model, adapter_name)
    folder = Path(save_directory)
    if folder.is_file():
        raise ValueError(f"{folder} is a file, expected a directory")
    state = adapter.expert_state_dict(expert)
    config = model.peft_config[adapter_name].model_copy(update={"expert_ids": None, "inference_mode": True})
    if config.base_model_name_or_path is None:
        base_name = getattr(model.base_model.config, "name_or_path", None) or None
        config = config.model_copy(update={"base_model_name_or_path": base_name})
    atomic_save_safetensors(state, folder / WEIGHTS_NAME)
    config.save_pretrained(folder)
    return folder


def bank_from_folders(
    model: PeftModel,
    adapter_name: str,
    folders: Mapping[str, str | Path] | Sequence[str | Path],
    *,
    is_trainable: bool = False,
) -> ExpertBank:
    """Add a bank ``adapter_name`` to ``model`` with one expert per single-adapter folder.

    Args:
        folders: expert id → folder, or folders (each id is then the folder's name). Every folder is a
            prompt-tuning or prefix-tuning adapter of the same geometry (PEFT's or peftkit's).
        is_trainable: keep the bank trainable (otherwise frozen, as ``from_pretrained`` does).

    Returns:
        The new bank (not activated: route rows to it with ``experts=``).
    """
    if isinstance(folders, Mapping):
        items = [(str(i), Path(f)) for i, f in folders.items()]
    else:
        items = [(Path(f).name, Path(f)) for f in folders]
    if not items:
        raise ValueError("bank_from_folders needs at least one folder")
    configs = [PeftConfig.from_pretrained(folder) for _, folder in items]
    first = configs[0]
    if not first.is_prompt_learning:
        raise ValueError(f"{items[0][1]}: a bank holds soft prompts, not {first.peft_type}")
    for (_, folder), config in zip(items, configs, strict=True):
        if getattr(config, "expert_ids", None) is not None:
            raise ValueError(f"{folder} is a bank itself ({len(config.expert_ids)} experts), not a single expert")
        for field in GEOMETRY_FIELDS:
            if getattr(config, field, None) != getattr(first, field, None):
                raise ValueError(
                    f"{folder}: {field}={getattr(config, field, None)!r} differs from {items[0][1]}'s "
                    f"{getattr(first, field, None)!r}; every expert of a bank has the same shape"
                )
    update = {"expert_ids": [i for i, _ in items], "inference_mode": not is_trainable}
    if getattr(first, "prefix_projection", False):  # PEFT saved the projection's output: a plain prefix
        update["prefix_projection"] = False
    config = first.model_copy(update=update)
    device = next(iter(model.base_model.parameters())).device
    tensors = [_prompt_embeddings(folder, device) for _, folder in items]
    adapter = model.add_adapter(adapter_name, config, initialize=False)
    try:
        bank = bank_adapter(model, adapter_name)
        expected = tuple(bank.table.shape[1:])
        for (_, folder), tensor in zip(items, tensors, strict=True):
            if tuple(tensor.shape) != expected:
                raise ValueError(f"{folder}: prompt_embeddings has shape {tuple(tensor.shape)}, expected {expected}")
        with torch.no_grad():
            bank.table.copy_(torch.stack(tensors))
    except Exception:
        model.delete_adapter(adapter_name)
        raise
    if is_trainable:
        adapter.unfreeze()
    else:
        adapter.freeze()
    return bank


def _prompt_embeddings(folder: Path, device: torch.device) -> torch.Tensor:
    path = folder / WEIGHTS_NAME
    if not path.is_file():
        legacy = [p.name for p in folder.glob("adapter_model.*")]
        hint = f" (found {legacy}: peftkit never loads pickle files)" if legacy else ""
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {folder}{hint}")
    with safe_open(str(path), framework="pt", device=str(device)) as file:
        if "prompt_embeddings" not in file.keys():  # noqa: SIM118 - safe_open has no __contains__
            raise KeyError(f"{path} has no 'prompt_embeddings' (found {sorted(file.keys())[:8]})")
        extra = [k for k in file.keys() if k != "prompt_embeddings"]  # noqa: SIM118
        if extra:
            raise ValueError(
                f"{path} holds more than a prompt ({extra[:4]}): prompt encoders (p-tuning, prefix projection) "
                "cannot join a bank"
            )
        return file.get_tensor("prompt_embeddings")
