"""The Limiter on a real asyncio loop, with an injected virtual clock.

The limiter's own waits go through ``asyncio.sleep``; the ``clock`` fixture routes them to the
virtual clock, which jumps forward by the delay at once, so minutes of rate limiting take
microseconds and the elapsed virtual time is exact.
"""

from __future__ import annotations

import asyncio
import itertools
import selectors
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest

from polars_llm import limiter as limiter_module
from polars_llm.limiter import CATCH_UP, COOLDOWN_POLL, RATE_SHARE, Limiter, parse_duration
from polars_llm.shared import InProcessState, Meeting, RedisState

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


def spacing(rpm: float) -> float:
    """Seconds between two requests at ``rpm``, as the limiter aims (a little under the limit)."""
    return 60.0 / (rpm * RATE_SHARE)


async def admission_times(limiter: Limiter, tasks: int, each: int, tokens: int = 0) -> list[float]:
    """When each of ``tasks * each`` requests was admitted, by tasks running concurrently."""
    times: list[float] = []

    async def task() -> None:
        for _ in range(each):
            await limiter.acquire(tokens)
            times.append(clock_of(limiter)())
            limiter.release()

    await asyncio.gather(*(task() for _ in range(tasks)))
    return sorted(times)


def clock_of(limiter: Limiter) -> Callable[[], float]:
    return limiter._clock


def busiest_second(times: list[float]) -> int:
    """The most requests in any one-second window, wherever the server's windows begin."""
    return max(
        sum(1 for t in times if start <= t < start + 1.0)
        for start in times  # a window starting at each admission covers every case
    )


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
# Rate budgets: spaced, never bursting
# --------------------------------------------------------------------------------------------
def test_rpm_spaces_requests_evenly(clock: VirtualClock) -> None:
    """At 600 rpm requests are admitted one spacing apart, from the first one on: no burst."""

    async def main() -> list[float]:
        return await admission_times(Limiter(100, rpm=600, clock=clock), 1, 20)

    times = run(main)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert gaps == pytest.approx([spacing(600)] * 19)


def test_rpm_is_shared_by_concurrent_tasks(clock: VirtualClock) -> None:
    """50 concurrent tasks taking 150 requests at 600 rpm need 149 spacings, not less."""

    async def main() -> list[float]:
        return await admission_times(Limiter(50, rpm=600, clock=clock), 50, 3)

    times = run(main)
    assert times[-1] - times[0] == pytest.approx(149 * spacing(600))


def test_every_one_second_window_stays_under_the_limit(clock: VirtualClock) -> None:
    """At 3,000 rpm (50 a second), no one-second window, wherever it starts, sees more than
    50 admissions, and the limit is used to at least 90%."""

    async def main() -> list[float]:
        return await admission_times(Limiter(64, rpm=3000, clock=clock), 64, 10)

    times = run(main)
    assert busiest_second(times) <= 50
    assert len(times) / (times[-1] - times[0] + spacing(3000)) >= 0.9 * 50


def test_idle_time_is_not_saved_up_as_a_burst(clock: VirtualClock) -> None:
    """After an hour idle, the first request goes at once and the next still waits a spacing."""

    async def main() -> list[float]:
        limiter = Limiter(10, rpm=600, clock=clock)
        await acquire_many(limiter, 3)
        clock.advance(3600)
        return await admission_times(limiter, 1, 3)

    times = run(main)
    assert times[1] - times[0] == pytest.approx(spacing(600))
    assert times[2] - times[1] == pytest.approx(spacing(600))


def test_a_late_wake_catches_up_only_a_little(clock: VirtualClock) -> None:
    """When the loop stalls for a second, the requests due meanwhile do not all go at once:
    only the catch-up allowance's worth does."""

    async def main() -> list[float]:
        limiter = Limiter(100, rpm=6000, clock=clock)
        await acquire_many(limiter, 1)
        clock.advance(1.0)  # a stall: a hundred requests' worth of time passes unseen
        return await admission_times(limiter, 20, 1)

    times = run(main)
    at_once = sum(1 for t in times if t == times[0])
    assert at_once <= 1 + int(CATCH_UP / spacing(6000))
    assert at_once < 6000 / 60 * 0.05  # within the 5% headroom of a one-second window


def test_tpm_charges_each_requests_tokens(clock: VirtualClock) -> None:
    """At 6,000 tpm a 25-token request takes a quarter of a second of budget; a request with no
    token count is not charged."""

    async def main() -> list[float]:
        limiter = Limiter(10, tpm=6000, clock=clock)
        start = clock.now
        times = []
        for tokens in (25, 25, 0, 25):
            await limiter.acquire(tokens)
            limiter.release()
            times.append(clock.now - start)
        return times

    quarter = 25 * spacing(6000)
    assert run(main) == pytest.approx([0.0, quarter, quarter, 2 * quarter])


def test_tpm_oversize_request_is_admitted_and_delays_the_next(clock: VirtualClock) -> None:
    """A request of five seconds' worth of tokens goes at once; the next waits those seconds."""

    async def main() -> list[float]:
        limiter = Limiter(10, tpm=6000, clock=clock)
        start = clock.now
        await limiter.acquire(500)
        limiter.release()
        first = clock.now - start
        await limiter.acquire(10)
        limiter.release()
        return [first, clock.now - start]

    assert run(main) == pytest.approx([0.0, 500 * spacing(6000)])


# --------------------------------------------------------------------------------------------
# One budget for several processes
# --------------------------------------------------------------------------------------------
class _IdleSkippingSelector(selectors.DefaultSelector):
    """Waits no real time: a wait for I/O or a timer moves the virtual clock instead."""

    def __init__(self, clock: VirtualClock) -> None:
        super().__init__()
        self.clock = clock

    def select(self, timeout: float | None = None) -> list:  # type: ignore[override]
        ready = super().select(0)
        if not ready and timeout:
            self.clock.advance(timeout)
        return ready


def run_in_virtual_time(clock: VirtualClock, make: Callable[[], Awaitable[T]]) -> T:
    """Run on a loop whose time is ``clock`` and that skips idle time, so tasks sleeping at once
    wake in the order of their deadlines, as on a real clock."""
    loop = asyncio.SelectorEventLoop(_IdleSkippingSelector(clock))
    loop.time = clock  # type: ignore[method-assign]
    try:
        return loop.run_until_complete(make())
    finally:
        loop.close()


def test_limiters_sharing_a_home_share_one_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two limiters (two processes) told the same 600 rpm over one home together stay under
    10 a second, and together use the whole budget."""
    clock = VirtualClock()

    async def main() -> list[float]:
        home = InProcessState(clock)
        a = Limiter(32, rpm=600, clock=clock, shared=home, scope="s")
        b = Limiter(32, rpm=600, clock=clock, shared=home, scope="s")
        both = await asyncio.gather(admission_times(a, 32, 5), admission_times(b, 32, 5))
        return sorted(both[0] + both[1])

    times = run_in_virtual_time(clock, main)
    assert busiest_second(times) <= 10
    assert times[-1] - times[0] == pytest.approx(319 * spacing(600), rel=0.02)


def test_a_429_in_one_process_pauses_the_others(clock: VirtualClock) -> None:
    """A 429 seen by one limiter holds back another that shares its home, limit known or not."""

    async def main() -> list[float]:
        home = InProcessState(clock)
        hit = Limiter(8, clock=clock, shared=home, scope="s")
        others = [
            Limiter(8, clock=clock, shared=home, scope="s"),
            Limiter(8, rpm=600, clock=clock, shared=home, scope="s"),
        ]
        hit.on_rate_limited(5.0)
        await settle()  # the pause reaches the home
        start = clock.now
        waits = []
        for limiter in others:
            await acquire_many(limiter, 1)
            waits.append(clock.now - start)
        return waits

    assert run(main) == pytest.approx([5.0, 5.0], abs=0.01)


def test_a_429_elsewhere_mid_run_holds_a_limiter_from_its_next_poll(clock: VirtualClock) -> None:
    """A limiter already sending, with no limit known, asks the home about holds in the
    background, once per COOLDOWN_POLL: requests never wait on that question, and another
    process's 429 holds them from the next poll until its pause ends."""

    async def main() -> tuple[int, bool, float, int]:
        home = InProcessState(clock)
        runner = Limiter(8, clock=clock, shared=home, scope="s")
        await acquire_many(runner, 1)  # met the home: polled, the next poll is due later
        polls = []
        real_reserve = home.reserve

        async def counted(scope: str, seconds: float) -> float:
            polls.append(seconds)
            return await real_reserve(scope, seconds)

        home.reserve = counted  # type: ignore[method-assign]
        await acquire_many(runner, 50)  # within one poll: no question asked
        quiet = len(polls)
        await home.pause("s", 5.0)  # another process's 429
        clock.advance(COOLDOWN_POLL)
        before = clock.now
        await acquire_many(runner, 1)  # goes at once; the poll it starts learns the hold
        went_at_once = clock.now == before
        await settle()
        start = clock.now
        await acquire_many(runner, 1)
        return quiet, went_at_once, clock.now - start, len(polls)

    quiet, went_at_once, held, polls = run(main)
    assert quiet == 0
    assert went_at_once
    assert polls == 1
    assert held == pytest.approx(5.0 - COOLDOWN_POLL, abs=0.01)


def test_a_broken_home_warns_once_and_goes_on_alone(clock: VirtualClock) -> None:
    """With its Redis server gone, a limiter warns and keeps spacing requests by itself."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    async def main() -> list[float]:
        home = RedisState(f"redis://127.0.0.1:{port}/0")
        limiter = Limiter(10, rpm=600, clock=clock, shared=home, scope="s")
        times = await admission_times(limiter, 1, 5)
        await home.aclose()
        return times

    with pytest.warns(
        UserWarning, match=r"Redis server is up.*without sharing the rate budget"
    ) as caught:
        times = run(main)
    assert len(caught) == 1
    assert times[-1] - times[0] == pytest.approx(4 * spacing(600))


# --------------------------------------------------------------------------------------------
# What answers teach: limits from headers, tokens from usage
# --------------------------------------------------------------------------------------------
def test_limits_are_learned_from_headers(clock: VirtualClock) -> None:
    """With no limit configured, the x-ratelimit-limit-* headers set the spacing."""

    async def main() -> list[float]:
        limiter = Limiter(10, clock=clock)
        limiter.observe(
            {"X-RateLimit-Limit-Requests": "600", "X-RateLimit-Remaining-Requests": "599"}, 0, 0
        )
        return await admission_times(limiter, 1, 3)

    times = run(main)
    assert times[2] - times[0] == pytest.approx(2 * spacing(600))


def test_a_configured_limit_wins_over_headers(clock: VirtualClock) -> None:
    """A configured rpm is kept even when the headers name another limit."""
    limiter = Limiter(10, rpm=60, clock=clock)
    limiter.observe({"x-ratelimit-limit-requests": "6000", "x-ratelimit-limit-tokens": "9"}, 0, 0)
    assert (limiter.rpm, limiter.tpm) == (60, 9)


def test_a_spent_budget_in_the_headers_pauses_until_it_refills(clock: VirtualClock) -> None:
    """remaining 0 with a reset of 400 ms holds new requests for 400 ms; a long reset is cut
    to about one request's refill."""
    limiter = Limiter(10, clock=clock)
    limiter.observe(
        {
            "x-ratelimit-limit-requests": "3000",
            "x-ratelimit-remaining-requests": "0",
            "x-ratelimit-reset-requests": "400ms",
        },
        0,
        0,
    )
    assert limiter.cooldown_remaining() == pytest.approx(0.4)
    clock.advance(1.0)
    limiter.observe(
        {
            "x-ratelimit-limit-requests": "3000",
            "x-ratelimit-remaining-requests": "0",
            "x-ratelimit-reset-requests": "6m0s",
        },
        0,
        0,
    )
    assert limiter.cooldown_remaining() == pytest.approx(1.0)


def test_token_estimate_is_calibrated_from_usage(clock: VirtualClock) -> None:
    """Four characters a token until answers say otherwise; then the endpoint's own ratio."""
    limiter = Limiter(10, clock=clock)
    assert limiter.tokens_for(400) == 101
    limiter.observe({}, 100, 10)  # too little seen to trust
    assert limiter.tokens_for(400) == 101
    for _ in range(30):
        limiter.observe({}, 1000, 500)  # code or non-English text: two characters a token
    assert limiter.tokens_for(400) == pytest.approx(200, abs=2)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("120ms", 0.12), ("1s", 1.0), ("1.5s", 1.5), ("6m0s", 360.0), ("1h2m3s", 3723.0), ("7", 7.0)],
)
def test_reset_durations_are_read_as_openai_writes_them(text: str, seconds: float) -> None:
    """Reset headers in OpenAI's forms, and bare seconds, become seconds."""
    assert parse_duration(text) == pytest.approx(seconds)


def test_unreadable_reset_durations_are_ignored() -> None:
    """A reset header that is not a duration is read as none."""
    assert [parse_duration(t) for t in ("soon", "5x", "", None)] == [None, None, None, None]


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
    """An rpm given later spaces requests from then on; rpm=None removes the spacing again."""

    async def main() -> list[float]:
        limiter = Limiter(10, clock=clock)
        start = clock.now
        await acquire_many(limiter, 100)
        unlimited = clock.now - start
        limiter.configure(10, 60, None)
        start = clock.now
        await acquire_many(limiter, 4)
        limited = clock.now - start
        limiter.configure(10, None, None)
        start = clock.now
        await acquire_many(limiter, 100)
        return [unlimited, limited, clock.now - start]

    assert run(main) == pytest.approx([0.0, 3 * spacing(60), 0.0])


def test_configure_changes_the_token_budget(clock: VirtualClock) -> None:
    """A tpm given by configure() charges tokens from then on."""

    async def main() -> float:
        limiter = Limiter(10, clock=clock)
        limiter.configure(10, None, 6000)
        start = clock.now
        await acquire_many(limiter, 3, tokens=50)
        return clock.now - start

    assert run(main) == pytest.approx(100 * spacing(6000))


def test_reapplying_the_same_settings_keeps_the_budget_and_the_cut(clock: VirtualClock) -> None:
    """Each batch re-applies its settings; the same values neither give back budget already
    taken nor undo a 429 cut or cooldown."""

    async def main() -> float:
        limiter = Limiter(8, rpm=60, clock=clock)
        await acquire_many(limiter, 1)
        limiter.on_rate_limited(0.5)
        limiter.configure(8, 60, None)
        assert limiter.limit == 4
        assert limiter.cooldown_remaining() == pytest.approx(0.5)
        start = clock.now
        await acquire_many(limiter, 1)
        return clock.now - start

    assert run(main) == pytest.approx(spacing(60))  # the spacing, not a fresh start


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
    """Another batch's settings neither undo a 429 cut nor give back budget already taken."""

    async def main() -> tuple[int, float]:
        limiter = Limiter(8, rpm=600, clock=clock)
        limiter.on_rate_limited(0.0)
        assert limiter.limit == 4
        limiter.configure(16, 600, None)
        cut = limiter.limit
        await acquire_many(limiter, 5)
        limiter.configure(16, 1200, None)  # the rate doubles; the last request's slice stays
        start = clock.now
        await acquire_many(limiter, 1)
        return cut, clock.now - start

    cut, waited = run(main)
    assert cut == 4
    assert waited == pytest.approx(spacing(600), rel=0.01)


class Crowded(InProcessState):
    """A home through which other processes send too (as a SQLite file's may)."""

    async def meet(self, scope: str) -> Meeting:
        return Meeting(True)


def test_probe_sends_one_request_until_the_endpoint_answers(clock: VirtualClock) -> None:
    """With probe, no limit configured and other processes sharing the home, a second request
    waits for the first answer, whose headers then space the rest; with a limit configured
    nothing waits for an answer."""

    async def main() -> tuple[bool, bool, int]:
        limiter = Limiter(8, clock=clock, probe=True, shared=Crowded(clock))
        await limiter.acquire()
        second = asyncio.create_task(limiter.acquire())
        await settle()
        held = not second.done()
        limiter.observe({"x-ratelimit-limit-requests": "600"}, 10, 3)
        limiter.release()
        await settle()
        told = Limiter(8, rpm=600, clock=clock, probe=True, shared=Crowded(clock))
        await told.acquire()
        return held, second.done(), told.limit

    held, admitted, told_limit = run(main)
    assert held and admitted
    assert told_limit == 8


def test_a_process_alone_sends_at_once_without_a_probe(clock: VirtualClock) -> None:
    """Alone on its home, a limiter with probe lets the whole concurrency go at once: a bad key
    stops everything at its first answer anyway, and no other process bursts beside it."""

    async def main() -> int:
        limiter = Limiter(8, clock=clock, probe=True)
        tasks = [asyncio.create_task(limiter.acquire()) for _ in range(8)]
        await settle()
        return sum(task.done() for task in tasks)

    assert run(main) == 8


def test_a_burst_sent_before_the_limit_was_known_is_charged_to_the_shared_timeline(
    clock: VirtualClock,
) -> None:
    """Requests sent with no limit known, then a limit learned from headers: the shared
    timeline is pushed past them, so another process's budget starts after the burst."""

    async def main() -> float:
        home = InProcessState(clock)
        limiter = Limiter(8, clock=clock, shared=home, scope="s")
        await acquire_many(limiter, 5)
        limiter.observe({"x-ratelimit-limit-requests": "600"}, 10, 3)
        await settle()
        return await home.reserve("s", 0.0)

    held = run(main)
    assert held == pytest.approx(5 * 60 / (600 * RATE_SHARE), rel=0.01)


class EarlyWakingClock(VirtualClock):
    """Sleeps end half a millisecond early (uvloop's timers count whole milliseconds), and time
    moves on a little between two readings."""

    def __call__(self) -> float:
        self.now += 0.0003
        return self.now

    async def sleep(self, delay: float, result: Any = None) -> Any:
        return await super().sleep(max(0.0, delay - 0.0005), result)


def test_a_cooldown_ended_by_an_early_sleep_admits_requests_without_a_rate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With no rate limit, a request held by a cooldown goes once it is over, even when the
    sleep ends just before it and the clock passes it between two readings."""
    early = EarlyWakingClock()
    monkeypatch.setattr(limiter_module, "asyncio", _AsyncioWithVirtualSleep(early.sleep))

    async def main() -> float:
        limiter = Limiter(4, clock=early)
        limiter.on_rate_limited(1.0)
        until = early.now + 1.0
        await asyncio.gather(*(acquire_many(limiter, 1) for _ in range(3)))
        return early.now - until

    assert run(main) >= 0
