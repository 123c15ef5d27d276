"""Per-row expert routes: what a caller writes for each row, turned into the model's row map.

A route names, for one row of a batch, the expert each adapter applies::

    {"unified": 0, "cluster": "c3", "persona": "p017"}    # a frozen LoRA, then two prompts
    {"unified": 0}                                        # the unified model only
    {}                                                    # the bare base model

Values are expert ids (``str``) or row indices (``int``) in that adapter's bank; an adapter that is
not a bank has the single expert ``0`` / ``"0"``. :func:`expert_routes` returns
``{adapter name: (B,) long tensor}``, ``-1`` where the adapter does not serve the row, ordered as
the adapters were added to the model: that order is the composition order (weight adapters act
inside the layers; soft prompts are laid out one after another before the user's tokens, so add
the cluster bank before the persona bank to read ``[cluster][persona][tokens]``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

import torch
from torch import Tensor

from peftkit.experts.bank import expert_row

if TYPE_CHECKING:
    from peftkit.models.peft_model import PeftModel

ExpertRoute: TypeAlias = Mapping[str, str | int | None]
"""One row's route: adapter name → expert id or index (``None`` or absent: not applied)."""


class ResolvedRoutes(Protocol):
    """Anything with per-row routes in ``experts`` (e.g. an ``ExpertHierarchy`` resolution)."""

    experts: Sequence[ExpertRoute]


ExpertRoutes: TypeAlias = Sequence[ExpertRoute] | ResolvedRoutes


def route_list(experts: Any) -> list[ExpertRoute]:
    """The per-row routes of ``experts`` (a sequence of mappings or an object holding one)."""
    rows = getattr(experts, "experts", experts)
    if isinstance(rows, (Mapping, str)) or not isinstance(rows, Sequence):
        raise TypeError(f"experts must be one mapping (adapter name → expert) per row, got {type(rows).__name__}")
    for row in rows:
        if not isinstance(row, Mapping):
            raise TypeError(f"each row of experts must be a mapping adapter name → expert, got {row!r}")
    return list(rows)


def expert_routes(model: PeftModel, experts: ExpertRoutes, batch_size: int, device: torch.device) -> dict[str, Tensor]:
    """``{adapter: (B,) expert row per batch row, -1 = not served}`` in the model's adapter order."""
    rows = route_list(experts)
    if len(rows) != batch_size:
        raise ValueError(f"experts has {len(rows)} entries for a batch of {batch_size} rows")
    named = {name for row in rows for name, expert in row.items() if expert is not None}
    unknown = sorted(named - set(model.adapters))
    if unknown:
        raise ValueError(f"unknown adapter(s) {unknown} in experts; this model has {sorted(model.adapters)}")
    routes: dict[str, Tensor] = {}
    for name, adapter in model.adapters.items():  # composition order = order of addition
        if name in named:
            index = [expert_row(adapter, row.get(name), name) for row in rows]
            routes[name] = torch.tensor(index, dtype=torch.long, device=device)
    return routes
