"""The Limiter and TokenBucket on a real asyncio loop, with an injected virtual clock.

The limiter's own waits go through ``asyncio.sleep``; the ``clock`` fixture routes them to the
virtual clock, which jumps forward by the delay at once, so minutes of rate limiting take
microseconds and the elapsed virtual time is exact.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest

from polars_llm import limiter as limiter_module
from polars_llm.limiter import CLIENT_BURST_SECONDS, Limiter, TokenBucket

T = TypeVar("T")
_real_sleep = asyncio.sleep


class VirtualClock:
    """Time that passes only when the limiter sleeps (or a test advances it)."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.sleeps: list[float] = []
        self.frozen = False  # when set, a sleep never ends (to test cancellation)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    async def sleep(self, delay: float, result: Any = None) -> Any:
        self.sleeps.append(delay)
        if self.frozen:
            await asyncio.get_running_loop().create_future()
        # A real sleep always lets some time pass; without that, a float residue in a bucket's
        # level (a wait of 1e-17 s) would never be refilled.
        self.now += max(1e-6, delay)
        await _real_sleep(0)
        return result


class _AsyncioWithVirtualSleep:
    """The asyncio module as the limiter sees it, except that ``sleep`` is virtual."""

    def __init__(self, sleep: Callable[..., Awaitable[Any]]) -> None:
        self.sleep = sleep

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio, name)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[VirtualClock]:
    virtual = VirtualClock()
    monkeypatch.setattr(limiter_module, "asyncio", _AsyncioWithVirtualSleep(virtual.sleep))
    yield virtual


def run(make: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine on a fresh real event loop, failing instead of hanging."""

    async def bounded() -> T:
        return await asyncio.wait_for(make(), timeout=10)

    return asyncio.run(bounded())


async def settle(rounds: int = 5) -> None:
    """Let every ready task run a few steps."""
    for _ in range(rounds):
        await _real_sleep(0)


async def acquire_many(limiter: Limiter, count: int, tokens: int = 0) -> None:
    for _ in range(count):
        await limiter.acquire(tokens)
        limiter.release()


# --------------------------------------------------------------------------------------------
# TokenBucket
# --------------------------------------------------------------------------------------------
def test_bucket_starts_full_and_refills_at_its_rate(clock: VirtualClock) -> None:
    """A 600/min bucket holds half a second's worth (5) and then refills 10 a second."""
    bucket = TokenBucket(600, CLIENT_BURST_SECONDS, clock)
    assert bucket.capacity == 5
    assert bucket.wait_time(5) == 0
    bucket.take(5)
    assert bucket.wait_time(1) == pytest.approx(0.1)
    clock.advance(0.1)
    assert bucket.wait_time(1) == pytest.approx(0, abs=1e-9)


def test_bucket_never_holds_more_than_its_capacity(clock: VirtualClock) -> None:
    """After a long idle time the bucket is full, not holding the idle time's worth."""
    bucket = TokenBucket(600, CLIENT_BURST_SECONDS, clock)
    clock.advance(3600)
    assert bucket.wait_time(5) == 0  # the limiter always asks, then takes at the same instant
    bucket.take(5)
    assert bucket.wait_time(1) == pytest.approx(0.1)


def test_bucket_of_a_tiny_rate_still_admits_one(clock: VirtualClock) -> None:
    """A budget below one unit per burst window still lets a single request through."""
    bucket = TokenBucket(1, CLIENT_BURST_SECONDS, clock)
    assert bucket.capacity == 1
    assert bucket.wait_time(1) == 0


def test_bucket_oversize_amount_waits_for_a_full_bucket_then_leaves_debt(
    clock: VirtualClock,
) -> None:
    """An amount above capacity is admitted once the bucket is full; the debt delays the next."""
    bucket = TokenBucket(6000, CLIENT_BURST_SECONDS, clock)  # 100 a second, capacity 50
    assert bucket.wait_time(50) == 0
    bucket.take(50)
    assert bucket.wait_time(500) == pytest.approx(0.5)  # waits for 50, not for 500
    clock.advance(0.5)
    assert bucket.wait_time(500) == pytest.approx(0, abs=1e-9)
    bucket.take(500)
    assert bucket.wait_time(10) == pytest.approx(4.6)


# --------------------------------------------------------------------------------------------
# Concurrency
# --------------------------------------------------------------------------------------------
def test_concurrency_never_exceeds_the_limit(clock: VirtualClock) -> None:
    """40 tasks through a limiter of 4 never have more than 4 inside, and all finish."""
    seen: list[int] = []

    async def main() -> int:
        limiter = Limiter(4, clock=clock)
        inside = 0
        done = 0

        async def task(i: int) -> None:
            nonlocal inside, done
            await limiter.acquire()
            inside += 1
            seen.append(inside)
            await settle(1 + i % 3)
            inside -= 1
            limiter.release()
            done += 1

        await asyncio.gather(*(task(i) for i in range(40)))
        assert limiter.active == 0
        return done

    assert run(main) == 40
    assert max(seen) == 4


def test_waiters_get_slots_in_arrival_order(clock: VirtualClock) -> None:
    """When a slot frees up, the task that has waited longest gets it."""

    async def main() -> list[int]:
        limiter = Limiter(1, clock=clock)
        order: list[int] = []
        await limiter.acquire()

        async def task(i: int) -> None:
            await limiter.acquire()
            order.append(i)
            limiter.release()

        tasks = []
        for i in range(5):
            tasks.append(asyncio.create_task(task(i)))
            await settle()
        limiter.release()
        await asyncio.gather(*tasks)
        return order

    assert run(main) == [0, 1, 2, 3, 4]


def test_cancelled_waiter_does_not_leak_a_slot(clock: VirtualClock) -> None:
    """A task cancelled while waiting for a slot leaves the count of active slots right."""

    async def main() -> int:
        limiter = Limiter(1, clock=clock)
        await limiter.acquire()
        waiter = asyncio.create_task(limiter.acquire())
        await settle()
        waiter.cancel()
        await settle()
        limiter.release()
        await limiter.acquire()  # the freed slot is available, not lost to the cancelled task
        active = limiter.active
        limiter.release()
        return active

    assert run(main) == 1


def test_cancelled_during_the_rate_wait_gives_back_its_slot(clock: VirtualClock) -> None:
    """A task cancelled while waiting out a cooldown releases the slot it held."""

    async def main() -> int:
        limiter = Limiter(2, clock=clock)
        limiter.on_rate_limited(30.0)
        clock.frozen = True
        waiter = asyncio.create_task(limiter.acquire())
        await settle()
        assert limiter.active == 1  # it holds a slot while it waits for the rate budget
        waiter.cancel()
        await settle()
        return limiter.active

    assert run(main) == 0


# --------------------------------------------------------------------------------------------
# Rate budgets
# --------------------------------------------------------------------------------------------
def test_rpm_admits_about_rate_times_time(clock: VirtualClock) -> None:
    """At 600 rpm, 10 virtual seconds admit the burst (5) plus 10 a second, one at a time."""

    async def main() -> int:
        limiter = Limiter(100, rpm=600, clock=clock)
        start = clock.now
        admitted = 0
        while True:
            await limiter.acquire()
            limiter.release()
            if clock.now - start > 10.0 + 1e-6:
                return admitted
            admitted += 1

    assert run(main) in (104, 105, 106)


def test_rpm_is_shared_by_concurrent_tasks(clock: VirtualClock) -> None:
    """50 concurrent tasks taking 150 requests at 600 rpm together need (150 - 5) / 10 s."""

    async def main() -> float:
        limiter = Limiter(50, rpm=600, clock=clock)
        start = clock.now
        await asyncio.gather(*(acquire_many(limiter, 3) for _ in range(50)))
        return clock.now - start

    assert run(main) == pytest.approx(14.5, abs=0.01)


def test_tpm_charges_each_requests_tokens(clock: VirtualClock) -> None:
    """At 6,000 tpm (100 a second, burst 50) two 25-token requests pass, the third waits 0.25 s;
    a request with no token count is not charged."""

    async def main() -> list[float]:
        limiter = Limiter(10, tpm=6000, clock=clock)
        start = clock.now
        times = []
        for tokens in (25, 25, 0, 25):
            await limiter.acquire(tokens)
            limiter.release()
            times.append(clock.now - start)
        return times

    assert run(main) == pytest.approx([0.0, 0.0, 0.0, 0.25])


def test_tpm_oversize_request_is_admitted_and_delays_the_next(clock: VirtualClock) -> None:
    """A request above the token burst does not wait forever; its cost delays what follows."""

    async def main() -> list[float]:
        limiter = Limiter(10, tpm=6000, clock=clock)
        start = clock.now
        await limiter.acquire(500)
        limiter.release()
        first = clock.now - start
        await limiter.acquire(10)
        limiter.release()
        return [first, clock.now - start]

    assert run(main) == pytest.approx([0.0, 4.6])


# --------------------------------------------------------------------------------------------
# 429 feedback: cooldown and AIMD
# --------------------------------------------------------------------------------------------
def test_rate_limited_sets_a_cooldown_that_delays_acquire(clock: VirtualClock) -> None:
    """A 429 with retry-after 2 s holds every new request for 2 s, then lets them out 1 s apart."""

    async def main() -> float:
        limiter = Limiter(8, clock=clock)
        limiter.on_rate_limited(2.0)
        assert limiter.cooldown_remaining() == pytest.approx(2.0)
        start = clock.now
        await asyncio.gather(*(acquire_many(limiter, 1) for _ in range(3)))
        return clock.now - start

    # Released at 2 s, 3 s and 4 s: not all at once when the cooldown ends.
    assert run(main) == pytest.approx(4.0)


def test_rate_limited_without_retry_after_pauses_a_second(clock: VirtualClock) -> None:
    """A 429 that names no wait pauses new requests for one second."""
    limiter = Limiter(8, clock=clock)
    limiter.on_rate_limited(None)
    assert limiter.cooldown_remaining() == pytest.approx(1.0)


def test_rate_limited_halves_the_limit_once_per_window(clock: VirtualClock) -> None:
    """A storm of 429s at once halves the limit once; later windows halve it again, down to 1."""
    limiter = Limiter(8, clock=clock)
    for _ in range(20):
        limiter.on_rate_limited(0.1)
    assert limiter.limit == 4
    clock.advance(1.5)
    limiter.on_rate_limited(0.1)
    assert limiter.limit == 2
    for _ in range(10):
        clock.advance(1.5)
        limiter.on_rate_limited(0.1)
    assert limiter.limit == 1


def test_cut_limit_caps_requests_in_flight(clock: VirtualClock) -> None:
    """After a 429 cut from 8 to 4, no more than 4 requests are admitted at once."""
    seen: list[int] = []

    async def main() -> None:
        limiter = Limiter(8, clock=clock)
        limiter.on_rate_limited(0.0)
        inside = 0

        async def task() -> None:
            nonlocal inside
            await limiter.acquire()
            inside += 1
            seen.append(inside)
            await settle(2)
            inside -= 1
            limiter.release()

        await asyncio.gather(*(task() for _ in range(20)))

    run(main)
    assert max(seen) == 4


def test_success_grows_the_limit_back_but_never_above_concurrency(clock: VirtualClock) -> None:
    """After a cut to 4, about one full window of successes adds a slot; many restore 8, no more."""
    limiter = Limiter(8, clock=clock)
    limiter.on_rate_limited(0.0)
    assert limiter.limit == 4
    for _ in range(5):
        limiter.on_success()
    assert limiter.limit == 5
    for _ in range(1000):
        limiter.on_success()
    assert limiter.limit == 8


def test_growing_limit_admits_a_waiting_task(clock: VirtualClock) -> None:
    """A task blocked by a cut limit is admitted as soon as a success grows the limit."""

    async def main() -> bool:
        limiter = Limiter(2, clock=clock)
        limiter.on_rate_limited(0.0)  # limit 1
        await limiter.acquire()
        waiter = asyncio.create_task(limiter.acquire())
        await settle()
        assert not waiter.done()
        limiter.on_success()  # limit back to 2, while the first request still holds its slot
        await settle()
        return waiter.done()

    assert run(main)


# --------------------------------------------------------------------------------------------
# configure()
# --------------------------------------------------------------------------------------------
def test_configure_more_concurrency_admits_waiters(clock: VirtualClock) -> None:
    """Raising the concurrency lets a waiting task in without any release."""

    async def main() -> bool:
        limiter = Limiter(1, clock=clock)
        await limiter.acquire()
        waiter = asyncio.create_task(limiter.acquire())
        await settle()
        assert not waiter.done()
        limiter.configure(2, None, None)
        await settle()
        return waiter.done() and limiter.active == 2

    assert run(main)


def test_configure_less_concurrency_holds_new_requests(clock: VirtualClock) -> None:
    """Lowering the concurrency holds new requests until enough slots are released."""

    async def main() -> list[bool]:
        limiter = Limiter(3, clock=clock)
        for _ in range(3):
            await limiter.acquire()
        limiter.configure(1, None, None)
        waiter = asyncio.create_task(limiter.acquire())
        states = []
        for _ in range(3):
            await settle()
            states.append(waiter.done())
            limiter.release()
        await settle()
        states.append(waiter.done())
        return states

    assert run(main) == [False, False, False, True]


def test_configure_sets_and_removes_rate_budgets(clock: VirtualClock) -> None:
    """An rpm given later throttles from then on; rpm=None removes the throttle again."""

    async def main() -> list[float]:
        limiter = Limiter(10, clock=clock)
        start = clock.now
        await acquire_many(limiter, 100)
        unlimited = clock.now - start
        limiter.configure(10, 60, None)  # one a second, burst of one
        start = clock.now
        await acquire_many(limiter, 4)
        limited = clock.now - start
        limiter.configure(10, None, None)
        start = clock.now
        await acquire_many(limiter, 100)
        return [unlimited, limited, clock.now - start]

    assert run(main) == pytest.approx([0.0, 3.0, 0.0])


def test_configure_changes_the_token_budget(clock: VirtualClock) -> None:
    """A tpm given by configure() charges tokens from then on."""

    async def main() -> float:
        limiter = Limiter(10, clock=clock)
        limiter.configure(10, None, 6000)  # 100 tokens a second, burst 50
        start = clock.now
        await acquire_many(limiter, 3, tokens=50)
        return clock.now - start

    assert run(main) == pytest.approx(1.0)


def test_reapplying_the_same_settings_keeps_the_budget_and_the_cut(clock: VirtualClock) -> None:
    """Each batch re-applies its settings; the same values neither refill the rpm burst nor undo
    a 429 cut or cooldown."""

    async def main() -> float:
        limiter = Limiter(8, rpm=60, clock=clock)
        await acquire_many(limiter, 1)  # the burst of one is spent
        limiter.on_rate_limited(0.5)
        limiter.configure(8, 60, None)
        assert limiter.limit == 4
        assert limiter.cooldown_remaining() == pytest.approx(0.5)
        start = clock.now
        await acquire_many(limiter, 1)
        return clock.now - start

    assert run(main) == pytest.approx(1.0)  # the bucket's refill, not a fresh burst


def test_spacing_after_a_429_fades_with_successes(clock: VirtualClock) -> None:
    """Once requests succeed again, the spacing a 429 imposed shrinks until admissions are immediate."""

    async def main() -> float:
        limiter = Limiter(8, clock=clock)
        limiter.on_rate_limited(0.5)
        await acquire_many(limiter, 1)
        limiter.release()
        for _ in range(200):
            limiter.on_success()
        clock.now += 1.0  # past the last spacing
        start = clock.now
        await asyncio.gather(*(acquire_many(limiter, 1) for _ in range(5)))
        return clock.now - start

    assert run(main) == pytest.approx(0.0, abs=1e-3)


def test_new_settings_keep_what_the_endpoint_taught(clock: VirtualClock) -> None:
    """Another batch's settings neither undo a 429 cut nor refill a spent rate budget."""

    async def main() -> tuple[int, float]:
        limiter = Limiter(8, rpm=600, clock=clock)  # 10 a second, 5 of burst
        limiter.on_rate_limited(0.0)
        assert limiter.limit == 4
        limiter.configure(16, 600, None)
        cut = limiter.limit
        for _ in range(5):
            await limiter.acquire()
            limiter.release()
        limiter.configure(16, 1200, None)  # the rate doubles; the spent burst stays spent
        start = clock.now
        await limiter.acquire()
        limiter.release()
        return cut, clock.now - start

    cut, waited = run(main)
    assert cut == 4
    assert waited == pytest.approx(1 / 20, rel=0.01)
