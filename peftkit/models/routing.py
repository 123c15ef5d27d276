"""Which rows each adapter serves in the forward pass under way.

``PeftModel.forward`` (and ``generate``) computes, per adapter, a ``(B,)`` row map and publishes it
here for the duration of the call. Soft prompts receive it directly (``prepare_inputs``); weight
adapters act inside the base model's layers, so their wrapped layers read it from :class:`Routing`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import Tensor


class Routing:
    """Which rows each adapter serves, read by the layers weight adapters wrap.

    Inside ``PeftModel.forward`` / ``generate``, :attr:`rows` holds that call's per-row map (adapter
    name → ``(B,)`` expert index, ``-1`` = row not served). Outside (the base model called directly)
    it is ``None`` and layers apply the :attr:`active` adapters to every row, as PEFT does, or none
    while :attr:`disabled` (``disable_adapter()``).
    """

    def __init__(self) -> None:
        self.rows: dict[str, Tensor] | None = None
        self.active: list[str] = []
        self.disabled = False
        self._selection: dict[str, Tensor | None] | None = None

    @contextlib.contextmanager
    def scope(self, rows: dict[str, Tensor]) -> Iterator[None]:
        previous = self.rows, self._selection
        self.rows, self._selection = rows, None
        try:
            yield
        finally:
            self.rows, self._selection = previous

    def selection(self) -> dict[str, Tensor | None]:
        """Adapter name → the rows it serves: ``None`` for every row, else a ``(B,)`` bool mask.

        Adapters that serve no row are left out. Computed once per forward pass.
        """
        if self.rows is None:
            return {} if self.disabled else dict.fromkeys(self.active)
        if self._selection is None:
            selection: dict[str, Tensor | None] = {}
            for name, rows in self.rows.items():
                served = rows >= 0
                if bool(served.all()):
                    selection[name] = None
                elif bool(served.any()):
                    selection[name] = served
            self._selection = selection
        return self._selection

    def checkpoint_contexts(self) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        """``context_fn`` for ``torch.utils.checkpoint``: a checkpointed layer is recomputed in the backward
        pass, after the forward's scope has closed; this replays the routing the forward saw, so a
        mixed batch recomputes (and differentiates) what it computed."""
        return contextlib.nullcontext(), self._replay(self.rows, list(self.active), self.disabled)

    @contextlib.contextmanager
    def _replay(self, rows: dict[str, Tensor] | None, active: list[str], disabled: bool) -> Iterator[None]:
        previous = self.rows, self.active, self.disabled, self._selection
        self.rows, self.active, self.disabled, self._selection = rows, active, disabled, None
        try:
            yield
        finally:
            self.rows, self.active, self.disabled, self._selection = previous
