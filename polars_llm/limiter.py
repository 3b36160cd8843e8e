"""Per-endpoint admission control: concurrency, requests/tokens per minute, and 429 cooldown.

A Limiter lives on the engine's single event loop (see engine.py). Every batch of every thread in
the process submits its work to that loop, so confining the limiter to it makes it process-wide
without a thread lock, and no waiting ever blocks an executor thread.

Rate budgets are spaced, not bucketed (GCRA): each request takes a slice of a timeline, as long
as the budgets allow (``60 / rpm`` seconds, or its tokens' share of ``tpm``), and starts no
earlier than the slice. A bucket that allows a burst on top of its rate sends more than the limit
in the first second, which a server that enforces its limit per second refuses.

The timeline is shared (shared.py): the limiter takes a fraction of a second of it at a time from
the home that every process using the same endpoint, key and model shares, then spaces its own
requests inside that chunk. One process alone uses an in-process home.
"""

from __future__ import annotations

import asyncio
import collections
import math
import re
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from .shared import InProcessState, SharedState, SharedStateError, report_broken

# The share of a known limit the client aims at. Network jitter moves requests from one of the
# server's one-second windows into the next; 5% of headroom absorbs that.
RATE_SHARE = 0.95
# Seconds of lateness a request may make up for (a busy event loop woke it late) by going
# sooner than its slice: at most half of the headroom above, so catching up never bursts.
CATCH_UP = 0.025
# The most budget, in seconds of the timeline, taken from the shared home at once. A few round
# trips a second per process; at most this much is lost when a process dies holding it.
CHUNK_SECONDS = 0.25
# Chunks closer than this are one stretch (our last one and the next): clocks read on the way to
# and from the home differ by about this much.
CONTIGUOUS = 0.002
# With no rate limit known, how often the shared home is asked whether another process's 429
# put everyone on hold.
COOLDOWN_POLL = 0.25
# Characters per token before answers' usage teaches better (English prose is about four).
DEFAULT_CHARS_PER_TOKEN = 4.0
# Prompt tokens observed before the calibrated ratio replaces the default.
CALIBRATION_TOKENS = 200
# Above this many tokens observed, older observations weigh half, so the ratio follows changes.
CALIBRATION_WINDOW = 200_000


class Limiter:
    """Admission for one endpoint: ``await acquire(tokens)`` before a request, ``release`` after.

    ``shared`` is the home of the rate budget and cooldown this limiter shares with other
    processes, under the name ``scope`` (see ``shared.scope_for``); by default, this process's.
    Before its first request the limiter meets its home (``SharedState.meet``): limits that
    the endpoint stated earlier, to this or another process, apply at once. With ``probe``,
    while no limit is known and other processes send through the same home, one request at a
    time goes until the endpoint first answers: its headers may state the limits, which then
    space the rest (rather than several processes' bursts at full concurrency learning them
    from 429s). A process alone sends at once: a bad key or model stops everything at its first
    answer anyway (endpoint.py).
    """

    def __init__(
        self,
        concurrency: int,
        rpm: int | None = None,
        tpm: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        shared: SharedState | None = None,
        scope: str = "",
        probe: bool = False,
    ) -> None:
        self._clock = clock
        self._answered_once = False
        self._probe = probe
        self._probing = False
        # Whether other processes share the home is asked once, before the first request.
        self._presence: asyncio.Future[None] | None = None
        # Requests sent with no rate budget known lately (while not alone): charged to the
        # shared timeline once a limit is learned, so the others' budget starts after them.
        self._unbudgeted: collections.deque[float] = collections.deque()
        self._max = concurrency
        self._limit = float(concurrency)  # adaptive: cut on 429, grown back on success
        self._active = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._rate_lock = asyncio.Lock()
        self._rate_waiting = 0  # tasks waiting for the rate budget: sizes the next chunk
        self._shared: SharedState = shared if shared is not None else InProcessState(clock)
        self._alone = shared is None  # no other process to hear from or tell
        self._scope = scope
        self._pending: set[asyncio.Task[Any]] = set()
        self._rpm: int | None = None
        self._tpm: int | None = None
        self._learned_rpm: int | None = None  # from x-ratelimit-limit-* headers
        self._learned_tpm: int | None = None
        # The timeline: budget is ours up to _granted_until; the next request may start at
        # _cursor (both on this limiter's clock).
        self._cursor = -math.inf
        self._granted_until = -math.inf
        self._next_poll = -math.inf
        self._cooldown_until = 0.0
        # After a 429, admissions are spaced at least this far apart, so the end of a cooldown
        # lets requests out at about the rate the endpoint allows instead of all at once.
        # Shrinks with each success until it vanishes.
        self._spacing = 0.0
        self._last_cut = -1e9
        self._chars = 0.0  # prompt characters and tokens of answers, for the token estimate
        self._tokens = 0.0
        self.consecutive_failures = 0  # 5xx, timeouts, connection errors since the last success
        self.configure(concurrency, rpm, tpm)

    # -- settings --------------------------------------------------------------------------
    def configure(self, concurrency: int, rpm: int | None, tpm: int | None) -> None:
        """Apply a batch's settings; the most recent call's settings win for the endpoint.

        What the endpoint taught us stays: a limit cut by 429s stays cut (up to the new
        concurrency), and budget already taken stays taken when only the rate changes, so two
        expressions with different settings cannot refill each other's budget.
        """
        if concurrency != self._max:
            cut = self._limit < self._max
            self._max = concurrency
            self._limit = min(self._limit, float(concurrency)) if cut else float(concurrency)
        self._rpm = rpm
        self._tpm = tpm
        self._wake()

    def share(self, home: SharedState, scope: str) -> None:
        """Take the rate budget and cooldown from ``home``, under ``scope``, from now on: every
        process whose limiter shares them there shares one budget and one cooldown."""
        if home is self._shared and scope == self._scope:
            return
        self._shared, self._scope = home, scope
        self._alone = isinstance(home, InProcessState)
        self._granted_until = -math.inf  # budget taken from another home is not this one's
        self._presence = None

    @property
    def rpm(self) -> int | None:
        """The requests-per-minute limit in force: configured, else learned from the endpoint."""
        return self._rpm or self._learned_rpm

    @property
    def tpm(self) -> int | None:
        """The tokens-per-minute limit in force: configured, else learned from the endpoint."""
        return self._tpm or self._learned_tpm

    @property
    def max_concurrency(self) -> int:
        """The configured concurrency."""
        return self._max

    @property
    def limit(self) -> int:
        """Requests allowed in flight right now (adaptive, at most the configured concurrency)."""
        if self._probing and not (self._rpm or self._tpm):
            return 1
        return max(1, int(self._limit))

    def _answered(self) -> None:
        self._answered_once = True
        if self._probing:
            self._probing = False
            self._wake()

    @property
    def active(self) -> int:
        return self._active

    # -- admission -------------------------------------------------------------------------
    async def acquire(self, tokens: int = 0) -> None:
        """Wait for a concurrency slot, then for the rate budgets and any cooldown."""
        if self._presence is None or not self._presence.done():
            await self._look_around()
        if self._active < self.limit and not self._waiters:
            self._active += 1
        else:
            await self._acquire_slot()
        cost = self._cost(tokens)
        if not (self._rate_waiting or self._spacing) and self._goes_at_once(cost):
            return  # the common case with no rate limit: nothing to wait for, no lock to take
        try:
            self._rate_waiting += 1
            try:
                async with self._rate_lock:  # FIFO: the longest waiter is served first
                    await self._admit(cost)
            finally:
                self._rate_waiting -= 1
        except BaseException:
            self.release()
            raise

    def look_around_soon(self) -> None:
        """Start meeting the home now (on the loop), so that the first request finds it done
        rather than waiting a round trip to the home behind the batch's first claims."""
        if self._presence is None and not self._alone:
            self._presence = asyncio.ensure_future(self._ask_presence())

    async def _look_around(self) -> None:
        """Before the first request: probe if others may burst beside us (see the class doc)."""
        if self._presence is None and self._alone:
            self._presence = asyncio.get_running_loop().create_future()
            self._presence.set_result(None)
            return
        self.look_around_soon()
        assert self._presence is not None
        await asyncio.shield(self._presence)

    async def _ask_presence(self) -> None:
        try:
            met = await self._shared.meet(self._scope)
        except SharedStateError as e:
            self._lose_shared(e)
            return
        self._learned_rpm = self._learned_rpm or met.rpm
        self._learned_tpm = self._learned_tpm or met.tpm
        # A hold another process's 429 left is waited out before the first request; later
        # ones are learned by the polls of _goes_at_once.
        self._next_poll = self._clock() + COOLDOWN_POLL
        await self._poll_cooldown()
        if met.others and self._probe and not self._answered_once:
            self._probing = True

    def _cost(self, tokens: int) -> float:
        """Seconds of the timeline one request takes under the budgets in force."""
        cost = 0.0
        if self.rpm:
            cost = 60.0 / (self.rpm * RATE_SHARE)
        if self.tpm and tokens:
            cost = max(cost, tokens * 60.0 / (self.tpm * RATE_SHARE))
        return cost

    def _goes_at_once(self, cost: float) -> bool:
        """Whether a request with no budget to take goes now: no cooldown known. While not
        alone, the shared home is asked about one every COOLDOWN_POLL, in the background."""
        now = self._clock()
        if cost or now < self._cooldown_until:
            return False
        if not self._alone:
            if now >= self._next_poll:
                self._next_poll = now + COOLDOWN_POLL
                self._spawn(self._poll_cooldown())
            self._note_unbudgeted(now)
        return True

    async def _poll_cooldown(self) -> None:
        """Ask the shared home whether another process's 429 holds everyone back. Requests do
        not wait for the answer: a hold is at most one poll and one round trip late, which
        admission blocked on the home (behind its queue of claims) cost in every poll."""
        held = await self._reserve(0.0)
        if held > 0:
            self._cooldown_until = max(self._cooldown_until, self._clock() + held)

    async def _admit(self, cost: float) -> None:
        while True:
            # One reading of the clock for the cooldown and the budget: a sleep may end a
            # little before its time (uvloop's timers count whole milliseconds), and a request
            # with no budget to take must never reach the budget's arithmetic.
            now = self._clock()
            wait = self._cooldown_until - now
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            if not cost:
                if self._goes_at_once(cost):
                    break
                continue
            start = max(self._cursor, now - CATCH_UP)
            if start + cost > self._granted_until + 1e-9:
                await self._take_chunk(cost)
                continue
            if start > now:
                await asyncio.sleep(start - now)
                continue
            self._cursor = start + cost
            break
        if self._spacing:
            self._cooldown_until = max(self._cooldown_until, self._clock() + self._spacing)

    def _note_unbudgeted(self, now: float) -> None:
        sent = self._unbudgeted
        sent.append(now)
        while sent[0] < now - 1.0:
            sent.popleft()

    def _charge_unbudgeted(self) -> None:
        """A limit just became known: charge the requests sent in the last second without
        budget to the shared timeline, so the budget handed out next starts after them."""
        now = self._clock()
        sent = sum(1 for t in self._unbudgeted if t >= now - 1.0)
        self._unbudgeted.clear()
        cost = self._cost(0)
        if sent and cost and not self._alone:
            self._spawn(self._reserve(sent * cost))

    async def _take_chunk(self, cost: float) -> None:
        """Take the next stretch of the shared timeline: whole requests' worth, as many as are
        waiting, up to CHUNK_SECONDS."""
        # Whole requests only: a request that ran past its chunk's end would overlap the
        # next chunk, which may be another process's.
        count = max(1, min(self._rate_waiting, int(CHUNK_SECONDS / cost)))
        seconds = count * cost
        start = self._clock() + await self._reserve(seconds)
        if start > self._granted_until + CONTIGUOUS:
            # Others took the budget between our chunks: what is left of ours is too short
            # for a request, and we start afresh in the new one.
            self._cursor = start
        self._granted_until = start + seconds

    async def _reserve(self, seconds: float) -> float:
        try:
            return await self._shared.reserve(self._scope, seconds)
        except SharedStateError as e:
            self._lose_shared(e)
            return await self._shared.reserve(self._scope, seconds)

    def _lose_shared(self, error: SharedStateError) -> None:
        # A broken home must not stop the run: go on alone, and say once that it is alone.
        if not self._alone:
            report_broken(self._shared, error)
            self._shared = InProcessState(self._clock)
            self._alone = True

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
        self._answered()
        self._spacing = 0.0 if self._spacing < 1e-3 else self._spacing * 0.9
        if self._limit < self._max:
            self._limit = min(float(self._max), self._limit + 1.0 / self._limit)
            self._wake()

    def on_failure(self) -> None:
        """A 5xx, timeout or connection error: counted until the next success."""
        self.consecutive_failures += 1

    def on_rate_limited(self, retry_after: float | None) -> None:
        """A 429: pause new requests to this endpoint, here and in every process sharing it,
        and cut the concurrency limit."""
        now = self._clock()
        pause = retry_after if retry_after is not None else 1.0
        self._cooldown_until = max(self._cooldown_until, now + pause)
        self._spacing = max(self._spacing, min(pause, 1.0))
        self._tell_others(pause)
        # Many in-flight requests see the same 429 storm: cut once per window, not per answer.
        if now - self._last_cut > max(pause, 1.0):
            self._last_cut = now
            self._limit = max(1.0, self._limit / 2)

    def _tell_others(self, pause: float) -> None:
        if self._alone:
            return  # nobody else to tell; the local cooldown is the whole story
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return

        async def push() -> None:
            try:
                await self._shared.pause(self._scope, pause)
            except SharedStateError as e:
                self._lose_shared(e)

        self._spawn(push(), loop)

    def _spawn(
        self, coro: Coroutine[Any, Any, Any], loop: asyncio.AbstractEventLoop | None = None
    ) -> None:
        try:
            loop = loop or asyncio.get_running_loop()
        except RuntimeError:
            coro.close()
            return
        task = loop.create_task(coro)
        self._pending.add(task)  # a task nobody references may be collected mid-flight
        task.add_done_callback(self._pending.discard)

    def cooldown_remaining(self) -> float:
        return max(0.0, self._cooldown_until - self._clock())

    # -- what answers teach ----------------------------------------------------------------
    def observe(self, headers: Mapping[str, str], chars: int, prompt_tokens: int) -> None:
        """Learn from an answer: the endpoint's limits from its ``x-ratelimit-*`` headers, and
        how many characters of prompt make a token from its ``usage``.

        ``chars`` is the prompt's length in characters (every message) and ``prompt_tokens``
        what the endpoint charged for it (0 when it did not say).
        """
        self._answered()
        if chars > 0 and prompt_tokens > 0:
            self._chars += chars
            self._tokens += prompt_tokens
            if self._tokens > CALIBRATION_WINDOW:
                self._chars /= 2
                self._tokens /= 2
        if not headers:
            return
        lower = {k.lower(): v for k, v in headers.items()}
        for kind in ("requests", "tokens"):
            limit = _positive_int(lower.get(f"x-ratelimit-limit-{kind}"))
            if limit is None:
                continue
            known = self.rpm or self.tpm
            learned = self._learned_rpm if kind == "requests" else self._learned_tpm
            if kind == "requests":
                self._learned_rpm = limit
            else:
                self._learned_tpm = limit
            if not known:
                self._charge_unbudgeted()
            if limit != learned:
                self._remember(kind, limit)
            # The endpoint says its budget is spent: wait for it to refill rather than learn
            # it from a 429. The reset header tells when the budget is whole again; one
            # request's share of it (or a second, whichever is longer) is back sooner.
            if _positive_int(lower.get(f"x-ratelimit-remaining-{kind}"), allow_zero=True) == 0:
                reset = parse_duration(lower.get(f"x-ratelimit-reset-{kind}"))
                if reset:
                    pause = min(reset, max(1.0, 60.0 / limit))
                    self._cooldown_until = max(self._cooldown_until, self._clock() + pause)

    def _remember(self, kind: str, limit: int) -> None:
        """Keep a limit the endpoint stated in the home, for processes and runs to come."""
        if self._alone:
            return
        rpm, tpm = (limit, None) if kind == "requests" else (None, limit)

        async def learn() -> None:
            try:
                await self._shared.learn(self._scope, rpm, tpm)
            except SharedStateError as e:
                self._lose_shared(e)

        self._spawn(learn())

    def tokens_for(self, chars: int) -> int:
        """The estimated tokens of a prompt of ``chars`` characters, as this endpoint counts."""
        ratio = DEFAULT_CHARS_PER_TOKEN
        if self._tokens >= CALIBRATION_TOKENS:
            ratio = self._chars / self._tokens
        return int(chars / ratio) + 1


def _positive_int(value: str | None, allow_zero: bool = False) -> int | None:
    try:
        number = int(float(value)) if value is not None else None
    except ValueError:
        return None
    if number is None or number < 0 or (number == 0 and not allow_zero):
        return None
    return number


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def parse_duration(text: str | None) -> float | None:
    """Seconds in a reset header: OpenAI writes ``"120ms"``, ``"1.5s"``, ``"6m0s"``; a bare
    number is seconds. None when it cannot be read."""
    if not text:
        return None
    text = text.strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    return sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)
