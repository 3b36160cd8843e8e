"""One endpoint, API key and model: transport, admission, health and retry policy behind ``send``.

An :class:`EndpointClient` lives on the engine loop (see engine.py) and is shared by every batch
of the process that calls the same base URL with the same key and model. It owns:

- the transport (one long-lived HTTP client) and the limiter (concurrency, RPM/TPM, cooldown);
- the health of the endpoint: whether anything there ever answered, and a *stop* when the key or
  model is bad, the account is out of quota, nothing is there, or every request keeps failing.
  A stop ends every batch on this endpoint at once: it costs one call, not one per row;
- the retry policy: 5xx, timeouts and connection errors up to ``max_attempts``, 429s until the
  row's ``retry_budget`` runs out, waits honouring the endpoint's retry-after (capped);
- the watch on hung requests: a request in flight far longer than the endpoint's recent latency
  gives back its concurrency slot and is *hedged* (sent again; the first answer wins and the
  other is cancelled), so stalled connections never freeze a batch.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from .errors import (
    AuthError,
    BatchAborted,
    ConnectionFailed,
    FatalError,
    ModelNotFound,
    QuotaExceeded,
    RateLimited,
    RequestTimeout,
    RetryableError,
    RowError,
)
from .limiter import Limiter
from .progress import Progress
from .settings import Settings
from .shared import open_shared, scope_for
from .transport import Transport, make_transport

T = TypeVar("T")

# The embedded model's server decodes one request at a time; more in flight only queue there.
LOCAL_CONCURRENCY = 2
# Attempts against an endpoint that has never answered, before everything on it stops.
NEVER_REACHED_ATTEMPTS = 3
# Requests failing in a row (5xx, timeouts, connection errors) before everything stops: at least
# this, and at least twice the concurrency.
BREAKER_FAILURES = 50
# Requests refused (400-like) before an endpoint, key and model ever answered, before stopping:
# the endpoint likely rejects the request's shape (e.g. response_format), not one row.
REFUSALS_BEFORE_STOP = 3
# The longest wait a server's retry-after can impose. A larger value (100000, inf) is a server's
# bug, not an instruction to wait a day; and no wait outlives the row's retry budget.
MAX_RETRY_AFTER = 60.0
# A request is suspected hung once in flight longer than HEDGE_FACTOR times the endpoint's
# recent 95th-percentile latency, and never before HEDGE_FLOOR seconds.
HEDGE_FACTOR = 4.0
HEDGE_FLOOR = 2.0
# Hedging only when that is at most this share of the request's timeout.
HEDGE_BEFORE_TIMEOUT = 0.5
# Hedges of one request at most: a hedge that hangs too is hedged in turn, this many times.
MAX_HEDGES = 3
# Latencies kept, and how many are needed before anything is judged hung.
LATENCY_WINDOW = 256
LATENCY_MIN_SAMPLES = 8
# Seconds between two looks at the requests in flight.
WATCH_EVERY = 0.25
# Seconds a stop lasts: long enough to end the batches that run now, short enough that a fixed
# key or a recovered endpoint works in the next batch without restarting the process.
STOP_FOR = 30.0


@dataclass(frozen=True)
class RetryPolicy:
    """How patiently one request is sent: from a batch's settings."""

    timeout: float
    max_attempts: int
    retry_budget: float
    backoff_base: float
    backoff_max: float

    @classmethod
    def of(cls, settings: Settings) -> RetryPolicy:
        return cls(
            timeout=float(settings.timeout),
            max_attempts=settings.max_attempts,
            retry_budget=float(settings.retry_budget),
            backoff_base=float(settings.backoff_base),
            backoff_max=float(settings.backoff_max),
        )


def backoff(attempt: int, base: float, cap: float) -> float:
    """Capped exponential backoff with full jitter before attempt ``attempt + 1``."""
    return random.uniform(0, min(cap, base * 2 ** (attempt - 1)))


_NOTHING: Any = object()


class _Attempt:
    """One request in flight, as the watchdog sees it."""

    __slots__ = (
        "call",
        "deadline",
        "ended",
        "hedge",
        "hedges_left",
        "holds_slot",
        "policy",
        "progress",
        "result",
        "started",
        "task",
        "tokens",
    )

    def __init__(
        self,
        task: asyncio.Task[Any],
        call: Callable[[], Awaitable[Any]],
        tokens: int,
        policy: RetryPolicy,
        progress: Progress,
        hedges_left: int,
    ) -> None:
        self.task = task
        self.call = call
        self.tokens = tokens
        self.policy = policy
        self.progress = progress
        self.hedges_left = hedges_left
        self.started = time.monotonic()
        self.deadline = self.started + policy.timeout
        self.holds_slot = True
        self.hedge: asyncio.Task[Any] | None = None
        self.result: Any = _NOTHING
        # Set by whoever cancels the task to end the request early: its hedge answered
        # ("answered") or its time ran out ("timed out"). Only the first does.
        self.ended: str | None = None


class EndpointClient:
    """Everything about calling one (base URL, key, model); see the module docstring."""

    def __init__(
        self, base_url: str, api_key: str, model: str, settings: Settings, *, local: bool = False
    ) -> None:
        self.base_url = base_url
        self.model = model
        self.local = local
        # ``send`` bounds each whole request, body included, by its batch's timeout: the
        # transport arms no timer of its own.
        self.transport: Transport = make_transport(
            settings.transport, base_url, api_key, None, settings.concurrency
        )
        # With no limit known and other processes sending through the same shared home, one
        # request goes alone until the first answer's x-ratelimit-* headers state the limit.
        self.limiter = Limiter(1, probe=not local)
        # The budget's name in the home shared with other processes (the key only hashed).
        self.scope = scope_for(base_url, api_key, model)
        self.reached = False  # anything there gave an HTTP answer
        self.verified = False  # this key and model got a successful answer
        self.calls = 0
        self.last_used = time.monotonic()
        self._stop: BatchAborted | None = None
        self._stop_until = 0.0
        self._refusals = 0
        self._unreached_failures = 0
        self._latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._answers = 0
        self._hedge_after = float("inf")
        self._inflight: dict[asyncio.Task[Any], _Attempt] = {}
        self._watchdog: asyncio.Task[None] | None = None
        # When the watchdog looks next, and the future its sleep ends with.
        self._watch_at = float("inf")
        self._watch_wake: asyncio.Future[None] | None = None

    def configure(self, settings: Settings) -> None:
        """Apply a batch's limits; the most recent batch's settings win for the endpoint."""
        concurrency = settings.concurrency
        if self.local:
            concurrency = min(concurrency, LOCAL_CONCURRENCY)
        self.limiter.configure(concurrency, settings.rpm, settings.tpm)
        if not self.local:  # the embedded model's server belongs to this process alone
            self.limiter.share(open_shared(settings), self.scope)
        self.last_used = time.monotonic()

    @property
    def idle(self) -> bool:
        """Nothing in flight."""
        return not self._inflight

    async def aclose(self) -> None:
        """Close the transport's connections."""
        await self.transport.aclose()

    # -- health -----------------------------------------------------------------------------
    @property
    def stopped(self) -> BatchAborted | None:
        """Why every batch on this endpoint stops now, or None."""
        if self._stop is not None and time.monotonic() >= self._stop_until:
            self._stop = None
        return self._stop

    def _halt(self, error: RowError) -> BatchAborted:
        if self.stopped is None:
            self._stop = BatchAborted(
                f"stopped after {self.calls} call(s) to {self.base_url}: {error.message}", error
            )
            self._stop_until = time.monotonic() + STOP_FOR
        assert self._stop is not None
        return self._stop

    def _check_breaker(self, error: RetryableError) -> None:
        """Stop when the endpoint keeps failing for everyone (it went down mid-run)."""
        if isinstance(error, RateLimited):
            return
        failures = self.limiter.consecutive_failures
        if failures >= max(BREAKER_FAILURES, 2 * self.limiter.max_concurrency):
            raise self._halt(
                type(error)(
                    f"{failures} requests in a row failed with no success in between; last: "
                    f"{error.message}. The endpoint seems down; check it, then rerun (answers "
                    "so far are cached)."
                )
            )

    # -- sending ----------------------------------------------------------------------------
    async def send(
        self,
        call: Callable[[], Awaitable[T]],
        *,
        tokens: int,
        policy: RetryPolicy,
        progress: Progress,
    ) -> T:
        """``call()``'s answer, under the limiter and the retry policy.

        Raises the final ``RowError`` of this request, or ``BatchAborted`` when the endpoint is
        stopped (then every other request on it stops too).
        """
        deadline = time.monotonic() + policy.retry_budget
        attempt = failures = 0
        while True:
            stop = self.stopped
            if stop is not None:
                raise stop
            attempt += 1
            if attempt > 1:
                progress.retries += 1
            try:
                return await self._attempt(call, tokens, policy, progress, MAX_HEDGES)
            except RetryableError as e:
                # A 429 says "later", not "broken": only the time budget bounds those retries,
                # while other failures also count against max_attempts.
                failures += not isinstance(e, RateLimited)
                delay = backoff(attempt, policy.backoff_base, policy.backoff_max)
                if e.retry_after is not None:
                    delay = max(delay, min(e.retry_after, MAX_RETRY_AFTER))
                limit = policy.max_attempts
                if isinstance(e, ConnectionFailed) and not self.reached:
                    # Nothing there has ever answered: a few tries tell a mistyped or dead
                    # endpoint from a blip, without minutes of backoff.
                    limit = min(limit, NEVER_REACHED_ATTEMPTS)
                    self._unreached_failures += 1
                    if self._unreached_failures >= NEVER_REACHED_ATTEMPTS:
                        raise self._halt(
                            ConnectionFailed(
                                f"{e.message}. Nothing at {self.base_url} has answered; check "
                                "the endpoint URL ($OPENAI_BASE_URL, base_url= or --base-url) "
                                "and that the server is up."
                            )
                        ) from None
                self._check_breaker(e)
                if failures >= limit or time.monotonic() + delay > deadline:
                    raise _exhausted(e, attempt) from None
                await asyncio.sleep(delay)
            except FatalError as e:
                if isinstance(e, (AuthError, ModelNotFound, QuotaExceeded)):
                    raise self._halt(e) from None
                if not self.verified:
                    self._refusals += 1
                    if self._refusals >= REFUSALS_BEFORE_STOP:
                        raise self._halt(e) from None
                raise

    async def _attempt(
        self,
        call: Callable[[], Awaitable[T]],
        tokens: int,
        policy: RetryPolicy,
        progress: Progress,
        hedges_left: int,
    ) -> T:
        """One request under the limiter and the timeout; its hedge's answer if that came first."""
        limiter = self.limiter
        await limiter.acquire(tokens)
        stop = self.stopped
        if stop is not None:  # stopped while this request waited for its turn: never send it
            limiter.release()
            raise stop
        self.calls += 1
        progress.calls += 1
        task = asyncio.current_task()
        assert task is not None
        entry = _Attempt(task, call, tokens, policy, progress, hedges_left)
        self._inflight[task] = entry
        # The watchdog ends a request whose time is up: no timer of its own per request.
        if self._watchdog is None:
            self._watchdog = asyncio.ensure_future(self._watch())
        elif entry.deadline < self._watch_at:
            self._wake_watchdog()
        try:
            try:
                answer = await call()
            except asyncio.CancelledError:
                # Ended early by the watchdog or by the hedge, unless someone else wants this
                # task cancelled too.
                if entry.ended is not None and task.uncancel() == 0:
                    if entry.ended == "answered":
                        return entry.result
                    raise RequestTimeout(
                        f"no complete answer from {self.base_url} within the timeout "
                        f"({policy.timeout:g} s)"
                    ) from None
                raise
        except RowError as e:
            if e.status is not None:
                self.reached = True
            if isinstance(e, RateLimited):
                limiter.on_rate_limited(
                    None if e.retry_after is None else min(e.retry_after, MAX_RETRY_AFTER)
                )
            elif isinstance(e, RetryableError):
                limiter.on_failure()
            raise
        finally:
            del self._inflight[task]
            if entry.holds_slot:
                limiter.release()
            if entry.hedge is not None and not entry.hedge.done():
                entry.hedge.cancel()
        limiter.observe(getattr(answer, "headers", None) or {}, 0, 0)
        self._answered(time.monotonic() - entry.started)
        return answer

    def _answered(self, seconds: float) -> None:
        self.reached = self.verified = True
        self._unreached_failures = 0
        self.last_used = time.monotonic()
        self.limiter.on_success()
        latencies = self._latencies
        latencies.append(seconds)
        self._answers += 1
        n = len(latencies)
        # The percentile is sorted out every few answers, often at first, then every 64.
        if n >= LATENCY_MIN_SAMPLES and self._answers % (8 if n < LATENCY_WINDOW else 64) == 0:
            p95 = sorted(latencies)[int(0.95 * (n - 1))]
            self._hedge_after = max(HEDGE_FLOOR, HEDGE_FACTOR * p95)

    async def _watch(self) -> None:
        """End the requests whose time is up and hedge those that hang, while any request is
        in flight: every WATCH_EVERY seconds, and when the next timeout is due."""
        loop = asyncio.get_running_loop()
        try:
            while self._inflight:
                now = time.monotonic()
                first = min(
                    (e.deadline for e in self._inflight.values() if e.ended is None),
                    default=now + WATCH_EVERY,
                )
                delay = max(0.0, min(WATCH_EVERY, first - now))
                self._watch_at = now + delay
                self._watch_wake = wake = loop.create_future()
                timer = loop.call_later(delay, _wake, wake)
                try:
                    await wake
                finally:
                    timer.cancel()
                    self._watch_at = float("inf")
                    self._watch_wake = None
                now = time.monotonic()
                after = self._hedge_after
                hung_since = now - after
                for entry in list(self._inflight.values()):
                    if entry.deadline <= now:
                        if entry.ended is None:
                            entry.ended = "timed out"
                            entry.task.cancel()
                        continue
                    # A short timeout ends a hung request soon enough by itself; hedging just
                    # before it would pay twice for answers that were merely slow.
                    if (
                        entry.holds_slot
                        and entry.started < hung_since
                        and after <= HEDGE_BEFORE_TIMEOUT * entry.policy.timeout
                    ):
                        self._hedge(entry)
        finally:
            self._watchdog = None

    def _wake_watchdog(self) -> None:
        """A request due before the watchdog's next look: have it look now."""
        if self._watch_wake is not None:
            _wake(self._watch_wake)

    def _hedge(self, entry: _Attempt) -> None:
        # A hung request must not hold a concurrency slot: after a 429 cut the limit, a few
        # stalled connections would otherwise hold every slot and nothing would be sent.
        entry.holds_slot = False
        self.limiter.release()
        if entry.hedges_left <= 0:
            return  # hedged enough: its timeout ends it
        entry.progress.hedges += 1
        hedge = asyncio.ensure_future(
            self._attempt(
                entry.call, entry.tokens, entry.policy, entry.progress, entry.hedges_left - 1
            )
        )
        entry.hedge = hedge

        def first_answer_wins(t: asyncio.Task[Any], entry: _Attempt = entry) -> None:
            if t.cancelled() or t.exception() is not None or entry.task.done():
                return  # the original may still answer, or time out
            if entry.ended is None:
                entry.ended = "answered"
                entry.result = t.result()
                entry.task.cancel()

        hedge.add_done_callback(first_answer_wins)


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _exhausted(error: RetryableError, attempts: int) -> RowError:
    error.message = f"{error.message} (gave up after {attempts} attempt(s))"
    error.args = (error.message,)
    return error
