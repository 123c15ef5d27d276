"""Which rows each adapter serves in the forward pass under way.

``PeftModel.forward`` (and ``generate``) computes, per adapter, a ``(B,)`` row map and publishes it
for the duration of the call. Soft prompts receive it directly (``prepare_inputs``); weight
adapters act inside the base model's layers, so their wrapped layers read it from :class:`Routing`.

The per-call state lives in a :class:`contextvars.ContextVar`, not on the model: two requests
served at once from two threads (or two asyncio tasks) each see only their own routing, and
``disable_adapter()`` in one thread does not disable the adapters of another. What *is* model state
is the list of active adapters (``set_adapter``), as in PEFT.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class _CallState:
    """The routing of one call: adapter → ``(B,)`` expert index per row (``-1`` = not served)."""

    rows: dict[str, Tensor] | None = None
    disabled: bool = False
    selection: dict[str, Tensor | None] | None = field(default=None, repr=False)
    experts: dict[str, str | int] | None = None


class Routing:
    """Which rows each adapter serves, read by the layers weight adapters wrap.

    Inside ``PeftModel.forward`` / ``generate`` (:meth:`scope`), :attr:`rows` holds that call's per-row
    map. Outside (the base model called directly) it is ``None`` and layers apply the :attr:`active`
    adapters to every row, as PEFT does, or none while :attr:`disabled` (``disable_adapter()``).
    """

    def __init__(self) -> None:
        self.active: list[str] = []
        self._call: contextvars.ContextVar[_CallState] = contextvars.ContextVar(f"peftkit_routing_{id(self)}")

    def _state(self) -> _CallState:
        state = self._call.get(None)
        if state is None:
            state = _CallState()
            self._call.set(state)
        return state

    @property
    def rows(self) -> dict[str, Tensor] | None:
        return self._state().rows

    @property
    def disabled(self) -> bool:
        return self._state().disabled

    @property
    def experts(self) -> dict[str, str | int] | None:
        return self._state().experts

    @contextlib.contextmanager
    def scope(self, rows: dict[str, Tensor]) -> Iterator[None]:
        """Publish ``rows`` to the wrapped layers for the duration of one call (this context only)."""
        with self._replaced(_CallState(rows, self.disabled, experts=self.experts)):
            yield

    @contextlib.contextmanager
    def disabled_scope(self) -> Iterator[None]:
        """Inside, calls that pass no explicit routing use no adapter (``disable_adapter()``)."""
        state = self._state()
        with self._replaced(_CallState(state.rows, True, experts=state.experts)):
            yield

    @contextlib.contextmanager
    def experts_scope(self, experts: dict[str, str | int]) -> Iterator[None]:
        """Inside, calls that pass no explicit routing give every row these experts of the active banks."""
        state = self._state()
        with self._replaced(_CallState(state.rows, state.disabled, experts=dict(experts))):
            yield

    @contextlib.contextmanager
    def _replaced(self, state: _CallState) -> Iterator[None]:
        token = self._call.set(state)
        try:
            yield
        finally:
            self._call.reset(token)

    def selection(self) -> dict[str, Tensor | None]:
        """Adapter name → the rows it serves: ``None`` for every row, else a ``(B,)`` bool mask.

        Adapters that serve no row are left out. Computed once per forward pass.
        """
        state = self._state()
        if state.rows is None:
            return {} if state.disabled else dict.fromkeys(self.active)
        if state.selection is None:
            selection: dict[str, Tensor | None] = {}
            for name, rows in state.rows.items():
                served = rows >= 0
                if bool(served.all()):
                    selection[name] = None
                elif bool(served.any()):
                    selection[name] = served
            state.selection = selection
        return state.selection

    def checkpoint_contexts(self) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        """``context_fn`` for ``torch.utils.checkpoint``: a checkpointed layer is recomputed in the backward
        pass, after the forward's scope has closed; this replays the routing the forward saw, so a
        mixed batch recomputes (and differentiates) what it computed."""
        state = self._state()
        replay = _CallState(state.rows, state.disabled)
        return contextlib.nullcontext(), self._replay(replay, list(self.active))

    @contextlib.contextmanager
    def _replay(self, state: _CallState, active: list[str]) -> Iterator[None]:
        previous = self.active
        self.active = active
        try:
            with self._replaced(state):
                yield
        finally:
            self.active = previous
