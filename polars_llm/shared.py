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
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable
from urllib.parse import urlparse

from .errors import ConfigError, PolarsLLMError

if TYPE_CHECKING:
    from .settings import Settings

T = TypeVar("T")

# The file, inside the cache folder, that holds one machine's shared state.
SQLITE_NAME = "shared-state.sqlite3"
# Prefix of every Redis key polars-llm writes.
REDIS_PREFIX = "polars-llm:"


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

    async def get_answers(self, keys: Sequence[str]) -> list[str | None]:
        """The stored answer (JSON text) of each key, or None."""
        ...

    async def put_answer(self, key: str, value: str) -> None:
        """Store an answer (JSON text) for every process to find."""
        ...

    async def aclose(self) -> None:
        """Release connections and threads."""
        ...


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
        self._claims_taken += 1
        sweep = self._claims_taken % 1000 == 0

        def work(db: sqlite3.Connection) -> bool:
            def take() -> bool:
                now = time.time()
                if sweep:  # claims left to expire after success would pile up otherwise
                    db.execute("DELETE FROM claims WHERE expires < ?", (now,))
                row = db.execute(
                    "SELECT owner, expires FROM claims WHERE key = ?", (key,)
                ).fetchone()
                held = row is not None and row[0] != self._owner and row[1] > now
                if held and _process_alive(row[0]):
                    return False
                db.execute(
                    "INSERT INTO claims VALUES (?, ?, ?) ON CONFLICT(key) DO UPDATE SET "
                    "owner = excluded.owner, expires = excluded.expires",
                    (key, self._owner, now + ttl),
                )
                return True

            return self._write(db, take)

        return await self._run(work)

    async def release(self, key: str) -> None:
        def work(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM claims WHERE key = ? AND owner = ?", (key, self._owner))

        await self._run(work)

    async def get_answers(self, keys: Sequence[str]) -> list[str | None]:
        # Processes of one machine share answers through the cache folder itself.
        return [None] * len(keys)

    async def put_answer(self, key: str, value: str) -> None:
        return None

    async def aclose(self) -> None:
        def close() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        await asyncio.get_running_loop().run_in_executor(self._executor, close)
        self._executor.shutdown(wait=False)


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


class Lease:
    """Keeps a claim alive while its request runs: ``async with Lease(home, key) as lease``.

    Set ``lease.answered`` once the answer is stored where others look: the claim is then left to
    expire, so a process polling for it finds the answer rather than a free claim it would pay
    for again. Otherwise (failure, cancellation) the claim is released for others to take over.
    """

    def __init__(self, home: SharedState, key: str) -> None:
        self.home = home
        self.key = key
        self.answered = False
        self._renewer: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Lease:
        self._renewer = asyncio.ensure_future(self._renew())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
        if not self.answered:
            # Shielded: a cancelled request must still free its claim, or others wait it out.
            with contextlib.suppress(SharedStateError):  # then it expires by itself
                await asyncio.shield(self.home.release(self.key))

    async def _renew(self) -> None:
        with contextlib.suppress(SharedStateError):  # the claim then expires; others take over
            while True:
                await asyncio.sleep(CLAIM_RENEW)
                await self.home.claim(self.key, CLAIM_TTL)


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
