"""Folding weight adapters into the base weights and taking them out again.

Every adapter that can be merged follows the :class:`~peftkit.methods.base.Mergeable` Protocol;
soft prompts have no weights to fold in and are refused by name. A merge of several adapters is
all or nothing: if one fails (e.g. ``safe_merge`` finds a NaN), those already merged are taken out.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from torch import nn

from peftkit.methods.base import Mergeable

if TYPE_CHECKING:
    from peftkit.models.peft_model import PeftModel


def mergeable_adapters(model: PeftModel, adapter_names: Sequence[str] | None) -> list[Mergeable]:
    """The named adapters (default: the active mergeable ones); a soft prompt named is an error."""
    if adapter_names is None:
        return [a for n in model.active_adapters if isinstance(a := model.adapters[n], Mergeable)]
    model._check_names(list(adapter_names))
    refused = [n for n in adapter_names if not isinstance(model.adapters[n], Mergeable)]
    if refused:
        raise TypeError(f"adapter(s) {refused} cannot be merged (soft prompts have no weights to fold in)")
    return [model.adapters[n] for n in adapter_names]  # type: ignore[misc]


def merge_adapters(model: PeftModel, adapter_names: Sequence[str] | None, safe_merge: bool) -> None:
    done: list[Mergeable] = []
    try:
        for adapter in mergeable_adapters(model, adapter_names):
            if not adapter.merged:
                adapter.merge(safe_merge=safe_merge)
                done.append(adapter)
    except Exception:
        for adapter in reversed(done):
            adapter.unmerge()
        raise


def unmerge_adapters(model: PeftModel) -> None:
    """Take every merged adapter out again, in reverse order of creation."""
    for name in reversed(list(model.adapters)):
        adapter = model.adapters[name]
        if isinstance(adapter, Mergeable) and adapter.merged:
            adapter.unmerge()


class PeftMerging:
    """``merge_adapter``, ``unmerge_adapter``, ``merge_and_unload``, ``unload`` (PEFT's names; a mixin of
    :class:`~peftkit.PeftModel`)."""

    adapters: dict[str, Any]
    peft_config: dict[str, Any]

    def merge_adapter(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
        """Fold weight adapters (default: the active mergeable ones) into the base weights.

        Merged adapters cost nothing at inference; every row must then use them (mixing per row or
        ``disable_adapter()`` raises until :meth:`unmerge_adapter`). ``safe_merge`` checks every new
        weight for NaN/inf first and leaves the model untouched if one is found.
        """
        merge_adapters(self, adapter_names, safe_merge)

    def unmerge_adapter(self) -> None:
        """Take every merged adapter out of the base weights again (in reverse merge order)."""
        unmerge_adapters(self)

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: Sequence[str] | None = None
    ) -> nn.Module:
        """Merge weight adapters (default: the active mergeable ones) and return the bare base model.

        Every adapter is removed from the model afterwards (those not merged are dropped), so the
        result is a plain transformers model, as with PEFT. ``progressbar`` is accepted for PEFT
        compatibility.
        """
        self.merge_adapter(adapter_names, safe_merge=safe_merge)
        return self._unload()

    def unload(self) -> nn.Module:
        """Remove every adapter without merging and return the bare base model (its original weights)."""
        self.unmerge_adapter()
        return self._unload()

    def _unload(self) -> nn.Module:
        from peftkit.models.tuner_model import AdapterHost

        for name in list(self.adapters):
            adapter = self.adapters.pop(name)
            adapter.detach(AdapterHost(self), name)  # type: ignore[arg-type]
            del self.peft_config[name]
        self.active_adapters = []
        return self.get_base_model()
