"""PEFT's inspection API of ``PeftModel``: statuses, targeted modules, trainability switches.

A mixin of :class:`~peftkit.PeftModel`; it reads only the model's adapters, configs and routing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from peftkit.config import PeftConfig
    from peftkit.methods.base import Adapter


class PeftInspection:
    """``targeted_module_names``, ``get_model_status``, ``set_requires_grad``, ... (PEFT's names)."""

    adapters: dict[str, Adapter]
    peft_config: dict[str, PeftConfig]

    @property
    def targeted_module_names(self) -> list[str]:
        """Paths (in the user's model) of the layers weight adapters target, in the order they were added."""
        names: list[str] = []
        for adapter in self.adapters.values():
            names.extend(getattr(adapter, "parts", {}))
        return names

    @property
    def modules_to_save(self) -> set[str] | None:
        """The ``modules_to_save`` names of every adapter (``None`` if there are none)."""
        names = {m for c in self.peft_config.values() for m in (getattr(c, "modules_to_save", None) or [])}
        return names or None

    def get_layer_status(self) -> list[Any]:
        """One ``TunerLayerStatus`` per adapted layer (see :func:`peftkit.models.status.get_layer_status`)."""
        from peftkit.models.status import get_layer_status

        return get_layer_status(self)

    def get_model_status(self) -> Any:
        """The ``TunerModelStatus`` summary (see :func:`peftkit.models.status.get_model_status`)."""
        from peftkit.models.status import get_model_status

        return get_model_status(self)

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        """Make the named adapters trainable (or frozen), leaving the others as they are."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self._check_names(names)
        for name in names:
            if requires_grad:
                self.adapters[name].unfreeze()
            else:
                self.adapters[name].freeze()

    def prepare_model_for_gradient_checkpointing(self, model: nn.Module) -> nn.Module:
        """Make the embedding output require grad, so checkpointed layers get gradients (as PEFT)."""
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        elif hasattr(model, "get_input_embeddings"):
            model.get_input_embeddings().register_forward_hook(lambda _m, _i, output: output.requires_grad_(True))
        return model

    @property
    def base_model_torch_dtype(self) -> torch.dtype | None:
        return getattr(self.get_base_model(), "dtype", None)

    @property
    def has_active_enabled_adapter(self) -> bool:
        """An adapter is active and ``disable_adapter()`` is not on."""
        return bool(self.active_adapters) and not self._adapters_disabled
