"""``peft_model.base_model`` for weight adapters: PEFT's tuner-model layer around the user's model.

In PEFT, ``PeftModel.base_model`` is a tuner model (``LoraModel``, ``IA3Model``, ...) whose ``.model`` is
the user's transformers model, so ``peft_model.base_model.model`` is that model and the state dict keys
read ``base_model.model.<module path>``. :class:`TunerModel` is that layer. It holds no adapter logic:

- ``forward`` (and so ``peft_model.base_model(...)``) calls the wrapped model, with the adapters that
  the routing selects acting inside its layers;
- attributes it does not have come from the wrapped model (``config``, ``generation_config``,
  ``get_input_embeddings``, ...), as with PEFT's tuner models;
- the tuner-model methods PEFT users call on it (``merge_and_unload``, ``set_adapter``,
  ``update_and_allocate``, ...) are the :class:`~peftkit.PeftModel` ones.

Soft prompts keep PEFT's layout too: with a prompt-learning first adapter, ``base_model`` is the user's
model itself (see :meth:`peftkit.PeftModel.get_base_model`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from peftkit.models.peft_model import PeftModel

#: Tuner-model attributes PEFT users reach through ``peft_model.base_model``; served by the PeftModel.
FROM_PEFT_MODEL = frozenset(
    {
        "peft_config",
        "active_adapter",
        "active_adapters",
        "add_adapter",
        "delete_adapter",
        "set_adapter",
        "set_requires_grad",
        "merge_adapter",
        "unmerge_adapter",
        "merge_and_unload",
        "unload",
        "targeted_module_names",
        "update_and_allocate",
        "disable_adapter",
    }
)


class TunerModel(nn.Module):
    """The user's model as ``.model``, with PEFT's tuner-model surface.

    Args:
        model: the user's model (adapters are placed inside its layers).
        peft_model: the :class:`~peftkit.PeftModel` that owns the adapters (not a submodule, so the
            module tree has no cycle).
    """

    def __init__(self, model: nn.Module, peft_model: PeftModel | None = None) -> None:
        super().__init__()
        self.model = model
        object.__setattr__(self, "_peft_model", peft_model)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("model", "_peft_model") or name.startswith("__"):
                raise
        owner = self.__dict__.get("_peft_model")
        if owner is not None and name in FROM_PEFT_MODEL:
            return object.__getattribute__(owner, name)
        return getattr(self.model, name)


class AdapterHost:
    """What an adapter's ``attach`` / ``detach`` see: the PeftModel, with ``base_model`` the user's model.

    Adapters place themselves inside ``host.base_model``'s layers by module path; those paths are
    relative to the user's model, whichever layout ``PeftModel.base_model`` has.
    """

    def __init__(self, peft_model: PeftModel) -> None:
        object.__setattr__(self, "_peft_model", peft_model)

    @property
    def base_model(self) -> nn.Module:
        return self._peft_model.get_base_model()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_peft_model"], name)
