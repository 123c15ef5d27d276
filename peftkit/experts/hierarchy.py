"""Fallback at inference: each row uses the most specific expert the banks hold.

Seed 001's hierarchy, as levels from the most general to the most specific adapter::

    ExpertHierarchy(model, levels=["unified", "cluster", "persona"])

    request {"persona": "p017", "cluster": "c3"}   p017 in the bank -> unified + c3 + p017  level "persona"
    request {"persona": "new",  "cluster": "c3"}   unknown persona  -> unified + c3         level "cluster"
    request {"persona": "new",  "cluster": "c9"}   unknown cluster  -> unified              level "unified"

A row uses the most specific level whose requested expert is in that adapter's bank, plus every
more general level whose expert is known. A level whose adapter is not a bank (the unified LoRA)
needs no id: its only expert is always known. When no level is known the row uses the bare base
model (level ``"base"``). The result carries per-row routes for ``forward`` / ``generate``
(``experts=resolution``) and the level each row used.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from peftkit.experts.bank import has_expert

if TYPE_CHECKING:
    from peftkit.models.peft_model import PeftModel

#: The level a row reports when no adapter of the hierarchy knows its experts.
BASE_LEVEL = "base"


@dataclass(frozen=True)
class Resolution:
    """Per-row routes and the level each row used.

    Attributes:
        experts: one route per row, adapter name → expert id (pass as ``experts=`` to ``forward``
            or ``generate``, or pass the resolution itself).
        levels: per row, the most specific level used (an adapter name), or ``"base"``.
    """

    experts: list[dict[str, str | int]]
    levels: list[str]


class ExpertHierarchy:
    """Resolve per-row expert requests with fallback from specific to general.

    Args:
        model: the ``PeftModel`` holding the level adapters.
        levels: adapter names from the most general to the most specific, e.g.
            ``["unified", "cluster", "persona"]``.
    """

    def __init__(self, model: PeftModel, levels: Sequence[str]) -> None:
        levels = list(levels)
        if not levels or len(set(levels)) != len(levels):
            raise ValueError(f"levels must be distinct adapter names, most general first; got {levels}")
        missing = [name for name in levels if name not in model.adapters]
        if missing:
            raise ValueError(f"levels name unknown adapter(s) {missing}; this model has {sorted(model.adapters)}")
        self.model = model
        self.levels = levels

    def resolve(self, requests: Sequence[Mapping[str, str | int | None]]) -> Resolution:
        """One route and level per request (a mapping level name → requested expert id or index)."""
        experts: list[dict[str, str | int]] = []
        levels: list[str] = []
        for request in requests:
            unknown = sorted(set(request) - set(self.levels))
            if unknown:
                raise ValueError(f"request names {unknown}, which are not levels of this hierarchy {self.levels}")
            known = {name: expert for name in self.levels if (expert := self._known(name, request)) is not None}
            experts.append(known)
            levels.append(list(known)[-1] if known else BASE_LEVEL)
        return Resolution(experts, levels)

    def _known(self, name: str, request: Mapping[str, str | int | None]) -> str | int | None:
        """The expert of level ``name`` this request can use, or ``None``."""
        adapter = self.model.adapters[name]
        if name not in request and getattr(adapter.config, "expert_ids", None) is None:
            return 0  # not a bank (the unified LoRA, a single prompt): its only expert is always there
        expert = request.get(name)
        return expert if has_expert(adapter, expert) else None
