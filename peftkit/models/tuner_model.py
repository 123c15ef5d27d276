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

    Built by :class:`~peftkit.PeftModel` (its ``base_model``), or by a user as in PEFT:
    ``LoraModel(model, config, "default")`` places the adapter in ``model`` and owns it.

    Args:
        model: the user's model (adapters are placed inside its layers).
        peft_config: an adapter config (or ``{name: config}``) to add right away, as PEFT's tuner models do.
        adapter_name: the name of that adapter.
        low_cpu_mem_usage: accepted for PEFT compatibility; only ``False`` is supported.
        state_dict: accepted for PEFT compatibility; only ``None`` is supported.
        peft_model: the :class:`~peftkit.PeftModel` that owns the adapters (not a submodule, so the
            module tree has no cycle).
    """

    #: The ``peft_type`` this tuner class stands for in PEFT (``None``: any).
    peft_type: str | None = None

    def __init__(
        self,
        model: nn.Module,
        peft_config: Any = None,
        adapter_name: str = "default",
        low_cpu_mem_usage: bool = False,
        state_dict: dict | None = None,
        *,
        peft_model: PeftModel | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        object.__setattr__(self, "_peft_model", peft_model)
        if state_dict is not None:
            raise NotImplementedError("state_dict= is not supported; load weights with set_peft_model_state_dict")
        if peft_config is None:
            return
        from peftkit.models.peft_model import PeftModel

        configs = peft_config if isinstance(peft_config, dict) else {adapter_name: peft_config}
        for name, one in configs.items():
            if self.peft_type is not None and one.peft_type != self.peft_type:
                raise ValueError(f"{type(self).__name__} takes {self.peft_type} configs, got {one.peft_type}")
            if self._peft_model is None:
                PeftModel(self, one, name, low_cpu_mem_usage=low_cpu_mem_usage)  # sets self._peft_model
            else:
                self._peft_model.add_adapter(name, one, low_cpu_mem_usage=low_cpu_mem_usage)
        self._peft_model.set_adapter(adapter_name if adapter_name in configs else next(iter(configs)))

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


def _tuner_class(name: str, peft_type: str) -> type[TunerModel]:
    doc = f"PEFT's ``{name}``: the tuner model of {peft_type} adapters (see :class:`TunerModel`)."
    return type(name, (TunerModel,), {"peft_type": peft_type, "__doc__": doc, "__module__": __name__})


LoraModel = _tuner_class("LoraModel", "LORA")
AdaLoraModel = _tuner_class("AdaLoraModel", "ADALORA")
IA3Model = _tuner_class("IA3Model", "IA3")
LoHaModel = _tuner_class("LoHaModel", "LOHA")
LoKrModel = _tuner_class("LoKrModel", "LOKR")
OFTModel = _tuner_class("OFTModel", "OFT")
BOFTModel = _tuner_class("BOFTModel", "BOFT")
VeraModel = _tuner_class("VeraModel", "VERA")

#: ``peft_type`` → tuner-model class (PEFT's ``PEFT_TYPE_TO_TUNER_MAPPING`` for the shipped methods).
PEFT_TYPE_TO_TUNER_MAPPING: dict[str, type[TunerModel]] = {
    cls.peft_type: cls  # type: ignore[misc]
    for cls in (LoraModel, AdaLoraModel, IA3Model, LoHaModel, LoKrModel, OFTModel, BOFTModel, VeraModel)
}


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
