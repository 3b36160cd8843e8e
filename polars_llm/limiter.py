"""Per-endpoint admission control: concurrency, requests/tokens per minute, and 429 cooldown.

A Limiter lives on the engine's single event loop (see engine.py). Every batch of every thread in
the process submits its work to that loop, so confining the limiter to it makes it process-wide
without a thread lock, and no waiting ever blocks an executor thread.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable

# The client's rate budgets allow half a second's worth of burst, half of what providers usually
# tolerate (about one second's worth), so jitter in network delay does not turn into 429s.
CLIENT_BURST_SECONDS = 0.5


class TokenBucket:
    """A budget of ``per_minute`` units refilled continuously (smoothed per second, not per minute)."""

    def __init__(self, per_minute: float, burst_seconds: float, clock: Callable[[], float]) -> None:
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate * burst_seconds)
        self.level = self.capacity
        self._clock = clock
        self._stamp = clock()

    def _refill(self) -> None:
        now = self._clock()
        self.level = min(self.capacity, self.level + (now - self._stamp) * self.rate)
        self._stamp = now

    def wait_time(self, amount: float) -> float:
        """Seconds until ``amount`` fits; an amount above capacity waits for a full bucket."""
        self._refill()
        need = min(amount, self.capacity)
        return 0.0 if self.level >= need else (need - self.level) / self.rate

    def take(self, amount: float) -> None:
        self._refill()
        # May go negative for an amount above capacity: the debt delays the next requests.
        self.level -= amount


class Limiter:
    """Admission for one endpoint: ``await acquire(tokens)`` before a request, ``release`` after."""

    def __init__(
        self,
        concurrency: int,
        rpm: int | None = None,
        tpm: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._max = concurrency
        self._limit = float(concurrency)  # adaptive: cut on 429, grown back on success
        self._active = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._rate_lock = asyncio.Lock()
        self._rpm: TokenBucket | None = None
        self._tpm: TokenBucket | None = None
        self._rpm_value: int | None = None
        self._tpm_value: int | None = None
        self._cooldown_until = 0.0
        # After a 429, admissions are spaced at least this far apart, so the end of a cooldown
        # lets requests out at about the rate the endpoint allows instead of all at once.
        # Shrinks with each success until it vanishes.
        self._spacing = 0.0
        self._last_cut = -1e9
        self.consecutive_failures = 0  # 5xx, timeouts, connection errors since the last success
        self.configure(concurrency, rpm, tpm)

    # -- settings --------------------------------------------------------------------------
    def configure(self, concurrency: int, rpm: int | None, tpm: int | None) -> None:
        """Apply a batch's settings; the most recent call's settings win for the endpoint.

        What the endpoint taught us stays: a limit cut by 429s stays cut (up to the new
        concurrency), and a bucket keeps its level when only its rate changes, so two
        expressions with different settings cannot refill each other's budget.
        """
        if concurrency != self._max:
            cut = self._limit < self._max
            self._max = concurrency
            self._limit = min(self._limit, float(concurrency)) if cut else float(concurrency)
        if rpm != self._rpm_value:
            self._rpm_value = rpm
            self._rpm = self._rebucket(self._rpm, rpm)
        if tpm != self._tpm_value:
            self._tpm_value = tpm
            self._tpm = self._rebucket(self._tpm, tpm)
        self._wake()

    def _rebucket(self, bucket: TokenBucket | None, per_minute: int | None) -> TokenBucket | None:
        if not per_minute:
            return None
        fresh = TokenBucket(per_minute, CLIENT_BURST_SECONDS, self._clock)
        if bucket is not None:
            bucket._refill()
            fresh.level = min(fresh.capacity, bucket.level)
        return fresh

    @property
    def max_concurrency(self) -> int:
        """The configured concurrency."""
        return self._max

    @property
    def limit(self) -> int:
        """Requests allowed in flight right now (adaptive, at most the configured concurrency)."""
        return max(1, int(self._limit))

    @property
    def active(self) -> int:
        return self._active

    # -- admission -------------------------------------------------------------------------
    async def acquire(self, tokens: int = 0) -> None:
        """Wait for a concurrency slot, then for the rate budgets and any cooldown."""
        await self._acquire_slot()
        try:
            async with self._rate_lock:  # FIFO: the longest waiter is served first
                while True:
                    wait = self._cooldown_until - self._clock()
                    if self._rpm is not None:
                        wait = max(wait, self._rpm.wait_time(1))
                    if self._tpm is not None and tokens:
                        wait = max(wait, self._tpm.wait_time(tokens))
                    if wait <= 0:
                        break
                    await asyncio.sleep(wait)
                if self._rpm is not None:
                    self._rpm.take(1)
                if self._tpm is not None and tokens:
                    self._tpm.take(tokens)
                if self._spacing:
                    self._cooldown_until = max(self._cooldown_until, self._clock() + self._spacing)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Give back the slot taken by ``acquire``."""
        self._active -= 1
        self._wake()

    async def _acquire_slot(self) -> None:
        if self._active < self.limit and not self._waiters:
            self._active += 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled():
                # We were handed a slot just as we were cancelled: pass it on.
                self._active -= 1
                self._wake()
            raise

    def _wake(self) -> None:
        while self._waiters and self._active < self.limit:
            fut = self._waiters.popleft()
            if not fut.done():
                self._active += 1
                fut.set_result(None)

    # -- feedback --------------------------------------------------------------------------
    def on_success(self) -> None:
        """Grow the adaptive limit back by about one slot per full window of successes."""
        self.consecutive_failures = 0
        self._spacing = 0.0 if self._spacing < 1e-3 else self._spacing * 0.9
        if self._limit < self._max:
            self._limit = min(float(self._max), self._limit + 1.0 / self._limit)
            self._wake()

    def on_failure(self) -> None:
        """A 5xx, timeout or connection error: counted until the next success."""
        self.consecutive_failures += 1

    def on_rate_limited(self, retry_after: float | None) -> None:
        """A 429: pause new requests to this endpoint and cut the concurrency limit."""
        now = self._clock()
        pause = retry_after if retry_after is not None else 1.0
        self._cooldown_until = max(self._cooldown_until, now + pause)
        self._spacing = max(self._spacing, min(pause, 1.0))
        # Many in-flight requests see the same 429 storm: cut once per window, not per answer.
        if now - self._last_cut > max(pause, 1.0):
            self._last_cut = now
            self._limit = max(1.0, self._limit / 2)

    def cooldown_remaining(self) -> float:
        return max(0.0, self._cooldown_until - self._clock())
