"""How a call is routed: which expert of which adapter each row uses (a mixin of ``PeftModel``).

``routes`` turns what a caller passes (nothing: the active adapters on every row; ``adapter_names``:
one adapter per row; ``experts``: one mapping adapter → expert per row) into the ``(B,)`` row map
each adapter receives; ``prepare_inputs`` lets every routed adapter prepare the batch and packs the
virtual slots; ``use_experts`` sets, for the calling context only, which expert of each bank the rows
of un-routed calls use. See ``docs/architecture.md`` and ``docs/experts.md``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from peftkit.experts.bank import expert_row
from peftkit.experts.routes import ExpertRoutes, expert_routes
from peftkit.methods.base import ModelInputs
from peftkit.methods.soft_prompt import pack_virtual_slots

if TYPE_CHECKING:
    from peftkit.methods.base import Adapter
    from peftkit.models.routing import Routing

BASE_ADAPTER_NAME = "__base__"
"""Name that routes a row of a mixed batch to the bare base model (as in PEFT)."""


class PeftRouting:
    """``routes``, ``prepare_inputs``, ``use_experts`` and the adapters' extra loss terms."""

    adapters: dict[str, Adapter]
    routing: Routing

    @contextlib.contextmanager
    def use_experts(self, experts: dict[str, str | int]) -> Iterator[None]:
        """Inside, every row of a call without ``experts=`` / ``adapter_names=`` uses these experts of the
        active bank adapters (adapter name → expert id or index; others keep their single expert).

        Per call context, like :meth:`disable_adapter`: e.g. evaluating one persona's examples.
        """
        for name, expert in experts.items():
            self._check_names([name])
            expert_row(self.adapters[name], expert, name)  # an unknown expert fails here, by name
        with self.routing.experts_scope(experts):
            yield

    def routes(
        self,
        batch_size: int,
        adapter_names: Sequence[str] | None,
        device: torch.device,
        experts: ExpertRoutes | None = None,
    ) -> dict[str, Tensor]:
        """Adapter name → ``(B,)`` expert index per row (``-1``: row not served).

        ``experts`` (one mapping adapter name → expert id or index per row, or a resolver's result
        with an ``experts`` attribute) routes each row on its own; see :func:`expert_routes`.
        """
        if experts is not None and adapter_names is not None:
            raise ValueError("pass adapter_names or experts, not both")
        if self._adapters_disabled:
            return {}
        if experts is not None:
            return expert_routes(self, experts, batch_size, device)
        if adapter_names is None:
            chosen = self.routing.experts or {}  # use_experts(): every row the same expert of each bank
            rows = {name: expert_row(self.adapters[name], chosen.get(name, 0), name) for name in self.active_adapters}
            return {name: torch.full((batch_size,), row, device=device) for name, row in rows.items()}
        if len(adapter_names) != batch_size:
            raise ValueError(f"adapter_names has {len(adapter_names)} entries for a batch of {batch_size} rows")
        self._check_names(sorted(set(adapter_names) - {BASE_ADAPTER_NAME}))
        return {
            name: torch.tensor([0 if n == name else -1 for n in adapter_names], device=device)
            for name in dict.fromkeys(adapter_names)
            if name != BASE_ADAPTER_NAME
        }

    def prepare_inputs(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        routes: dict[str, Tensor] | None = None,
    ) -> ModelInputs:
        """The batch after every routed adapter has prepared it, in ``routes`` order, then packed
        (each row as long as its own virtual tokens plus its tokens; see ``pack_virtual_slots``)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.get_base_model().get_input_embeddings()(input_ids)
        inputs = ModelInputs.from_user(inputs_embeds, attention_mask, labels)
        for name, rows in (routes or {}).items():
            inputs = self.adapters[name].prepare_inputs(inputs, rows)
        return pack_virtual_slots(inputs)

    @contextlib.contextmanager
    def _routed(self, adapter_names: Sequence[str] | None, args: tuple, kwargs: dict) -> Iterator[None]:
        """Publish per-row routing for a call that passes ``adapter_names`` (else: the active adapters)."""
        if adapter_names is None:
            yield
            return
        first = next(v for v in [*args, *kwargs.values()] if isinstance(v, Tensor))
        routes = self.routes(first.shape[0], adapter_names, first.device)
        with self.routing.scope(routes):
            yield

    def regularization_loss(self, routes: dict[str, Tensor] | None = None) -> Tensor | None:
        """Sum of the adapters' extra loss terms (AdaLoRA's orthogonality penalty), ``None`` if none.

        Counts the adapters that serve rows in ``routes`` (default: the active ones). ``forward`` adds
        it to the loss it returns; the trainer, which owns the training loss, adds it once per step.
        """
        names = list(routes) if routes is not None else ([] if self._adapters_disabled else self.active_adapters)
        total = None
        for name in names:
            term = getattr(self.adapters[name], "regularization_loss", None)
            extra = term() if term is not None else None
            if extra is not None:
                total = extra if total is None else total + extra
        return total
