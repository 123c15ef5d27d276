"""What :meth:`Engine.submit <peftkit.serving.engine.Engine.submit>` returns: a request's event stream
(blocking or ``async for``), its cancellation and its final result.

The engine's thread pushes each :class:`TokenEvent` with :meth:`RequestHandle._push`: into a thread-safe
queue, or, when the request was submitted with an event loop, into an ``asyncio.Queue`` through
``loop.call_soon_threadsafe`` (so an HTTP handler awaits events without a thread per request).
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Iterator
from typing import NamedTuple

from peftkit.serving.types import FinishReason, TokenEvent, Usage


class RequestResult(NamedTuple):
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    usage: Usage


class RequestHandle:
    """A submitted request: its events, its cancellation, its final result.

    Events are :class:`TokenEvent`; the last one has ``finish_reason`` and ``usage``. Iterate with
    ``for event in handle`` (blocking) or ``async for event in handle``.
    """

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop | None, wake: threading.Condition) -> None:
        self.request_id = request_id
        self._loop = loop
        self._events: queue.SimpleQueue[TokenEvent] | None = None if loop is not None else queue.SimpleQueue()
        self._async_events: asyncio.Queue[TokenEvent] | None = asyncio.Queue() if loop is not None else None
        self._wake = wake
        self._done = threading.Event()
        self.cancelled = False
        self.text = ""
        self.token_ids: list[int] = []
        self.finish_reason: FinishReason | None = None
        self.usage: Usage | None = None

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Stop generating: the slot is freed at the next token boundary; the final event says ``abort``."""
        self.cancelled = True
        with self._wake:
            self._wake.notify_all()

    def _push(self, event: TokenEvent) -> None:
        """Record ``event`` and hand it to the consumer (called from the engine's thread)."""
        self.text += event.text
        if event.token_id is not None:
            self.token_ids.append(event.token_id)
        if event.finish_reason is not None:
            self.finish_reason, self.usage = event.finish_reason, event.usage
        if self._events is not None:
            self._events.put(event)
        else:
            try:
                self._loop.call_soon_threadsafe(self._async_events.put_nowait, event)
            except RuntimeError:  # the caller's loop is closed: nobody listens any more
                self.cancelled = True
        if event.finish_reason is not None:
            self._done.set()

    def __iter__(self) -> Iterator[TokenEvent]:
        if self._events is None:
            raise TypeError("this request was submitted with an event loop: use `async for event in handle`")
        while True:
            event = self._events.get()
            yield event
            if event.finish_reason is not None:
                return

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        while True:
            if self._async_events is not None:
                event = await self._async_events.get()
            else:
                event = await asyncio.to_thread(self._events.get)
            yield event
            if event.finish_reason is not None:
                return

    def result(self, timeout: float | None = None) -> RequestResult:
        """Wait for the request to finish: ``(text, token_ids, finish_reason, usage)``."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request_id!r} did not finish within {timeout} s")
        assert self.finish_reason is not None
        assert self.usage is not None
        return RequestResult(self.text, list(self.token_ids), self.finish_reason, self.usage)
