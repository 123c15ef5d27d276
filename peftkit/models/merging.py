"""Folding weight adapters into the base weights and taking them out again.

Every adapter that can be merged follows the :class:`~peftkit.methods.base.Mergeable` Protocol;
soft prompts have no weights to fold in and are refused by name. A merge of several adapters is
all or nothing: if one fails (e.g. ``safe_merge`` finds a NaN), those already merged are taken out.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

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
