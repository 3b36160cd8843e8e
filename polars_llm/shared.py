"""State shared by every process that calls one endpoint with one key: budget, cooldown, claims.

Processes that call the same endpoint, key and model share one rate budget, one 429 cooldown and
one set of in-flight claims, wherever they run. ``SharedState`` is that state's small async
interface; where it lives is a *home*:

- ``InProcessState``: this process only (used when there is no cache folder).
- ``SqliteState``: a SQLite file beside the cache folder, for every process of one machine that
  uses that folder (the default: no setup). WAL, ``BEGIN IMMEDIATE``, wall clock.
- ``RedisState``: a Redis server, for many machines (``shared_url="redis://host:port/db"``).
  It also holds a shared tier of answers behind each machine's own cache.

The budget is a timeline, as in GCRA: a scope (endpoint, key, model) has a *theoretical arrival
time* (TAT) before which its budget is spoken for. ``reserve(scope, seconds)`` takes the next
``seconds`` of that timeline and says how long to wait until they start; the caller then spaces
its own requests inside them (see limiter.py). Taking budget in chunks of a fraction of a second
keeps the home off the path of each request. A 429's cooldown moves the TAT past the pause, so
the same call tells every process to wait. Delays are measured on the home's clock and returned
as durations, so machines whose clocks disagree still share one timeline.

Claims are leases: ``claim(key, ttl)`` succeeds for one owner until ``ttl`` seconds pass, and the
owner renews a claim by claiming it again. A process killed mid-request leaves claims that expire;
on one machine a claim whose process is gone is free at once.

Every method runs on the caller's event loop and never blocks it: SQLite work runs on one thread
of its own (never the loop's default executor, where aiohttp resolves host names).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import hashlib
import os
import sqlite3
import threading
import time
import uuid
import warnings
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, runtime_checkable
from urllib.parse import urlparse

from .errors import ConfigError, PolarsLLMError

if TYPE_CHECKING:
    from .settings import Settings

T = TypeVar("T")

# Keys per SQL statement: well under SQLite's limit of host parameters.
_SQL_CHUNK = 500
# The file, inside the cache folder, that holds one machine's shared state.
SQLITE_NAME = "shared-state.sqlite3"
# A process alone on a SQLite file keeps its claims in memory. It looks for newcomers every
# SOLO_POLL seconds and then writes its claims to the file; a newcomer waits for that, looking
# every SOLO_STEP seconds, and takes a lone process that has not written them in SOLO_WAIT
# seconds for hung (its claims then count as expired, as a hung process's claims would).
SOLO_POLL = 0.25
SOLO_STEP = 0.05
SOLO_WAIT = 20.0
# A process alone that has held no claim for this long stops being alone (and stops looking
# for newcomers) until its next claim.
SOLO_IDLE = 5.0
# Prefix of every Redis key polars-llm writes.
REDIS_PREFIX = "polars-llm:"
# Seconds Redis keeps the limits an endpoint stated, after they were last stated.
LIMITS_KEPT = 7 * 24 * 3600


class SharedStateError(PolarsLLMError):
    """The home of the shared state (SQLite file, Redis server) cannot be used."""


@runtime_checkable
class SharedState(Protocol):
    """Budget, cooldown, in-flight claims and (optionally) answers shared between processes.

    ``scope`` names one budget: build it with ``scope_for``. ``key`` is a request key
    (``Request.key``), which never holds the API key.
    """

    holds_answers: bool
    """Whether ``get_answers``/``put_answer`` keep anything (only a home shared by machines)."""

    async def reserve(self, scope: str, seconds: float) -> float:
        """Take the next ``seconds`` of the scope's budget; return the seconds until they start.

        ``seconds=0`` takes nothing: it tells how long the scope is still spoken for (its
        cooldown, or budget others took).
        """
        ...

    async def pause(self, scope: str, seconds: float) -> None:
        """Hold every process sharing ``scope`` back for ``seconds`` from now (a 429)."""
        ...

    async def claim(self, key: str, ttl: float) -> bool:
        """Claim ``key`` for this process for ``ttl`` seconds; False when another holds it.

        Claiming a key this process holds renews it.
        """
        ...

    async def release(self, key: str) -> None:
        """Give up a claim this process holds (others may then send the request)."""
        ...

    async def claim_many(self, keys: Sequence[str], ttl: float) -> list[bool]:
        """``claim`` of each key, in one round trip."""
        ...

    async def release_many(self, keys: Sequence[str]) -> None:
        """``release`` of each key, in one round trip."""
        ...

    async def meet(self, scope: str) -> Meeting:
        """Register this process with the home; whether others may be sending through it now,
        and the limits of ``scope`` learned earlier (by any process, in any run).

        Only a home that can tell says no others: one machine's SQLite file, whose processes it
        knows. Homes shared by machines always say others may be there.
        """
        ...

    async def learn(self, scope: str, rpm: int | None, tpm: int | None) -> None:
        """Keep the limits an endpoint stated (None: not stated) for every later ``meet``."""
        ...

    async def get_answers(self, keys: Sequence[str]) -> list[str | None]:
        """The stored answer (JSON text) of each key, or None."""
        ...

    async def put_answer(self, key: str, value: str) -> None:
        """Store an answer (JSON text) for every process to find."""
        ...

    async def aclose(self) -> None:
        """Release connections and threads."""
        ...


@dataclass(frozen=True)
class Meeting:
    """What a home tells a process before its first request to an endpoint (``meet``)."""

    others: bool
    rpm: int | None = None
    tpm: int | None = None


def stated_limits(
    kept: tuple[int | None, int | None] | None, rpm: int | None, tpm: int | None
) -> tuple[int | None, int | None]:
    """The (rpm, tpm) a home keeps after ``learn``: what was stated now, else what it kept."""
    old_rpm, old_tpm = kept or (None, None)
    return rpm or old_rpm, tpm or old_tpm


def scope_for(base_url: str, api_key: str, model: str) -> str:
    """The name of the budget of one endpoint, key and model; the key is hashed, never shown."""
    digest = hashlib.sha256(api_key.encode()).hexdigest()[:16]
    return f"{base_url}|{digest}|{model}"


def _owner() -> str:
    # A claim's owner: this process (pid first, so a home on one machine can tell it is gone)
    # and a random part, so a reused pid is not mistaken for the old owner.
    return f"{os.getpid()}:{uuid.uuid4().hex[:12]}"


# --------------------------------------------------------------------------------------------
# In-process
# --------------------------------------------------------------------------------------------
class InProcessState:
    """Shared state for one process: what the other homes share, kept in dicts."""

    holds_answers = False

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._tat: dict[str, float] = {}
        self._claims: dict[str, float] = {}  # key -> expiry
        self._limits: dict[str, tuple[int | None, int | None]] = {}

    async def reserve(self, scope: str, seconds: float) -> float:
        now = self._clock()
        start = max(self._tat.get(scope, now), now)
        if seconds > 0:
            self._tat[scope] = start + seconds
        return start - now

    async def pause(self, scope: str, seconds: float) -> None:
        self._tat[scope] = max(self._tat.get(scope, 0.0), self._clock() + seconds)

    async def claim(self, key: str, ttl: float) -> bool:
        # One process has one owner, and it may always renew: a held claim is never refused.
        self._claims[key] = self._clock() + ttl
        return True

    async def release(self, key: str) -> None:
        self._claims.pop(key, None)

    async def claim_many(self, keys: Sequence[str], ttl: float) -> list[bool]:
        expires = self._clock() + ttl
        self._claims.update(dict.fromkeys(keys, expires))
        return [True] * len(keys)

    async def release_many(self, keys: Sequence[str]) -> None:
        for key in keys:
            self._claims.pop(key, None)

    async def meet(self, scope: str) -> Meeting:
        return Meeting(False, *self._limits.get(scope, (None, None)))

    async def learn(self, scope: str, rpm: int | None, tpm: int | None) -> None:
        self._limits[scope] = stated_limits(self._limits.get(scope), rpm, tpm)

    async def get_answers(self, keys: Sequence[str]) -> list[str | None]:
        return [None] * len(keys)

    async def put_answer(self, key: str, value: str) -> None:
        return None

    async def aclose(self) -> None:
        self._claims.clear()


# --------------------------------------------------------------------------------------------
# SQLite, beside the cache folder: every process of one machine
# --------------------------------------------------------------------------------------------
class SqliteState:
    """Shared state in a SQLite file, for the processes of one machine.

    One row per budget scope and one per claim. Writes take the database lock up front
    (``BEGIN IMMEDIATE``) so a read-modify-write never interleaves with another process's; WAL
    lets readers run meanwhile. Times are wall-clock seconds, the one clock all processes share.

    A process alone (no other live process has registered with the file) keeps its claims in
    memory, under a ``solo`` row that says so: nobody else could ask for them, and a window of
    claims then costs no transaction. A process that registers finds that row and waits; the lone
    process sees it within SOLO_POLL, writes its live claims to the file and deletes its row,
    and from then on both claim through the file.
    """

    holds_answers = False

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._owner = _owner()
        # One thread of our own: SQLite calls block, and the loop's default executor must stay
        # free for aiohttp's DNS lookups.
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="polars-llm-shared"
        )
        self._db: sqlite3.Connection | None = None
        self._claims_taken = 0
        # Claims held while alone (key -> expiry, oldest first); None when claims are in the
        # file. Read and changed on the caller's loop under _solo_lock; set and ended on the
        # executor thread, so work queued after the end finds the claims in the file.
        self._solo: collections.OrderedDict[str, float] | None = None
        self._solo_lock = threading.Lock()
        self._solo_ending = False
        self._tried_solo = False
        self._solo_stop = threading.Event()
        self._solo_since_busy = 0.0  # time.monotonic() when claims were last seen held
        self._watcher: threading.Thread | None = None  # looks for newcomers while alone

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            try:
                return work(self._connect())
            except (sqlite3.Error, OSError) as e:
                raise SharedStateError(
                    f"cannot use the shared state file {self.path}: {e}. Check that the cache "
                    "folder is writable and on a local disk (SQLite over NFS is unsafe)."
                ) from e

        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            # Losing the last transactions in a power cut only loses budget bookkeeping.
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("CREATE TABLE IF NOT EXISTS budget (scope TEXT PRIMARY KEY, tat REAL)")
            db.execute(
                "CREATE TABLE IF NOT EXISTS claims (key TEXT PRIMARY KEY, owner TEXT, expires REAL)"
            )
            db.execute("CREATE TABLE IF NOT EXISTS presence (owner TEXT PRIMARY KEY, since REAL)")
            db.execute("CREATE TABLE IF NOT EXISTS solo (owner TEXT PRIMARY KEY, since REAL)")
            db.execute(
                "CREATE TABLE IF NOT EXISTS limits (scope TEXT PRIMARY KEY, rpm INTEGER, "
                "tpm INTEGER, learned REAL)"
            )
            self._db = db
        return self._db

    def usable(self) -> bool:
        """Whether the file can be written (checked once, on the caller's thread, with a
        connection of its own)."""
        try:
            self._write(self._connect(), lambda: None)
        except (sqlite3.Error, OSError):
            return False
        finally:
            if self._db is not None:
                self._db.close()
                self._db = None
        return True

    @staticmethod
    def _write(db: sqlite3.Connection, work: Callable[[], T]) -> T:
        db.execute("BEGIN IMMEDIATE")
        try:
            result = work()
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return result

    async def reserve(self, scope: str, seconds: float) -> float:
        def work(db: sqlite3.Connection) -> float:
            def take() -> float:
                now = time.time()
                row = db.execute("SELECT tat FROM budget WHERE scope = ?", (scope,)).fetchone()
                start = max(row[0] if row else now, now)
                if seconds > 0:
                    db.execute(
                        "INSERT INTO budget VALUES (?, ?) "
                        "ON CONFLICT(scope) DO UPDATE SET tat = excluded.tat",
                        (scope, start + seconds),
                    )
                return start - now

            if seconds <= 0:  # a read needs no write lock
                row = db.execute("SELECT tat FROM budget WHERE scope = ?", (scope,)).fetchone()
                return max(0.0, row[0] - time.time()) if row else 0.0
            return self._write(db, take)

        return await self._run(work)

    async def pause(self, scope: str, seconds: float) -> None:
        def work(db: sqlite3.Connection) -> None:
            def push() -> None:
                db.execute(
                    "INSERT INTO budget VALUES (?, ?) "
                    "ON CONFLICT(scope) DO UPDATE SET tat = max(tat, excluded.tat)",
                    (scope, time.time() + seconds),
                )

            self._write(db, push)

        await self._run(work)

    async def claim(self, key: str, ttl: float) -> bool:
        return (await self.claim_many([key], ttl))[0]

    async def claim_many(self, keys: Sequence[str], ttl: float) -> list[bool]:
        taken = self._claim_alone(keys, ttl)
        if taken is not None:
            return taken
        self._claims_taken += len(keys)
        sweep = self._claims_taken >= 1000  # claims left to expire after success pile up
        if sweep:
            self._claims_taken = 0
        keys = list(keys)
        waiting_since = time.time()

        def work(db: sqlite3.Connection) -> list[bool] | None:
            if not self._tried_solo:
                self._tried_solo = True
                if self._begin_alone(db):
                    return self._claim_alone(keys, ttl)

            def take() -> list[bool] | None:
                now = time.time()
                if sweep:
                    db.execute("DELETE FROM claims WHERE expires < ?", (now,))
                if self._lone_other(db, hung=now - waiting_since > SOLO_WAIT):
                    return None  # its claims are in its memory until it sees us
                held: dict[str, str] = {}
                for start in range(0, len(keys), _SQL_CHUNK):
                    chunk = keys[start : start + _SQL_CHUNK]
                    held.update(
                        (key, owner)
                        for key, owner in db.execute(
                            "SELECT key, owner FROM claims WHERE expires > ? AND owner != ? AND "
                            f"key IN ({','.join('?' * len(chunk))})",
                            (now, self._owner, *chunk),
                        )
                    )
                alive: dict[str, bool] = {}
                taken = [
                    key not in held or not alive.setdefault(held[key], _process_alive(held[key]))
                    for key in keys
                ]
                db.executemany(
                    _CLAIM_ROW,
                    [(k, self._owner, now + ttl) for k, ok in zip(keys, taken, strict=True) if ok],
                )
                return taken

            return self._write(db, take)

        while True:
            result = await self._run(work)
            if result is not None:
                return result
            await asyncio.sleep(SOLO_STEP)

    # -- alone: claims in memory ---------------------------------------------------------------
    def _claim_alone(self, keys: Sequence[str], ttl: float) -> list[bool] | None:
        """``claim_many`` while alone: every claim is ours. None when the claims are in the file
        (or are being written there)."""
        with self._solo_lock:
            held = self._solo
            if held is None or self._solo_ending:
                return None
            now = time.time()
            expires = now + ttl
            for key in keys:
                held[key] = expires
                held.move_to_end(key)
            _drop_expired(held, now)
            return [True] * len(keys)

    def _release_alone(self, keys: Sequence[str]) -> bool:
        with self._solo_lock:
            held = self._solo
            if held is None or self._solo_ending:
                return False
            for key in keys:
                held.pop(key, None)
            return True

    def _register(self, db: sqlite3.Connection) -> tuple[int, int]:
        """In a write transaction: this process's presence row, and the rows of processes gone.
        Returns how many other processes were registered, and how many of them are gone."""
        db.execute("INSERT OR REPLACE INTO presence VALUES (?, ?)", (self._owner, time.time()))
        others = self._others(db, "presence")
        gone = [(o,) for o in others if not _process_alive(o)]
        db.executemany("DELETE FROM presence WHERE owner = ?", gone)
        db.executemany("DELETE FROM solo WHERE owner = ?", gone)
        return len(others), len(gone)

    def _begin_alone(self, db: sqlite3.Connection) -> bool:
        """On the executor: keep claims in memory if no other live process uses the file."""

        def register() -> bool:
            others, gone = self._register(db)
            if gone < others:
                return False
            db.execute("INSERT OR REPLACE INTO solo VALUES (?, ?)", (self._owner, time.time()))
            return True

        if not self._write(db, register):
            return False
        with self._solo_lock:
            self._solo = collections.OrderedDict()
            self._solo_since_busy = time.monotonic()
        self._watcher = threading.Thread(
            target=self._watch, name="polars-llm-shared-watch", daemon=True
        )
        self._watcher.start()
        return True

    def _others(self, db: sqlite3.Connection, table: str) -> list[str]:
        """The owners of the other processes in ``table`` (presence or solo)."""
        return [
            owner
            for (owner,) in db.execute(
                f"SELECT owner FROM {table} WHERE owner != ?", (self._owner,)
            )
        ]

    def _lone_other(self, db: sqlite3.Connection, hung: bool) -> bool:
        """In a write transaction: whether another live process keeps its claims in memory (it
        sees this process, registered by its first claim, within SOLO_POLL). A lone process
        that has gone, or has not answered for SOLO_WAIT seconds (``hung``), loses its row."""
        lone = self._others(db, "solo")
        gone = [(o,) for o in lone if hung or not _process_alive(o)]
        db.executemany("DELETE FROM solo WHERE owner = ?", gone)
        return len(gone) < len(lone)

    def _watch(self) -> None:
        """While alone: look for a newcomer every SOLO_POLL seconds, then end being alone."""
        while not self._solo_stop.wait(SOLO_POLL):
            try:
                if self._executor.submit(self._look_for_others).result():
                    return
            except RuntimeError:
                return  # the executor was shut down (aclose)
            except (sqlite3.Error, OSError):
                continue  # a busy or damaged file: look again next time

    def _look_for_others(self) -> bool:
        """On the executor, every SOLO_POLL while alone: end being alone if another process has
        registered, or if this one has held no claim for a while (its watcher then stops; the
        next claim tries to be alone again)."""
        held = self._solo
        if held is None:
            return True
        idle = False
        with self._solo_lock:
            _drop_expired(held, time.time())
            if not held:
                idle = time.monotonic() - self._solo_since_busy > SOLO_IDLE
            else:
                self._solo_since_busy = time.monotonic()
        if idle:
            self._end_alone(self._connect())
            self._tried_solo = False
            return True
        db = self._connect()
        others = self._others(db, "presence")
        mine = db.execute("SELECT 1 FROM solo WHERE owner = ?", (self._owner,)).fetchone()
        if mine and not any(_process_alive(o) for o in others):
            return False
        self._end_alone(db)
        return True

    def _end_alone(self, db: sqlite3.Connection) -> None:
        """On the executor: write the live claims held in memory to the file, and claim through
        the file from now on (work queued behind this finds them there)."""
        with self._solo_lock:
            held = self._solo
            if held is None:
                return
            self._solo_ending = True
        try:
            now = time.time()
            rows = [(key, self._owner, expiry, now) for key, expiry in held.items() if expiry > now]

            def write() -> None:
                # A claim another process holds stays its own: a newcomer that took this process
                # for hung (SOLO_WAIT) may have claimed the same keys since.
                db.executemany(
                    f"{_CLAIM_ROW} WHERE claims.owner = excluded.owner OR claims.expires < ?4",
                    rows,
                )
                db.execute("DELETE FROM solo WHERE owner = ?", (self._owner,))

            self._write(db, write)
        finally:
            with self._solo_lock:
                self._solo, self._solo_ending = None, False

    async def release(self, key: str) -> None:
        await self.release_many([key])

    async def release_many(self, keys: Sequence[str]) -> None:
        if self._release_alone(keys):
            return
        rows = [(key, self._owner) for key in keys]

        def work(db: sqlite3.Connection) -> None:
            db.executemany("DELETE FROM claims WHERE key = ? AND owner = ?", rows)

        await self._run(work)

    async def meet(self, scope: str) -> Meeting:
        def work(db: sqlite3.Connection) -> Meeting:
            def register() -> Meeting:
                others, gone = self._register(db)
                row = db.execute("SELECT rpm, tpm FROM limits WHERE scope = ?", (scope,)).fetchone()
                return Meeting(gone < others, *(row or (None, None)))

            return self._write(db, register)

        return await self._run(work)

    async def learn(self, scope: str, rpm: int | None, tpm: int | None) -> None:
        def work(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO limits VALUES (?, ?, ?, ?) ON CONFLICT(scope) DO UPDATE SET "
                "rpm = coalesce(excluded.rpm, rpm), tpm = coalesce(excluded.tpm, tpm), "
                "learned = excluded.learned",
                (scope, rpm, tpm, time.time()),
            )

        await self._run(work)

    async def get_answers(self, keys: Sequence[str]) -> list[str | None]:
        # Processes of one machine share answers through the cache folder itself.
        return [None] * len(keys)

    async def put_answer(self, key: str, value: str) -> None:
        return None

    async def aclose(self) -> None:
        self._solo_stop.set()
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._close_db)
        finally:
            self._executor.shutdown(wait=False)

    def close_soon(self) -> None:
        """``aclose`` without waiting: the work queued on the home's thread runs, then the
        closing, then the thread ends."""
        self._solo_stop.set()
        self._executor.submit(self._close_db)
        self._executor.shutdown(wait=False)

    def _close_db(self) -> None:
        if self._db is not None:
            try:
                with contextlib.suppress(sqlite3.Error, OSError):
                    self._end_alone(self._db)  # what a process still polling needs to see
            finally:
                self._db.close()
                self._db = None


def _drop_expired(claims: collections.OrderedDict[str, float], now: float) -> None:
    """Drop the expired claims from the front of claims kept oldest first."""
    while claims:
        key, expiry = next(iter(claims.items()))
        if expiry > now:
            break
        del claims[key]


# One claim, taken or renewed (the owner and expiry replace an expired or released one).
_CLAIM_ROW = (
    "INSERT INTO claims VALUES (?1, ?2, ?3) ON CONFLICT(key) DO UPDATE SET "
    "owner = excluded.owner, expires = excluded.expires"
)


def _process_alive(owner: str) -> bool:
    """Whether the process that took a claim on this machine still runs."""
    try:
        os.kill(int(owner.split(":", 1)[0]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):
        return True  # someone else's process, or an owner we cannot read: trust its expiry
    return True


# --------------------------------------------------------------------------------------------
# Redis: every machine
# --------------------------------------------------------------------------------------------
# Take budget: check and take in one step on the server's clock. KEYS[1] the scope's TAT,
# ARGV[1] seconds to take. Returns the wait in seconds as text (Lua numbers would be truncated
# to integers on the way out).
_RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
local start = math.max(tat, now)
local seconds = tonumber(ARGV[1])
if seconds > 0 then
  local ttl = math.ceil((start + seconds - now) * 1000) + 60000
  redis.call('SET', KEYS[1], string.format('%.6f', start + seconds), 'PX', ttl)
end
return string.format('%.6f', start - now)
"""

# Hold the scope back until now + ARGV[1] seconds, unless it already is for longer.
_PAUSE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
local until_ = math.max(tat, now + tonumber(ARGV[1]))
redis.call('SET', KEYS[1], string.format('%.6f', until_), 'PX', math.ceil((until_ - now) * 1000) + 60000)
return 1
"""

# Claim or renew: KEYS[1] the claim, ARGV[1] our owner id, ARGV[2] the lease in ms.
_CLAIM = """
local holder = redis.call('GET', KEYS[1])
if holder == false or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""

# Release only our own claim.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class RedisState:
    """Shared state on a Redis server, for processes on many machines.

    The budget's check-and-take is one Lua script on the server's clock (``TIME``), so no two
    processes can take the same slot and machines' clocks never matter. Claims are keys set
    only if absent, with an expiry. Answers are plain keys holding the cache's JSON text.
    """

    holds_answers = True

    def __init__(self, url: str) -> None:
        check_shared_url(url)
        self.url = url
        self._owner = _owner()
        self._client: Any = None
        self._scripts: dict[str, Any] = {}

    def _redis(self) -> Any:
        if self._client is None:
            try:
                import redis.asyncio as aioredis
            except ImportError as e:
                raise ConfigError(
                    "shared_url needs the redis package: pip install -e '.[redis]' in the polars-llm clone"
                ) from e
            self._client = aioredis.Redis.from_url(self.url, decode_responses=True)
            for name, source in (
                ("reserve", _RESERVE),
                ("pause", _PAUSE),
                ("claim", _CLAIM),
                ("release", _RELEASE),
            ):
                self._scripts[name] = self._client.register_script(source)
        return self._client

    async def _script(self, name: str, key: str, *args: object) -> Any:
        self._redis()
        return await self._guard(self._scripts[name](keys=[key], args=list(args)))

    async def _guard(self, call: Any) -> Any:
        import redis.exceptions

        try:
            return await call
        except (redis.exceptions.RedisError, OSError) as e:
            raise SharedStateError(
                f"cannot use the shared state at {_redacted(self.url)}: {e}. Check that the "
                "Redis server is up and the URL ($POLARS_LLM_SHARED_URL, shared_url= or "
                "--shared-url) is right."
            ) from e

    async def reserve(self, scope: str, seconds: float) -> float:
        wait = await self._script("reserve", f"{REDIS_PREFIX}budget:{scope}", f"{seconds:.6f}")
        return max(0.0, float(wait))

    async def pause(self, scope: str, seconds: float) -> None:
        await self._script("pause", f"{REDIS_PREFIX}budget:{scope}", f"{seconds:.6f}")

    async def claim(self, key: str, ttl: float) -> bool:
        ms = max(1, int(ttl * 1000))
        return bool(await self._script("claim", f"{REDIS_PREFIX}claim:{key}", self._owner, ms))

    async def release(self, key: str) -> None:
        await self._script("release", f"{REDIS_PREFIX}claim:{key}", self._owner)

    async def claim_many(self, keys: Sequence[str], ttl: float) -> list[bool]:
        return [bool(r) for r in await self._pipelined("claim", keys, max(1, int(ttl * 1000)))]

    async def release_many(self, keys: Sequence[str]) -> None:
        await self._pipelined("release", keys)

    async def _pipelined(self, name: str, keys: Sequence[str], *args: object) -> list[Any]:
        """One script per key, in one round trip."""
        client = self._redis()
        script = self._scripts[name]
        pipe = client.pipeline(transaction=False)
        for key in keys:  # queued on the pipeline, sent by execute()
            await script(
                keys=[f"{REDIS_PREFIX}claim:{key}"], args=[self._owner, *args], client=pipe
            )
        return list(await self._guard(pipe.execute()))

    async def meet(self, scope: str) -> Meeting:
        # Machines cannot see each other's processes: others may always be there.
        client = self._redis()
        rpm, tpm = await self._guard(client.hmget(f"{REDIS_PREFIX}limits:{scope}", "rpm", "tpm"))
        return Meeting(True, _count(rpm), _count(tpm))

    async def learn(self, scope: str, rpm: int | None, tpm: int | None) -> None:
        stated = {k: v for k, v in (("rpm", rpm), ("tpm", tpm)) if v}
        if stated:
            client = self._redis()
            name = f"{REDIS_PREFIX}limits:{scope}"
            pipe = client.pipeline(transaction=False)
            pipe.hset(name, mapping=stated)
            pipe.expire(name, LIMITS_KEPT)
            await self._guard(pipe.execute())

    async def get_answers(self, keys: Sequence[str]) -> list[str | None]:
        if not keys:
            return []
        client = self._redis()
        values = await self._guard(client.mget([f"{REDIS_PREFIX}answer:{k}" for k in keys]))
        return list(values)

    async def put_answer(self, key: str, value: str) -> None:
        client = self._redis()
        await self._guard(client.set(f"{REDIS_PREFIX}answer:{key}", value))

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()


def _count(text: str | None) -> int | None:
    try:
        return int(text) if text else None
    except ValueError:
        return None


_broken: set[int] = set()


def report_broken(home: SharedState, error: SharedStateError) -> None:
    """Say once per home that it failed and that this process goes on alone."""
    if id(home) not in _broken:
        _broken.add(id(home))
        warnings.warn(
            f"{error} Going on without sharing the rate budget and in-flight prompts with other "
            "processes.",
            stacklevel=3,
        )


def check_shared_url(url: str) -> None:
    """Refuse a shared_url that is not a Redis URL, with what to give instead."""
    if urlparse(url).scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(
            f"shared_url {_redacted(url)!r} is not a Redis URL; give one like "
            "'redis://host:6379/0' (shared_url=, --shared-url or $POLARS_LLM_SHARED_URL)"
        )


def _redacted(url: str) -> str:
    """The URL without its password."""
    parsed = urlparse(url)
    if parsed.password:
        return url.replace(f":{parsed.password}@", ":***@")
    return url


# --------------------------------------------------------------------------------------------
# Claims around one paid call
# --------------------------------------------------------------------------------------------
# Seconds a claim lasts unless renewed: the longest a process killed mid-request holds others
# back (on one machine, its claims are free at once). Held claims are renewed every CLAIM_RENEW.
CLAIM_TTL = 20.0
CLAIM_RENEW = 5.0
# Waiting for another process's answer: first look after POLL_FIRST seconds, then less and less
# often, up to every POLL_MAX seconds.
POLL_FIRST = 0.1
POLL_MAX = 2.0
# A gate's window of claims asked ahead doubles each time a request had to wait for its claim
# (the round trip took longer than the window's lead), up to this many times its first size.
WINDOW_GROWTH = 16
# The first round trip asks at most this many keys, and each round trip doubles that up to the
# gate's window. A first window of thousands of keys woke a thousand requests in one turn of the
# loop, and the first connections waited behind them all.
FIRST_WINDOW = 32


async def claim_or_find(
    home: SharedState, key: str, find: Callable[[], Awaitable[T | None]]
) -> T | None:
    """Claim ``key`` for this process, or wait for the answer of the process that holds it.

    Returns what ``find()`` finds once the holder's answer appears, or None when this process
    holds the claim and must send the request itself (nobody held it, or the holder gave up,
    died or let its claim expire).
    """
    delay = POLL_FIRST
    while not await home.claim(key, CLAIM_TTL):
        await asyncio.sleep(delay)
        found = await find()
        if found is not None:
            return found
        delay = min(POLL_MAX, delay * 1.5)
    return None


class ClaimGate(Generic[T]):
    """The claims of one batch, taken, renewed and released in bulk.

    Every request about to be paid asks ``enter(key)``. Keys are asked in groups: all the keys
    asked in one turn of the event loop or while the previous round trip is under way, and,
    once the batch has told its keys in order (``plan``), a window of the keys coming next (which
    grows while requests still wait for their claims: WINDOW_GROWTH). Each
    group costs the home one look for answers other processes stored (``find_many``) and one
    ``claim_many`` of the rest, so a busy run pays a round trip per window of requests, not
    several per request. Claims held are renewed together every CLAIM_RENEW seconds; ``leave``
    ends one (an answered claim is left to expire, so a process polling for it finds the answer
    rather than a free claim it would pay for), and ``close`` releases those never used.
    """

    def __init__(
        self,
        home: SharedState,
        find_many: Callable[[list[str]], Awaitable[list[T | None]]],
        window: int = 64,
    ) -> None:
        self.home = home
        self._find_many = find_many
        self._base = max(1, window)
        self._window = min(self._base, FIRST_WINDOW)
        self._max_window = self._base * WINDOW_GROWTH
        self._rounds = 0  # groups answered
        self._grown_at = 0  # self._rounds when the window last grew
        self._asked: dict[str, asyncio.Future[tuple[str, T | None]]] = {}
        self._asking: list[tuple[str, asyncio.Future[tuple[str, T | None]]]] = []
        self._plan: list[str] = []
        self._cursor = 0
        self._entered: set[str] = set()  # never asked ahead again
        self._held: set[str] = set()
        self._releasing: list[str] = []
        self._tasks: dict[str, asyncio.Task[None] | None] = dict.fromkeys(
            ("ask", "renew", "release")
        )

    def plan(self, keys: Sequence[str]) -> None:
        """The keys the batch will enter, in order: claims are then taken a window ahead."""
        self._plan, self._cursor, self._entered = list(keys), 0, set()

    async def enter(self, key: str) -> tuple[str, T | None]:
        """``("found", answer)``, ``("claimed", None)`` (send it, then ``leave``), or
        ``("held", None)``: another process holds the claim (wait with ``claim_or_find``)."""
        self._entered.add(key)
        future = self._asked.pop(key, None)
        if future is None:
            future = self._ask(key)
            self._asked.pop(key)
        if (
            not future.done()
            and self._window >= self._base  # still ramping up from FIRST_WINDOW: not a sign
            and self._rounds > self._grown_at
            and self._cursor < len(self._plan)
        ):
            # A key asked ahead is not answered yet: the round trip outlasted the window's lead.
            # Ask further ahead from now on (once per round trip; the first has no lead at all).
            self._window = min(self._max_window, 2 * self._window)
            self._grown_at = self._rounds
        self._ask_ahead()
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled() and future.result()[0] == "claimed":
                self.leave(key, answered=False)  # claimed for us just as we were cancelled
            raise

    def hold(self, key: str) -> None:
        """Keep renewing a claim taken outside the gate (by ``claim_or_find``)."""
        self._held.add(key)
        self._start("renew", self._renew)

    def leave(self, key: str, answered: bool) -> None:
        """The request of a claimed key is over; release the claim unless it was answered."""
        self._held.discard(key)
        if not answered:
            self._releasing.append(key)
            self._start("release", self._release)

    def close(self) -> None:
        """The batch is over: release the claims taken ahead for keys it never entered."""
        asked, self._asked, self._plan = self._asked, {}, []
        for key, future in asked.items():
            if future.cancel():
                continue  # not answered yet: released when it is (see _answer)
            if (
                not future.cancelled()
                and future.exception() is None
                and future.result()[0] == "claimed"
            ):
                self.leave(key, answered=False)
        renew = self._tasks["renew"]
        if renew is not None and not self._held:
            renew.cancel()  # nothing left to renew: its sleep would keep the batch alive

    def _ask(self, key: str) -> asyncio.Future[tuple[str, T | None]]:
        future: asyncio.Future[tuple[str, T | None]] = asyncio.get_running_loop().create_future()
        self._asked[key] = future
        self._asking.append((key, future))
        self._start("ask", self._answer)
        return future

    def _ask_ahead(self) -> None:
        # Keep between half a window and a window of planned keys asked before they are needed.
        if len(self._asked) > self._window // 2 or self._cursor >= len(self._plan):
            return
        plan, asked = self._plan, self._asked
        while len(asked) < self._window and self._cursor < len(plan):
            key = plan[self._cursor]
            self._cursor += 1
            if key not in asked and key not in self._entered:
                self._ask(key)

    def _start(self, name: str, work: Callable[[], Awaitable[None]]) -> None:
        if self._tasks[name] is None:
            self._tasks[name] = asyncio.ensure_future(self._run(name, work))

    async def _run(self, name: str, work: Callable[[], Awaitable[None]]) -> None:
        try:
            await work()
        finally:
            self._tasks[name] = None

    async def _answer(self) -> None:
        await asyncio.sleep(0)  # the keys asked in this turn of the loop go together
        while self._asking:
            group, self._asking = self._asking, []
            keys = [key for key, _ in group]
            try:
                found = await self._find_many(keys)
                missing = [key for key, hit in zip(keys, found, strict=True) if hit is None]
                taken = await self.home.claim_many(missing, CLAIM_TTL) if missing else []
            except Exception as e:
                for _, future in group:
                    if not future.done():
                        future.set_exception(e)
                        # Retrieved here: a key asked ahead may never be entered.
                        future.exception()
                continue
            self._rounds += 1
            if self._window < self._base:
                self._window = min(self._base, 2 * self._window)
            claimed = dict(zip(missing, taken, strict=True))
            for (key, future), hit in zip(group, found, strict=True):
                if hit is not None:
                    answer: tuple[str, T | None] = ("found", hit)
                elif claimed[key]:
                    answer = ("claimed", None)
                    if future.cancelled():  # nobody will send it: let others have it
                        self.leave(key, answered=False)
                        continue
                    self.hold(key)
                else:
                    answer = ("held", None)
                if not future.done():
                    future.set_result(answer)

    async def _renew(self) -> None:
        with contextlib.suppress(SharedStateError):  # the claims then expire; others take over
            while self._held:
                await asyncio.sleep(CLAIM_RENEW)
                if self._held:
                    await self.home.claim_many(list(self._held), CLAIM_TTL)

    async def _release(self) -> None:
        while self._releasing:
            keys, self._releasing = self._releasing, []
            with contextlib.suppress(SharedStateError):  # then they expire by themselves
                await self.home.release_many(keys)


# --------------------------------------------------------------------------------------------
# The home a call uses
# --------------------------------------------------------------------------------------------
_homes: dict[tuple[str, str], SharedState] = {}
_homes_lock = threading.Lock()


# A home for every call of this process that names no shared URL: a Ray worker's is its
# cluster's actor (polars_llm.ray), which machines share without Redis.
_process_home: SharedState | None = None


def _forget_homes_in_child() -> None:
    # A forked child must not use the parent's connections or threads.
    global _homes, _homes_lock, _process_home
    _homes = {}
    _homes_lock = threading.Lock()
    _process_home = None


def use_home(home: SharedState | None) -> None:
    """Make ``home`` the shared state of every call of this process that names no shared URL
    (``None``: back to the default homes)."""
    global _process_home
    _process_home = home


os.register_at_fork(after_in_child=_forget_homes_in_child)


def _forget_gone_folders() -> None:
    """Close the SQLite homes whose cache folder was deleted (a test's temporary folder, say):
    each holds a thread and a connection, which a long-lived process that used many temporary
    folders would otherwise keep for good. A limiter still pointing at one is pointed at its
    batch's home before it sends again (``Limiter.share``)."""
    for where, home in list(_homes.items()):
        if isinstance(home, SqliteState) and not home.path.parent.exists():
            del _homes[where]
            home.close_soon()


def open_shared(settings: Settings) -> SharedState:
    """The process-wide home for these settings: Redis when a shared URL is given (or
    ``$POLARS_LLM_SHARED_URL`` is set), else a SQLite file in the cache folder, else this
    process alone."""
    url = settings.shared_url or os.environ.get("POLARS_LLM_SHARED_URL") or None
    if url is None and _process_home is not None:
        return _process_home
    cache_dir = settings.cache_path()
    if url:
        where = ("redis", url)
    elif cache_dir is not None:
        where = ("sqlite", str(cache_dir.expanduser().resolve() / SQLITE_NAME))
    else:
        where = ("process", "")
    with _homes_lock:
        _forget_gone_folders()
        home = _homes.get(where)
        if home is None:
            if where[0] == "redis":
                home = RedisState(url or "")
            elif where[0] == "sqlite":
                home = SqliteState(where[1])
                if not home.usable():
                    # A read-only cache folder: the cache already said it goes on without it.
                    home = InProcessState()
            else:
                home = InProcessState()
            _homes[where] = home
        return home
