"""Single-flight: one call per key, whoever asks and whoever goes away."""

from __future__ import annotations

import asyncio

import pytest

from polars_llm.flight import SingleFlight


class Calls:
    """A call that counts its starts and ends when told to."""

    def __init__(self) -> None:
        self.started = 0
        self.release = asyncio.Event()

    async def __call__(self) -> str:
        self.started += 1
        await self.release.wait()
        return f"answer {self.started}"


def test_callers_at_once_share_one_call() -> None:
    async def main() -> None:
        flights: SingleFlight[str] = SingleFlight()
        call = Calls()
        callers = [asyncio.create_task(flights.run("k", call)) for _ in range(5)]
        await asyncio.sleep(0)
        assert "k" in flights and len(flights) == 1
        call.release.set()
        assert await asyncio.gather(*callers) == ["answer 1"] * 5
        assert call.started == 1
        assert len(flights) == 0

    asyncio.run(main())


def test_a_waiter_that_goes_away_leaves_the_call_to_the_others() -> None:
    async def main() -> None:
        flights: SingleFlight[str] = SingleFlight()
        call = Calls()
        first = asyncio.create_task(flights.run("k", call))
        await asyncio.sleep(0)
        leaving = asyncio.create_task(flights.run("k", call))
        staying = asyncio.create_task(flights.run("k", call))
        await asyncio.sleep(0)
        leaving.cancel()
        await asyncio.sleep(0)
        call.release.set()
        assert await first == await staying == "answer 1"
        assert leaving.cancelled()
        assert call.started == 1

    asyncio.run(main())


def test_when_the_caller_running_the_call_goes_away_a_waiter_runs_it_again() -> None:
    async def main() -> None:
        flights: SingleFlight[str] = SingleFlight()
        call = Calls()
        first = asyncio.create_task(flights.run("k", call))
        await asyncio.sleep(0)
        waiters = [asyncio.create_task(flights.run("k", call)) for _ in range(3)]
        await asyncio.sleep(0)
        first.cancel()
        await asyncio.sleep(0.01)
        assert first.cancelled()
        assert call.started == 2  # one waiter started it again; the other two joined that
        call.release.set()
        assert await asyncio.gather(*waiters) == ["answer 2"] * 3
        assert len(flights) == 0

    asyncio.run(main())


def test_a_failed_call_fails_every_caller_and_is_not_remembered() -> None:
    async def main() -> None:
        flights: SingleFlight[str] = SingleFlight()
        release = asyncio.Event()

        async def failing() -> str:
            await release.wait()
            raise ValueError("bad answer")

        callers = [asyncio.create_task(flights.run("k", failing)) for _ in range(3)]
        await asyncio.sleep(0)
        release.set()
        results = await asyncio.gather(*callers, return_exceptions=True)
        assert all(isinstance(r, ValueError) for r in results)
        assert len(flights) == 0
        call = Calls()
        call.release.set()
        assert await flights.run("k", call) == "answer 1"  # a new call, not the failure

    asyncio.run(main())


def test_calls_of_different_keys_run_side_by_side() -> None:
    async def main() -> None:
        flights: SingleFlight[str] = SingleFlight()
        a, b = Calls(), Calls()
        ta = asyncio.create_task(flights.run("a", a))
        tb = asyncio.create_task(flights.run("b", b))
        await asyncio.sleep(0)
        assert len(flights) == 2
        b.release.set()
        assert await tb == "answer 1"
        assert not ta.done()
        a.release.set()
        assert await ta == "answer 1"

    asyncio.run(main())


@pytest.mark.parametrize("waiters", [0, 2])
def test_a_cancelled_lone_call_leaves_nothing_behind(waiters: int) -> None:
    async def main() -> None:
        flights: SingleFlight[str] = SingleFlight()
        call = Calls()
        first = asyncio.create_task(flights.run("k", call))
        await asyncio.sleep(0)
        others = [asyncio.create_task(flights.run("k", call)) for _ in range(waiters)]
        await asyncio.sleep(0)
        for task in [first, *others]:
            task.cancel()
        await asyncio.gather(first, *others, return_exceptions=True)
        assert len(flights) == 0

    asyncio.run(main())
