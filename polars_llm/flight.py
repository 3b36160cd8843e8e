"""Single-flight: one call per key however many callers want its answer at once.

The first caller of a key runs the call itself, in its own task: no task or shield per call, the
common case (a prompt nobody else asks for at that moment) costs a dict entry. Callers arriving
while it runs wait for its answer, each on a future of its own, so one that goes away (Ctrl-C,
a cancelled batch) stops waiting without disturbing the others. If the caller running the call
goes away, the call stops with it, and one of those still waiting starts it again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class _Flight(Generic[T]):
    __slots__ = ("waiters",)

    def __init__(self) -> None:
        # The futures of the callers waiting for this call's answer; None until the first.
        self.waiters: list[asyncio.Future[T]] | None = None


class _Restart(Exception):
    """The caller running a call went away before it ended: a waiter starts it again."""


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
        flights = self._flights
        while key in flights:
            try:
                return await self._join(flights[key])
            except _Restart:
                continue  # the first waiter to wake starts it; the others join that
        flight = flights[key] = _Flight()
        try:
            result = await start()
        except Exception as e:
            del flights[key]
            self._tell(flight, None, e)
            raise
        except BaseException:  # cancelled (or the process stopping): not the call's answer
            del flights[key]
            self._tell(flight, None, _Restart())
            raise
        del flights[key]
        self._tell(flight, result, None)
        return result

    @staticmethod
    async def _join(flight: _Flight[T]) -> T:
        waiter: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        if flight.waiters is None:
            flight.waiters = []
        flight.waiters.append(waiter)
        return await waiter  # a cancelled caller cancels only its own future

    @staticmethod
    def _tell(flight: _Flight[T], result: T | None, error: BaseException | None) -> None:
        for waiter in flight.waiters or ():
            if waiter.done():
                continue
            if error is None:
                waiter.set_result(result)  # type: ignore[arg-type]
            else:
                waiter.set_exception(error)
