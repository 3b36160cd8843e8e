"""Single-flight: one call per key however many callers want its answer at once.

The shared call runs as its own task. A caller that goes away (Ctrl-C, a cancelled batch) stops
waiting without cancelling or failing the call for the others; only when the last caller has
gone is the call cancelled, so nobody pays for an answer that no one waits for.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class _Flight(Generic[T]):
    __slots__ = ("task", "waiters")

    def __init__(self, task: asyncio.Task[T]) -> None:
        self.task = task
        self.waiters = 0


class SingleFlight(Generic[T]):
    """Calls by key, on one event loop: ``await flights.run(key, start)``."""

    def __init__(self) -> None:
        self._flights: dict[str, _Flight[T]] = {}

    def __len__(self) -> int:
        return len(self._flights)

    def __contains__(self, key: str) -> bool:
        return key in self._flights

    async def run(self, key: str, start: Callable[[], Awaitable[T]]) -> T:
        """The answer of the call for ``key``: joined if one is under way, else ``start()``-ed."""
        flight = self._flights.get(key)
        if flight is None:
            task: asyncio.Task[T] = asyncio.ensure_future(start())
            flight = self._flights[key] = _Flight(task)
            task.add_done_callback(functools.partial(self._done, key, flight))
        flight.waiters += 1
        try:
            return await asyncio.shield(flight.task)
        finally:
            flight.waiters -= 1
            if flight.waiters == 0 and not flight.task.done():
                # Nobody waits any more: stop paying for it. Forget it now, so that a caller
                # arriving before the cancellation lands starts a fresh call.
                self._forget(key, flight)
                flight.task.cancel()

    def _done(self, key: str, flight: _Flight[T], task: asyncio.Task[T]) -> None:
        self._forget(key, flight)

    def _forget(self, key: str, flight: _Flight[T]) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]
        if flight.task.done() and not flight.task.cancelled():
            flight.task.exception()  # retrieved: every waiter got it through shield
