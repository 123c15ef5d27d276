"""Adapter folders in Hugging Face PEFT's layout: ``adapter_config.json`` + ``adapter_model.safetensors``.

The adapter named ``default`` is written at the top of the folder, every other one in a subfolder
of its name (as PEFT does). Weights are safetensors only: a folder holding only a pickle
(``adapter_model.bin``) is refused with an error that says so, never loaded.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file
from torch import nn

from peftkit.config import CONFIG_NAME, WEIGHTS_NAME, PeftConfig
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
            base_name = getattr(getattr(model.get_base_model(), "config", None), "name_or_path", None) or None
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


class PeftFiles:
    """``save_pretrained`` / ``from_pretrained`` / ``load_adapter``: a mixin of :class:`~peftkit.PeftModel`."""

    adapters: dict[str, Adapter]
    peft_config: dict[str, PeftConfig]

    def save_pretrained(
        self,
        save_directory: str | Path,
        safe_serialization: bool = True,
        selected_adapters: Sequence[str] | None = None,
        save_embedding_layers: str | bool = "auto",
        is_main_process: bool = True,
        path_initial_model_for_weight_conversion: str | None = None,
        **kwargs: Any,
    ) -> None:
        """Write each adapter as PEFT does: ``default`` at the top, others in a subfolder, plus ``README.md``.

        ``save_embedding_layers``: ``"auto"`` / ``False`` write the adapter's own tensors (the base
        embedding weights are not copied into the file); ``True`` is refused, as are
        ``path_initial_model_for_weight_conversion`` (PiSSA / OLoRA conversion) and hub options.
        """
        if save_embedding_layers is True:
            raise NotImplementedError("save_embedding_layers=True is not supported: base weights are not saved")
        if path_initial_model_for_weight_conversion is not None or kwargs:
            raise NotImplementedError(
                "path_initial_model_for_weight_conversion and hub options are not supported by save_pretrained"
            )
        if not safe_serialization:
            raise ValueError(
                "peftkit writes safetensors only: safe_serialization=False would write a pickle, which can run "
                "arbitrary code when loaded"
            )
        if not is_main_process:
            return
        names = list(selected_adapters) if selected_adapters is not None else list(self.adapters)
        self._check_names(names)
        save_adapters(self, save_directory, names)
        self.create_or_update_model_card(save_directory)

    def create_or_update_model_card(self, output_dir: str | Path) -> None:
        """Write or update ``output_dir/README.md`` with PEFT's model-card metadata (see ``model_card.py``)."""
        from peftkit.models.model_card import write_model_card

        write_model_card(self, output_dir)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | Path,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: PeftConfig | None = None,
        autocast_adapter_dtype: bool = True,
        ephemeral_gpu_offload: bool = False,
        low_cpu_mem_usage: bool = False,
        key_mapping: dict[str, str] | None = None,
        subfolder: str | None = None,
        **context: Any,
    ) -> PeftModel:
        """Load an adapter folder written by peftkit or PEFT onto ``model``.

        As in PEFT, called on ``PeftModel`` it returns the task class the config's ``task_type`` names
        (``PeftModelForSequenceClassification``, ...), and a ``config`` given is the object kept in
        ``peft_config`` (its ``inference_mode`` set from ``is_trainable``).

        Args:
            is_trainable: keep the adapter trainable (to resume training); otherwise it is frozen.
        """
        from peftkit.models.peft_model import check_loading_options

        check_loading_options(low_cpu_mem_usage, autocast_adapter_dtype)
        if ephemeral_gpu_offload or key_mapping:
            raise NotImplementedError("ephemeral_gpu_offload and key_mapping are not supported by peftkit")
        folder = Path(model_id) / subfolder if subfolder else Path(model_id)
        config = config if config is not None else PeftConfig.from_pretrained(folder)
        if config.inference_mode != (not is_trainable):
            config.inference_mode = not is_trainable
        from peftkit.models.peft_model import PeftModel

        if cls is PeftModel:
            from peftkit.models.task_models import MODEL_TYPE_TO_PEFT_MODEL_MAPPING

            cls = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(str(config.task_type), PeftModel)
        peft_model = cls(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, initialize=False, **context)
        peft_model._load_weights(adapter_name, folder, is_trainable)
        return peft_model

    def load_adapter(
        self,
        model_id: str | Path,
        adapter_name: str,
        is_trainable: bool = False,
        torch_device: str | None = None,
        autocast_adapter_dtype: bool = True,
        ephemeral_gpu_offload: bool = False,
        low_cpu_mem_usage: bool = False,
        key_mapping: dict[str, str] | None = None,
        **context: Any,
    ) -> Adapter:
        """Load another adapter folder onto this model under ``adapter_name`` (not activated).

        Unlike PEFT (which returns the load result), this returns the adapter object.
        """
        from peftkit.models.peft_model import check_loading_options

        check_loading_options(low_cpu_mem_usage, autocast_adapter_dtype)
        if torch_device is not None or ephemeral_gpu_offload or key_mapping:
            raise NotImplementedError("torch_device, ephemeral_gpu_offload, key_mapping: not supported by peftkit")
        config = PeftConfig.from_pretrained(model_id)
        if config.inference_mode != (not is_trainable):
            config.inference_mode = not is_trainable
        adapter = self.add_adapter(
            adapter_name, config, low_cpu_mem_usage=low_cpu_mem_usage, initialize=False, **context
        )
        self._load_weights(adapter_name, Path(model_id), is_trainable)
        return adapter

    def _load_weights(self, adapter_name: str, folder: Path, trainable: bool) -> None:
        device = next(iter(self.get_base_model().parameters())).device
        load_adapter_weights(self.adapters[adapter_name], folder, trainable=trainable, device=device)
