"""The OpenAI Batch API as a backend: half the price, answers within 24 hours, resumable.

The misses of a call (request key -> request body) go out as Batch API jobs through the official
``openai`` client instead of synchronous calls:

- **Shards.** One JSONL input file per model and at most ``MAX_LINES`` lines and ``MAX_BYTES``
  bytes; each line's ``custom_id`` is the request key. ``files.create(purpose="batch")``, then
  ``batches.create(completion_window="24h", metadata=...)``.
- **Ledger.** ``<cache folder>/batches/ledger.json`` records every batch submitted from that cache
  folder (batch id, file ids, model, a hash of the keys, status, run id), with each batch's keys
  in ``<input file id>.keys`` beside it; writes are atomic and under a file lock, so concurrent
  runs never submit the same lines twice. The batch's ``metadata`` carries the run id, model and
  key hash too, so a lost ledger is rebuilt from ``GET /v1/batches`` (and the input files).
- **The cache is the checkpoint.** Output and error files are downloaded as each batch ends, and
  lines are matched by ``custom_id``, never by order. Answers go into the cache in the engine's
  format (``{"text", "usage", "finish"}`` for chat, ``{"vector", "usage"}`` for embeddings).
- **Rounds.** Lines that failed for a passing reason (5xx, 429, ``batch_expired``, left over by a
  cancel, missing from both files) are resubmitted, for ``MAX_ROUNDS`` more rounds at most; 4xx
  lines become row errors that carry the server's reason. A batch that fails validation raises
  :class:`~polars_llm.errors.BatchAborted` with the server's reason.
- **Resume.** Submitting skips keys already pending in a batch of the ledger, so rerunning the
  same job polls and downloads the existing batches and submits only what is neither cached nor
  pending.

The API, for callers that wait in their own way (an Airflow trigger, a cron job):

``EnrichRun(..., wait=False).run(steps, settings.replace(batch=True))``
    The CLI's run (:mod:`polars_llm.enrich`): submits the next round and raises
    :class:`BatchPending` (``batch_ids``, ``base_url``) while batches run; once every answer is
    cached it writes the output like a synchronous run.
``BatchRun(wait=..., on_progress=...)`` and ``with active(run): ...``
    One job's sessions (one per endpoint and cache folder): ``run_in_rounds(frames, steps,
    settings, run)`` sends dependent steps as successive rounds over frames read from the cache;
    batch-mode calls made inside ``active(run)`` on this thread share its sessions and errors.
``BatchSession(settings, wait=True)``
    One run's view of the Batch API for an endpoint: ``complete(batch, texts, keys)`` is the
    engine's hook (misses in, outcomes out) and ``send(requests)`` runs the rounds for a mapping
    of key -> body. With ``wait=False`` both submit what is missing and raise
    :class:`BatchPending` (its ``batch_ids``) instead of waiting; a later call with the same
    requests collects what finished and submits nothing twice.
``submit(requests, settings) -> list[str]``
    Submit without waiting; returns the ids of every batch the requests wait on (new and
    already pending).
``await poll_batches(batch_ids, base_url=..., api_key=...) -> list[BatchStatus]``
    One ``GET /v1/batches/{id}`` per batch, on the caller's event loop; needs no cache folder,
    so it runs in an Airflow triggerer.
``await wait_for_batches(batch_ids, base_url=..., api_key=..., on_progress=None)``
    Poll with backoff (``POLL_MIN`` seconds growing to ``POLL_MAX``) until every batch has ended.
``collect(settings) -> int``
    Download every ended batch of the ledger into the cache; returns how many answers it wrote.
``list_batches(cache_dir)``, ``refresh(settings)``, ``cancel(settings, batch_ids)``
    What ``polars-llm batch list|status|cancel`` show and do.

The Airflow pattern: run the job with ``Settings(batch=True)`` and ``wait=False``
(``polars-llm enrich ... --batch --no-wait``, exit code 75); on :class:`BatchPending` defer to a
trigger that awaits ``wait_for_batches(e.batch_ids, ...)``; when it fires, run the same job again:
it downloads the answers into the cache and writes the output (or submits the next dependent step
and defers again).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import dataclasses
import fcntl
import functools
import hashlib
import io
import json
import os
import time
import uuid
import weakref
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from .cache import ResultCache, open_cache
from .errors import (
    BadRequest,
    BatchAborted,
    ConfigError,
    ContentError,
    EmptyCompletion,
    PolarsLLMError,
    RowError,
    ServerError,
    Truncated,
)
from .prompt import placeholders
from .settings import Settings
from .transport import map_error

if TYPE_CHECKING:
    import openai

    from .engine import Batch, Outcome
    from .pipeline import PipelineStats, Step

# OpenAI's limits are 50,000 lines and 200 MB per input file; stay clear of the byte limit.
MAX_LINES = 50_000
MAX_BYTES = 190 * 1024 * 1024
# Batch API prices are half the synchronous ones.
BATCH_DISCOUNT = 0.5
# Rounds of resubmission for lines that failed for a passing reason (5xx, expiry, cancel).
MAX_ROUNDS = 3
# Seconds between two polls: from POLL_MIN, growing by POLL_GROWTH a poll, up to POLL_MAX.
POLL_MIN = 1.0
POLL_MAX = 60.0
POLL_GROWTH = 1.5
# How far back a lost ledger is searched for in GET /v1/batches: past the 24-hour window, a
# batch has ended and its files may be gone.
RECOVER_SECONDS = 3 * 24 * 3600
RECOVER_PAGES = 20
ENDED = frozenset({"completed", "failed", "expired", "cancelled"})
PATHS = {"chat": "/v1/chat/completions", "embed": "/v1/embeddings"}
# Marks the batches polars-llm created, in their metadata.
TAG = "polars_llm"
LEDGER_VERSION = 1


class BatchPending(PolarsLLMError):
    """Batches were submitted (or are still running) and the caller asked not to wait.

    ``batch_ids`` are the batches the job waits on; rerun the same job once they have ended.
    """

    def __init__(self, message: str, batch_ids: Sequence[str] = (), base_url: str = "") -> None:
        super().__init__(message)
        self.batch_ids = list(batch_ids)
        self.base_url = base_url


@dataclass
class BatchStatus:
    """What the server says about one batch."""

    id: str
    status: str
    total: int = 0
    completed: int = 0
    failed: int = 0
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    created_at: int = 0
    input_file_id: str = ""

    @property
    def ended(self) -> bool:
        return self.status in ENDED

    @classmethod
    def of(cls, batch: Any) -> BatchStatus:
        counts = batch.request_counts
        errors = []
        if batch.errors is not None and batch.errors.data:
            for e in batch.errors.data:
                where = f" (line {e.line})" if e.line is not None else ""
                errors.append(f"{e.code}: {e.message}{where}")
        return cls(
            id=batch.id,
            status=batch.status,
            total=counts.total if counts else 0,
            completed=counts.completed if counts else 0,
            failed=counts.failed if counts else 0,
            output_file_id=batch.output_file_id,
            error_file_id=batch.error_file_id,
            errors=errors,
            metadata=dict(batch.metadata or {}),
            created_at=batch.created_at,
            input_file_id=batch.input_file_id,
        )


@dataclass
class BatchProgress:
    """Totals over the batches a job waits on, from their ``request_counts``."""

    batches: int = 0
    ended: int = 0
    lines: int = 0
    completed: int = 0
    failed: int = 0


# --------------------------------------------------------------------------------------------
# The ledger
# --------------------------------------------------------------------------------------------
@dataclass
class LedgerEntry:
    """One submitted batch, as the ledger keeps it."""

    input_file_id: str
    base_url: str
    path: str
    model: str
    keys_sha: str
    lines: int
    run_id: str
    round: int
    submitted_at: float
    batch_id: str | None = None  # None between the upload and batches.create
    status: str = "submitting"
    output_file_id: str | None = None
    error_file_id: str | None = None
    completed: int = 0
    failed: int = 0
    collected: bool = False
    error: str | None = None


class Ledger:
    """The batches submitted from one cache folder: ``<folder>/batches/ledger.json``."""

    def __init__(self, cache_dir: Path) -> None:
        self.folder = Path(cache_dir).expanduser() / "batches"
        self.path = self.folder / "ledger.json"

    def exists(self) -> bool:
        return self.path.exists()

    def read(self) -> dict[str, LedgerEntry]:
        """The entries by input file id (empty if there is no ledger yet)."""
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise ConfigError(
                f"cannot read the batch ledger {self.path}: {e}; move it away to rebuild it from "
                "the server's list of batches"
            ) from e
        known = {f.name for f in dataclasses.fields(LedgerEntry)}
        return {
            k: LedgerEntry(**{n: v for n, v in e.items() if n in known})
            for k, e in data.get("entries", {}).items()
        }

    @contextlib.contextmanager
    def locked(self) -> Iterator[dict[str, LedgerEntry]]:
        """The entries, to change under an exclusive lock; written back atomically on exit.

        For threads other than an event loop's: it blocks while another holds the lock.
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / "ledger.lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            entries = self.read()
            yield entries
            self.write(entries)

    @contextlib.asynccontextmanager
    async def alocked(self) -> AsyncIterator[dict[str, LedgerEntry]]:
        """``locked`` for coroutines: the loop keeps running while the lock is awaited.

        Coroutines of one loop queue on an asyncio lock (a second flock from the loop's thread
        would block the loop, and with it the holder, for good); the file lock, which keeps
        other processes out, is awaited on a thread of its own.
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        loop = asyncio.get_running_loop()
        async with _loop_lock(loop, self.path):
            with open(self.folder / "ledger.lock", "a+") as lock:
                await loop.run_in_executor(_FLOCK_WAITER, fcntl.flock, lock, fcntl.LOCK_EX)
                entries = self.read()
                yield entries
                self.write(entries)

    def write(self, entries: Mapping[str, LedgerEntry]) -> None:
        data = {
            "version": LEDGER_VERSION,
            "entries": {k: dataclasses.asdict(e) for k, e in entries.items()},
        }
        _write_atomic(self.path, json.dumps(data, indent=1, sort_keys=True))

    def keys_path(self, input_file_id: str) -> Path:
        return self.folder / f"{input_file_id}.keys"

    def write_keys(self, input_file_id: str, keys: Iterable[str]) -> None:
        _write_atomic(self.keys_path(input_file_id), "\n".join(keys))

    def keys(self, input_file_id: str) -> list[str]:
        try:
            return self.keys_path(input_file_id).read_text().split()
        except FileNotFoundError:
            return []

    def forget_keys(self, input_file_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.keys_path(input_file_id).unlink()

    # The keys of lines that runs stopped at --no-wait's exit 75 sent: their answers (tokens,
    # cost) are counted as paid by the run that reads them back, not as served from the cache.
    @property
    def unreported_path(self) -> Path:
        return self.folder / "unreported.keys"

    def unreported(self) -> set[str]:
        """The keys sent by runs that stopped at exit 75 and not yet reported (none if the file
        is unreadable: it only feeds the numbers a run prints)."""
        try:
            return set(self.unreported_path.read_text().split())
        except (OSError, ValueError):
            return set()

    def keep_unreported(self, keys: Iterable[str]) -> None:
        """Add ``keys`` to those kept (another run may keep its own in this folder too)."""
        with self._unreported_locked() as kept:
            kept.update(keys)

    def drop_unreported(self, keys: set[str]) -> None:
        """``keys`` have been counted as paid: no later run counts them again."""
        if self.unreported_path.exists():
            with self._unreported_locked() as kept:
                kept -= keys

    @contextlib.contextmanager
    def _unreported_locked(self) -> Iterator[set[str]]:
        """The kept keys, to change under a lock of their own; written back atomically (the
        file goes once none is left)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / "unreported.lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            kept = self.unreported()
            before = set(kept)
            yield kept
            if kept == before:
                return
            if kept:
                _write_atomic(self.unreported_path, "\n".join(sorted(kept)))
            else:
                with contextlib.suppress(FileNotFoundError):
                    self.unreported_path.unlink()


# One thread that waits for other processes' ledger locks, so the event loop never does (and
# the loop's default executor, which resolves host names, is never filled with waiters).
_FLOCK_WAITER = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="polars-llm-ledger")
_LOOP_LOCKS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[Path, asyncio.Lock]] = (
    weakref.WeakKeyDictionary()
)


def _forget_waiter_in_child() -> None:
    # A forked child (an Airflow task, a Ray worker) has the parent's executor but not its
    # thread: it would queue its waits behind a thread that does not exist.
    global _FLOCK_WAITER, _LOOP_LOCKS
    _FLOCK_WAITER = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="polars-llm-ledger")
    _LOOP_LOCKS = weakref.WeakKeyDictionary()


os.register_at_fork(after_in_child=_forget_waiter_in_child)


def _loop_lock(loop: asyncio.AbstractEventLoop, path: Path) -> asyncio.Lock:
    locks = _LOOP_LOCKS.setdefault(loop, {})
    lock = locks.get(path)
    if lock is None:
        lock = locks[path] = asyncio.Lock()
    return lock


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# Talking to the server
# --------------------------------------------------------------------------------------------
def _client(base_url: str, api_key: str) -> openai.AsyncOpenAI:
    # A few control calls per batch, not a request storm: the SDK's own retries of a 5xx or a
    # dropped connection are enough here.
    import openai  # not at import time: `polars-llm` starts without the SDK

    return openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=4, timeout=600.0)


async def _call(base_url: str, what: Awaitable[Any]) -> Any:
    """Await an SDK call, raising our error type (with what to do) instead of the SDK's."""
    import openai

    try:
        return await what
    except openai.OpenAIError as e:
        error = map_error(e, base_url)
        raise BatchAborted(f"the Batch API call failed: {error.message}", error) from e


async def poll_batches(
    batch_ids: Sequence[str], *, base_url: str, api_key: str
) -> list[BatchStatus]:
    """The status of each batch: one ``GET /v1/batches/{id}`` each, on the running loop."""
    async with _client(base_url, api_key) as client:
        return [
            BatchStatus.of(await _call(base_url, client.batches.retrieve(i))) for i in batch_ids
        ]


def progress_of(statuses: Sequence[BatchStatus]) -> BatchProgress:
    """Totals over ``statuses``."""
    return BatchProgress(
        batches=len(statuses),
        ended=sum(s.ended for s in statuses),
        lines=sum(s.total for s in statuses),
        completed=sum(s.completed for s in statuses),
        failed=sum(s.failed for s in statuses),
    )


async def wait_for_batches(
    batch_ids: Sequence[str],
    *,
    base_url: str,
    api_key: str,
    on_progress: Callable[[BatchProgress], None] | None = None,
    poll_min: float = POLL_MIN,
    poll_max: float = POLL_MAX,
) -> list[BatchStatus]:
    """Poll until every batch has ended, waiting ``poll_min`` growing to ``poll_max`` seconds."""
    delay = poll_min
    while True:
        statuses = await poll_batches(batch_ids, base_url=base_url, api_key=api_key)
        if on_progress is not None:
            on_progress(progress_of(statuses))
        if all(s.ended for s in statuses):
            return statuses
        await asyncio.sleep(delay)
        delay = min(poll_max, delay * POLL_GROWTH)


# --------------------------------------------------------------------------------------------
# What a line's answer becomes
# --------------------------------------------------------------------------------------------
@dataclass
class Collected:
    """What the downloaded files said about the keys of some batches."""

    answered: set[str] = field(default_factory=set)
    fatal: dict[str, RowError] = field(default_factory=dict)
    # Keys worth another round, with the reason they failed this time.
    retry: dict[str, str] = field(default_factory=dict)


# Checks a downloaded answer before it is cached: returns the row's error, or None to cache it.
Accept = Callable[[str, dict[str, Any]], RowError | None]


def _entry(path: str, body: Mapping[str, Any]) -> dict[str, Any]:
    """The cache entry of one successful line, as the synchronous engine writes it."""
    usage = body.get("usage") or {}
    if path == PATHS["embed"]:
        data = body.get("data") or [{}]
        return {"vector": data[0].get("embedding"), "usage": [usage.get("prompt_tokens", 0), 0]}
    choice = (body.get("choices") or [{}])[0]
    return {
        "text": (choice.get("message") or {}).get("content"),
        "usage": [usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)],
        "finish": choice.get("finish_reason"),
    }


def _line_failure(base_url: str, line: Mapping[str, Any]) -> tuple[RowError | None, str]:
    """(the row error of a line that failed for good, or None if worth retrying; its reason)."""
    error = line.get("error")
    if error:
        code = error.get("code") or "error"
        return None, f"{code}: {error.get('message') or ''}".strip()
    response = line.get("response") or {}
    status = int(response.get("status_code") or 0)
    detail = ((response.get("body") or {}).get("error") or {}).get("message") or ""
    if status == 429 or status >= 500 or status in (408, 409) or status == 0:
        return None, f"{status}: {detail}"
    if status in (401, 403, 404):
        return (
            BadRequest(f"the batch line was refused ({status}: {detail})", status=status),
            "",
        )
    return BadRequest(f"{base_url} rejected the batch line ({status}: {detail})", status=status), ""


def _accept(batch: Batch, entry: dict[str, Any]) -> RowError | None:
    """The row error of a downloaded answer the engine would not accept, or None."""
    if batch.kind == "chat":
        text = entry.get("text")
        if not text or not str(text).strip():
            return EmptyCompletion(
                f"the model returned no text (finish_reason={entry.get('finish')!r})", raw=text
            )
        if entry.get("finish") == "length" and batch.settings.truncated_is_error:
            return Truncated(
                "the answer was cut off at max_tokens; raise max_tokens or shorten the output",
                raw=text,
            )
    try:
        batch.spec.post.parse(entry["vector"] if batch.kind == "embed" else entry["text"])
    except ContentError as e:
        return e
    return None


# --------------------------------------------------------------------------------------------
# A session: one run's use of the Batch API for an endpoint
# --------------------------------------------------------------------------------------------
class BatchSession:
    """Send requests as Batch API jobs for one endpoint and cache folder, in rounds.

    ``wait=False`` submits and raises :class:`BatchPending` instead of waiting. Errors of lines
    that failed for good are kept for the session, so asking again does not resubmit them.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        wait: bool = True,
        max_rounds: int = MAX_ROUNDS,
        on_progress: Callable[[BatchProgress], None] | None = None,
        poll_min: float = POLL_MIN,
        poll_max: float = POLL_MAX,
    ) -> None:
        endpoint = settings.endpoint()
        if endpoint.local:
            raise ConfigError(
                "the Batch API needs an OpenAI endpoint; the embedded model has none. Give "
                "base_url=/api_key= ($OPENAI_BASE_URL, $OPENAI_API_KEY) or drop batch=True"
            )
        cache_dir = settings.cache_path()
        if cache_dir is None:
            raise ConfigError(
                "the Batch API keeps its answers and its ledger in the cache; turn the cache on "
                "(drop cache=False / --no-cache) to use batch=True"
            )
        self.base_url = endpoint.base_url
        self.api_key = endpoint.api_key
        self.cache_dir = cache_dir
        self.cache: ResultCache = open_cache(cache_dir)
        self.ledger = Ledger(cache_dir)
        self.wait = wait
        self.max_rounds = max_rounds
        self.on_progress = on_progress
        self.poll_min = poll_min
        self.poll_max = poll_max
        self.run_id = uuid.uuid4().hex[:16]
        self.errors: dict[str, RowError] = {}
        self.lines_submitted = 0
        # The keys this session's rounds sent (or resumed), and those that earlier runs stopped
        # at exit 75 sent and did not report (see Ledger.unreported).
        self.keys_sent: set[str] = set()
        self.carried_keys = self.ledger.unreported()
        self.progress = BatchProgress()

    # -- the engine's hook ---------------------------------------------------------------------
    def complete(self, batch: Batch, texts: Sequence[str], keys: Sequence[str]) -> list[Outcome]:
        """Outcomes of the misses of an engine ``Batch``, sent as Batch API jobs."""
        from .engine import Outcome

        misses = {k: (batch, t) for k, t in zip(keys, texts, strict=True)}
        self.send(
            _Bodies(misses), path=PATHS[batch.kind], accept=lambda key, entry: _accept(batch, entry)
        )
        found = self.cache.get_many(list(keys))
        outcomes: list[Outcome] = []
        for key, hit in zip(keys, found, strict=True):
            outcome = batch.decode(hit)
            if outcome is None:
                error = self.errors.get(key) or ServerError("the Batch API gave no answer")
                outcome = Outcome(error=error)
            else:
                outcome.cached = False
            outcomes.append(outcome)
        return outcomes

    def send(
        self,
        requests: Mapping[str, Mapping[str, Any]],
        *,
        path: str = PATHS["chat"],
        accept: Accept | None = None,
    ) -> dict[str, RowError]:
        """Run ``requests`` (key -> body) through the Batch API until each is cached or failed.

        Returns the row error of each key that failed. Blocks (on the engine loop) unless the
        session does not wait, in which case it raises :class:`BatchPending` while batches run.
        A body is read from ``requests`` only when its line is written, so a mapping that
        renders bodies on demand keeps memory to the keys.
        """
        from .engine import engine_loop

        if any(k not in self.errors for k in requests):
            engine_loop().run(self.send_async(requests, path=path, accept=accept))
        return {k: self.errors[k] for k in requests if k in self.errors}

    async def send_async(
        self,
        requests: Mapping[str, Mapping[str, Any]],
        *,
        path: str = PATHS["chat"],
        accept: Accept | None = None,
    ) -> None:
        """The rounds, on the running loop: submit, wait, collect, resubmit what failed."""
        todo = [k for k in requests if k not in self.errors]
        reasons: dict[str, str] = {}
        async with _client(self.base_url, self.api_key) as client:
            for round_no in range(self.max_rounds + 1):
                todo = self._uncached(todo)
                if not todo:
                    return
                ids = await self._submit(client, requests, todo, path, round_no)
                got = Collected()
                ours = set(todo)
                if self.wait:
                    await self._wait(client, ids, accept, ours, got)
                else:
                    statuses = await self._poll(client, ids)
                    await self._collect_ended(client, statuses, accept, ours, got)
                    self.errors.update({k: e for k, e in got.fatal.items() if k in todo})
                    pending = [s.id for s in statuses if not s.ended]
                    if pending:
                        raise BatchPending(
                            f"{len(pending)} batch(es) pending; rerun the same command later",
                            pending,
                            self.base_url,
                        )
                self.errors.update({k: e for k, e in got.fatal.items() if k in todo})
                reasons.update(got.retry)
                todo = [
                    k
                    for k in todo
                    if k not in got.answered and k not in got.fatal and k not in self.errors
                ]
        for key in todo:
            why = reasons.get(key, "no answer")
            self.errors[key] = ServerError(
                f"the Batch API gave no answer after {self.max_rounds + 1} round(s); last: {why}"
            )

    def _uncached(self, keys: list[str]) -> list[str]:
        return [k for k, hit in zip(keys, self.cache.get_many(keys), strict=True) if hit is None]

    # -- submitting ----------------------------------------------------------------------------
    async def _submit(
        self,
        client: openai.AsyncOpenAI,
        requests: Mapping[str, Mapping[str, Any]],
        todo: Sequence[str],
        path: str,
        round_no: int,
    ) -> list[str]:
        """Submit the keys of ``todo`` not pending yet; the ids of every batch they wait on."""
        wanted = set(todo)
        if not self.ledger.exists():
            await self._recover(client)
        async with self.ledger.alocked() as entries:
            await self._adopt_unfinished(client, entries)
            waits_on: set[str] = set()
            pending: set[str] = set()
            for entry in entries.values():
                if entry.collected or entry.batch_id is None or entry.base_url != self.base_url:
                    continue
                keys = wanted.intersection(self.ledger.keys(entry.input_file_id))
                if keys:
                    waits_on.add(entry.batch_id)
                    pending |= keys
            fresh = ((k, requests[k]) for k in todo if k not in pending)
            for shard in shards(fresh, path):
                entry = await self._create(client, shard, path, round_no, entries)
                assert entry.batch_id is not None
                waits_on.add(entry.batch_id)
        return sorted(waits_on)

    async def _create(
        self,
        client: openai.AsyncOpenAI,
        shard: Shard,
        path: str,
        round_no: int,
        entries: dict[str, LedgerEntry],
    ) -> LedgerEntry:
        name = f"polars-llm-{self.run_id}-{shard.sha[:12]}.jsonl"
        uploaded = await _call(
            self.base_url,
            client.files.create(file=(name, io.BytesIO(shard.data)), purpose="batch"),
        )
        entry = LedgerEntry(
            input_file_id=uploaded.id,
            base_url=self.base_url,
            path=path,
            model=shard.model,
            keys_sha=shard.sha,
            lines=len(shard.keys),
            run_id=self.run_id,
            round=round_no,
            submitted_at=time.time(),
        )
        # Keys and entry go to disk before the batch exists: a crash right after create leaves
        # an entry that the next run matches to the batch by its input file.
        self.ledger.write_keys(uploaded.id, shard.keys)
        entries[uploaded.id] = entry
        self.ledger.write(entries)
        created = await _call(
            self.base_url,
            client.batches.create(
                input_file_id=uploaded.id,
                endpoint=path,  # type: ignore[arg-type]
                completion_window="24h",
                metadata={
                    TAG: "1",
                    "run_id": self.run_id,
                    "model": shard.model[:512],
                    "keys_sha": shard.sha,
                    "round": str(round_no),
                    "path": path,
                },
            ),
        )
        entry.batch_id = created.id
        entry.status = created.status
        self.ledger.write(entries)
        self.lines_submitted += len(shard.keys)
        return entry

    async def _adopt_unfinished(
        self, client: openai.AsyncOpenAI, entries: dict[str, LedgerEntry]
    ) -> None:
        """Match entries left between upload and batches.create to their batch, or drop them."""
        orphans = {
            e.input_file_id: e
            for e in entries.values()
            if e.batch_id is None and e.base_url == self.base_url
        }
        if not orphans:
            return
        async for batch in _recent_batches(client, self.base_url):
            entry = orphans.pop(batch.input_file_id, None)
            if entry is not None:
                entry.batch_id, entry.status = batch.id, batch.status
            if not orphans:
                break
        for input_file_id in orphans:
            # Never created: its keys are submitted again.
            del entries[input_file_id]
            self.ledger.forget_keys(input_file_id)

    async def _recover(self, client: openai.AsyncOpenAI) -> None:
        """Rebuild a missing ledger from the server's recent batches that polars-llm made."""
        found: dict[str, LedgerEntry] = {}
        async for batch in _recent_batches(client, self.base_url):
            meta = batch.metadata
            if TAG not in meta or batch.status == "failed":
                continue
            content = await _call(self.base_url, client.files.content(batch.input_file_id))
            keys = [json.loads(line)["custom_id"] for line in content.text.splitlines() if line]
            self.ledger.folder.mkdir(parents=True, exist_ok=True)
            self.ledger.write_keys(batch.input_file_id, keys)
            found[batch.input_file_id] = LedgerEntry(
                input_file_id=batch.input_file_id,
                base_url=self.base_url,
                path=meta.get("path", PATHS["chat"]),
                model=meta.get("model", ""),
                keys_sha=meta.get("keys_sha", ""),
                lines=len(keys),
                run_id=meta.get("run_id", ""),
                round=int(meta.get("round", "0")),
                submitted_at=float(batch.created_at),
                batch_id=batch.id,
                status=batch.status,
            )
        async with self.ledger.alocked() as entries:
            for k, e in found.items():
                entries.setdefault(k, e)

    # -- waiting and collecting ----------------------------------------------------------------
    async def _poll(self, client: openai.AsyncOpenAI, ids: Sequence[str]) -> list[BatchStatus]:
        """The batches' statuses, recorded in the ledger and reported as progress."""
        statuses = [
            BatchStatus.of(await _call(self.base_url, client.batches.retrieve(i))) for i in ids
        ]
        await self._record(statuses)
        self.progress = progress_of(statuses)
        if self.on_progress is not None:
            self.on_progress(self.progress)
        return statuses

    async def _wait(
        self,
        client: openai.AsyncOpenAI,
        ids: Sequence[str],
        accept: Accept | None,
        ours: set[str],
        got: Collected,
    ) -> None:
        """Poll with backoff until every batch has ended, collecting each as it ends."""
        delay = self.poll_min
        watched_running: set[str] = set()
        while True:
            statuses = await self._poll(client, ids)
            await self._collect_ended(client, statuses, accept, ours, got)
            for s in statuses:
                if s.status in ("cancelling", "cancelled") and s.id in watched_running:
                    raise BatchAborted(
                        f"batch {s.id} was cancelled while this run waited for it; the answers "
                        "it finished are cached. Rerun the same command to resubmit the rest"
                    )
                if not s.ended:
                    watched_running.add(s.id)
            if all(s.ended for s in statuses):
                return
            await asyncio.sleep(delay)
            delay = min(self.poll_max, delay * POLL_GROWTH)

    async def _record(self, statuses: Sequence[BatchStatus]) -> None:
        by_id = {s.id: s for s in statuses}
        async with self.ledger.alocked() as entries:
            for entry in entries.values():
                s = by_id.get(entry.batch_id or "")
                if s is None or entry.collected:
                    continue
                entry.status = s.status
                entry.completed, entry.failed = s.completed, s.failed
                entry.output_file_id, entry.error_file_id = s.output_file_id, s.error_file_id
                if s.errors:
                    entry.error = "; ".join(s.errors)

    async def _collect_ended(
        self,
        client: openai.AsyncOpenAI,
        statuses: Sequence[BatchStatus],
        accept: Accept | None,
        ours: set[str],
        got: Collected,
    ) -> None:
        """Download the files of the ended, uncollected batches among ``statuses`` into the
        cache; what each line said goes into ``got``."""
        ended = {s.id: s for s in statuses if s.ended}
        for entry in self.ledger.read().values():
            batch = ended.get(entry.batch_id or "")
            if batch is None or entry.collected:
                continue
            keys = self.ledger.keys(entry.input_file_id)
            if batch.status == "failed":
                await self._mark_collected(entry, batch)
                raise BatchAborted(
                    f"batch {batch.id} ({entry.lines} lines, model {entry.model}) failed "
                    f"validation: {'; '.join(batch.errors) or 'no reason given'}. Nothing of it "
                    "was charged; fix the cause and rerun"
                )
            seen: set[str] = set()
            for file_id in (batch.output_file_id, batch.error_file_id):
                if file_id is None:
                    continue
                content = await _call(self.base_url, client.files.content(file_id))
                for raw in content.text.splitlines():
                    if not raw.strip():
                        continue
                    line = json.loads(raw)
                    key = line.get("custom_id")
                    if not isinstance(key, str):
                        continue
                    seen.add(key)
                    self._take_line(entry, key, line, accept if key in ours else None, got)
            for key in keys:
                if key not in seen:
                    got.retry[key] = f"not in the batch's files (batch {batch.status})"
            self.cache.flush()
            await self._mark_collected(entry, batch)

    def _take_line(
        self,
        entry: LedgerEntry,
        key: str,
        line: Mapping[str, Any],
        accept: Accept | None,
        got: Collected,
    ) -> None:
        response = line.get("response") or {}
        if not line.get("error") and response.get("status_code") == 200:
            cached = _entry(entry.path, response.get("body") or {})
            problem = accept(key, cached) if accept is not None else None
            if problem is None:
                self.cache.put(key, cached)
                got.answered.add(key)
            else:
                got.fatal[key] = problem
            return
        fatal, why = _line_failure(self.base_url, line)
        if fatal is not None:
            got.fatal[key] = fatal
        else:
            got.retry[key] = why

    async def _mark_collected(self, entry: LedgerEntry, batch: BatchStatus) -> None:
        async with self.ledger.alocked() as entries:
            current = entries.get(entry.input_file_id)
            if current is None:
                return
            current.collected = True
            current.status = batch.status
            current.completed, current.failed = batch.completed, batch.failed
            current.output_file_id, current.error_file_id = (
                batch.output_file_id,
                batch.error_file_id,
            )
            if batch.errors:
                current.error = "; ".join(batch.errors)
        entry.collected = True
        self.ledger.forget_keys(entry.input_file_id)


def _omit() -> Any:
    import openai

    return openai.omit


async def _recent_batches(client: openai.AsyncOpenAI, base_url: str) -> Any:
    """The server's batches, newest first, back to RECOVER_SECONDS ago."""
    oldest = time.time() - RECOVER_SECONDS
    after: str | None = None
    for _ in range(RECOVER_PAGES):
        page = await _call(
            base_url,
            client.batches.list(limit=100, after=after if after else _omit()),
        )
        for batch in page.data:
            if batch.created_at < oldest:
                return
            yield BatchStatus.of(batch)
        if not page.data or not page.has_more:
            return
        after = page.data[-1].id


# --------------------------------------------------------------------------------------------
# Shards
# --------------------------------------------------------------------------------------------
@dataclass
class Shard:
    """One input file: lines of one model, within the line and byte limits."""

    model: str
    keys: list[str]
    data: bytes
    sha: str


def shards(
    requests: Iterable[tuple[str, Mapping[str, Any]]],
    path: str,
    max_lines: int = MAX_LINES,
    max_bytes: int = MAX_BYTES,
) -> Iterator[Shard]:
    """JSONL input files for ``requests`` (key, body): one model per file, within the limits."""
    open_shards: dict[str, tuple[list[str], list[bytes], int]] = {}

    def close(model: str) -> Shard:
        keys, lines, _ = open_shards.pop(model)
        sha = hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()
        return Shard(model, keys, b"".join(lines), sha)

    for key, body in requests:
        model = str(body.get("model"))
        line = (
            json.dumps(
                {"custom_id": key, "method": "POST", "url": path, "body": body},
                ensure_ascii=False,
                separators=(",", ":"),
            )
            + "\n"
        ).encode()
        if len(line) > max_bytes:
            raise ConfigError(
                f"one request is {len(line):,} bytes, more than a batch file may hold; "
                "shorten the prompt"
            )
        current = open_shards.get(model)
        if current is not None and (
            len(current[0]) >= max_lines or current[2] + len(line) > max_bytes
        ):
            yield close(model)
            current = None
        if current is None:
            current = open_shards[model] = ([], [], 0)
        keys, lines, size = current
        keys.append(key)
        lines.append(line)
        open_shards[model] = (keys, lines, size + len(line))
    for model in list(open_shards):
        yield close(model)


# --------------------------------------------------------------------------------------------
# Management: what `polars-llm batch list|status|cancel` do
# --------------------------------------------------------------------------------------------
def list_batches(cache_dir: Path) -> list[LedgerEntry]:
    """The ledger's batches, oldest first, as last seen (no call is made)."""
    return sorted(Ledger(cache_dir).read().values(), key=lambda e: e.submitted_at)


def _managed(settings: Settings) -> tuple[Ledger, str | None, str]:
    """The ledger of ``settings``' cache folder, the endpoint to keep to (None: every one the
    ledger names) and the API key."""
    cache_dir = settings.cache_path()
    if cache_dir is None:
        raise ConfigError("the batches are listed in the cache folder; give --cache-dir")
    base_url = settings.base_url or os.environ.get("OPENAI_BASE_URL") or None
    api_key = settings.api_key or os.environ.get("OPENAI_API_KEY") or "unused"
    return Ledger(cache_dir), base_url.rstrip("/") if base_url else None, api_key


def _running(entries: Iterable[LedgerEntry], base_url: str | None) -> list[LedgerEntry]:
    return [
        e
        for e in entries
        if e.batch_id
        and not e.collected
        and e.status not in ENDED
        and (base_url is None or e.base_url == base_url)
    ]


def _each_endpoint(
    entries: Sequence[LedgerEntry],
    api_key: str,
    call: Callable[[openai.AsyncOpenAI, str, str], Awaitable[Any]],
) -> list[BatchStatus]:
    """``call(client, base_url, batch_id)`` for each entry, on the engine loop."""
    from .engine import engine_loop

    async def run() -> list[BatchStatus]:
        statuses: list[BatchStatus] = []
        for base_url in sorted({e.base_url for e in entries}):
            async with _client(base_url, api_key) as client:
                for e in entries:
                    if e.base_url == base_url:
                        got = await _call(base_url, call(client, base_url, e.batch_id or ""))
                        statuses.append(BatchStatus.of(got))
        return statuses

    return list(engine_loop().run(run())) if entries else []


def _update(ledger: Ledger, statuses: Sequence[BatchStatus]) -> None:
    by_id = {s.id: s for s in statuses}
    with ledger.locked() as entries:
        for entry in entries.values():
            s = by_id.get(entry.batch_id or "")
            if s is not None and not entry.collected:
                entry.status, entry.completed, entry.failed = s.status, s.completed, s.failed
                if s.errors:
                    entry.error = "; ".join(s.errors)


def refresh(settings: Settings) -> list[LedgerEntry]:
    """The ledger's batches, with the status of those still running asked of their endpoint."""
    ledger, base_url, api_key = _managed(settings)
    running = _running(ledger.read().values(), base_url)
    _update(
        ledger,
        _each_endpoint(running, api_key, lambda c, _, i: c.batches.retrieve(i)),
    )
    return list_batches(ledger.folder.parent)


def cancel(settings: Settings, batch_ids: Sequence[str] = ()) -> list[str]:
    """Cancel the given batches, or every running batch of the ledger; returns their ids."""
    ledger, base_url, api_key = _managed(settings)
    entries = ledger.read().values()
    if batch_ids:
        by_id = {e.batch_id: e for e in entries if e.batch_id}
        unknown = [i for i in batch_ids if i not in by_id]
        if unknown:
            raise ConfigError(
                f"no batch {', '.join(unknown)} in the ledger of {ledger.folder.parent}; "
                "see `polars-llm batch list`"
            )
        chosen = [by_id[i] for i in batch_ids]
    else:
        chosen = _running(entries, base_url)
    _update(ledger, _each_endpoint(chosen, api_key, lambda c, _, i: c.batches.cancel(i)))
    return [e.batch_id or "" for e in chosen]


def submit(
    requests: Mapping[str, Mapping[str, Any]], settings: Settings, *, path: str = PATHS["chat"]
) -> list[str]:
    """Submit what ``requests`` (key -> body) still need, without waiting; the batch ids."""
    session = BatchSession(settings, wait=False)
    try:
        session.send(requests, path=path)
    except BatchPending as e:
        return e.batch_ids
    return []


def collect(settings: Settings) -> int:
    """Download every ended, uncollected batch of the ledger into the cache; answers written."""
    from .engine import engine_loop

    session = BatchSession(settings)
    ids = [
        e.batch_id
        for e in session.ledger.read().values()
        if e.batch_id and not e.collected and e.base_url == session.base_url
    ]

    async def run() -> int:
        got = Collected()
        async with _client(session.base_url, session.api_key) as client:
            statuses = await session._poll(client, ids)
            await session._collect_ended(client, statuses, None, set(), got)
        return len(got.answered)

    return int(engine_loop().run(run())) if ids else 0


# --------------------------------------------------------------------------------------------
# Dependent steps: successive rounds, each step read from the cache
# --------------------------------------------------------------------------------------------
class BatchRun:
    """One job's sessions, one per endpoint and cache folder, sharing how they wait."""

    def __init__(
        self,
        *,
        wait: bool = True,
        on_progress: Callable[[BatchProgress], None] | None = None,
        max_rounds: int = MAX_ROUNDS,
        poll_min: float = POLL_MIN,
        poll_max: float = POLL_MAX,
    ) -> None:
        self.options: dict[str, Any] = {
            "wait": wait,
            "on_progress": on_progress,
            "max_rounds": max_rounds,
            "poll_min": poll_min,
            "poll_max": poll_max,
        }
        self.sessions: dict[tuple[str, str, str], BatchSession] = {}
        # Keys sent in this run's batches (or in those of runs that stopped at exit 75 before
        # it) and not yet counted in a frame's tallies: their answers, read back from the
        # cache, were paid for rather than served from it.
        self.sent: set[str] = set()
        # Keys counted as paid by this run.
        self.counted: set[str] = set()

    def session(self, settings: Settings) -> BatchSession:
        """The session for the endpoint and cache folder of ``settings``."""
        endpoint = settings.endpoint()
        ident = (endpoint.base_url, endpoint.api_key, str(settings.cache_path()))
        found = self.sessions.get(ident)
        if found is None:
            found = self.sessions[ident] = BatchSession(settings, **self.options)
            self.sent |= found.carried_keys
        return found

    @property
    def lines_submitted(self) -> int:
        return sum(s.lines_submitted for s in self.sessions.values())

    def keep_unreported(self) -> None:
        """Stopping at exit 75: leave the keys this run sent (and those it carried) and has not
        counted in each ledger, for the run that reads their answers to count them as paid."""
        for s in self.sessions.values():
            keys = (s.keys_sent | s.carried_keys) - self.counted
            if keys:
                s.ledger.keep_unreported(keys)

    def settle_counted(self, paid: set[str]) -> None:
        """The keys a frame counted as paid are reported: no ledger keeps them."""
        fresh = paid - self.counted
        if not fresh:
            return
        self.counted |= fresh
        for ledger in {s.ledger.folder: s.ledger for s in self.sessions.values()}.values():
            ledger.drop_unreported(fresh)


_run: contextvars.ContextVar[BatchRun | None] = contextvars.ContextVar(
    "polars_llm_batch_run", default=None
)


@contextlib.contextmanager
def active(run: BatchRun) -> Iterator[BatchRun]:
    """Make ``run`` the one that batch-mode calls of this thread use (and whose errors they see)."""
    token = _run.set(run)
    try:
        yield run
    finally:
        _run.reset(token)


def current_run() -> BatchRun:
    """The active run if there is one, else a new one that waits."""
    run = _run.get()
    return run if run is not None else BatchRun()


def session_for(settings: Settings) -> BatchSession:
    """The session of the active run (or of a new run that waits) for ``settings``."""
    return current_run().session(settings)


Misses = dict[tuple["BatchSession", str], dict[str, tuple["Batch", str]]]


@dataclass
class Evaluation:
    """One pass of steps over a frame, from the cache and the run's known errors only."""

    results: list[list[Any]]
    errors: list[str | None]
    # Per session and endpoint path, the requests still to send: key -> (engine batch, text).
    misses: Misses
    failed_by_reason: dict[str, int] = field(default_factory=dict)
    # Per step, each row's (key, outcome): the answers from the cache and the known errors.
    answered: list[list[tuple[str, Outcome]]] = field(default_factory=list)
    batches: list[Batch] = field(default_factory=list)


def evaluate(
    df: pl.DataFrame, steps: Sequence[Step], settings: Settings, run: BatchRun
) -> Evaluation:
    """Run ``steps`` over ``df`` step by step from the cache: no call is made.

    A row stops at its first step whose answer is neither cached nor a known error; that
    request is returned among the misses, for the next batch round.
    """
    from .engine import Batch, Outcome
    from .pipeline import _as_text, _Template

    batches = [Batch(step.spec(settings)) for step in steps]
    inputs = sorted({n for s in steps for n in placeholders(s.template)} & set(df.columns))
    strings = {c: df.get_column(c).cast(pl.String).to_list() for c in inputs}
    values: list[dict[str, str | None]] = [
        {c: strings[c][i] for c in inputs} for i in range(df.height)
    ]
    ev = Evaluation([[None] * df.height for _ in steps], [None] * df.height, {})
    ev.answered = [[] for _ in steps]
    ev.batches = batches
    alive = list(range(df.height))
    for k, (step, batch) in enumerate(zip(steps, batches, strict=True)):
        session = run.session(batch.settings.replace(model=batch.model))
        template = _Template(step.template)
        texts: dict[int, str] = {}
        for i in alive:
            text = template.render(values[i])
            if text is None:
                values[i][step.name] = None
            else:
                texts[i] = text
        unique = list(dict.fromkeys(texts.values()))
        keys, found = batch.lookup(unique)
        by_text = dict(zip(unique, zip(keys, found, strict=True), strict=True))
        still: list[int] = []
        for i in alive:
            if i not in texts:
                still.append(i)
                continue
            key, outcome = by_text[texts[i]]
            if outcome is not None:
                ev.answered[k].append((key, outcome))
                ev.results[k][i] = outcome.value
                values[i][step.name] = _as_text(outcome.value)
                still.append(i)
                continue
            error = session.errors.get(key)
            if error is not None:
                ev.answered[k].append((key, Outcome(error=error)))
                ev.errors[i] = f"{step.name}: {error.reason}: {error.message}"
                ev.failed_by_reason[error.reason] = ev.failed_by_reason.get(error.reason, 0) + 1
                continue
            where = (session, PATHS[batch.kind])
            ev.misses.setdefault(where, {})[key] = (batch, texts[i])
        alive = still
    return ev


def run_in_rounds(
    frames: Callable[[], Iterable[pl.DataFrame]],
    steps: Sequence[Step],
    settings: Settings,
    run: BatchRun,
) -> None:
    """Send every step's misses over all ``frames`` as batch rounds until none is left.

    Each round evaluates the frames from the cache; rows whose next step is not cached send it
    in this round's batches, so step b goes out once step a's answers are in. ``frames`` is
    called once per round (a Parquet file is read again rather than held in memory).
    """
    previous: set[str] | None = None
    while True:
        misses: Misses = {}
        for df in frames():
            for where, found in evaluate(df, steps, settings, run).misses.items():
                misses.setdefault(where, {}).update(found)
        keys = {k for found in misses.values() for k in found}
        if not keys:
            return
        if keys == previous:
            # Answers that arrive but do not read back from the cache: stop rather than loop.
            raise BatchAborted(
                f"{len(keys)} answer(s) came back from the Batch API but cannot be read back "
                "from the cache; check that the cache folder is writable"
            )
        previous = keys
        for (session, path), found in misses.items():
            run.sent.update(found)
            session.keys_sent.update(found)
            try:
                session.send(
                    _Bodies(found),
                    path=path,
                    accept=functools.partial(_accept_found, found),
                )
            except BatchPending:
                run.keep_unreported()
                raise


class _Bodies(Mapping[str, Mapping[str, Any]]):
    """Request bodies rendered when read: a round holds the prompts, not their bodies."""

    def __init__(self, found: Mapping[str, tuple[Batch, str]]) -> None:
        self.found = found

    def __getitem__(self, key: str) -> Mapping[str, Any]:
        batch, text = self.found[key]
        if batch.kind == "embed":
            return {"model": batch.model, "input": text, **batch.params}
        return batch.template.body(text)

    def __iter__(self) -> Iterator[str]:
        return iter(self.found)

    def __len__(self) -> int:
        return len(self.found)


def _accept_found(
    found: Mapping[str, tuple[Batch, Any]], key: str, entry: dict[str, Any]
) -> RowError | None:
    return _accept(found[key][0], entry)


def pipeline_in_rounds(
    df: pl.DataFrame, steps: Sequence[Step], settings: Settings, stats: PipelineStats
) -> tuple[list[list[Any]], list[str | None]]:
    """:func:`polars_llm.pipeline` through the Batch API: each step's values and row errors.

    Sends what is missing in rounds (with the active :class:`BatchRun`, or one that waits),
    then reads every step from the cache.
    """
    run = current_run()
    before = run.lines_submitted
    run_in_rounds(lambda: [df], steps, settings, run)
    ev = evaluate(df, steps, settings, run)
    failed = [e for e in ev.errors if e is not None]
    stats.rows_done += df.height - len(failed)
    stats.rows_failed += len(failed)
    for reason, n in ev.failed_by_reason.items():
        stats.failures_by_reason[reason] = stats.failures_by_reason.get(reason, 0) + n
    stats.calls += run.lines_submitted - before
    run.settle_counted(_count_steps(stats, steps, ev, run))
    return ev.results, ev.errors


def _count_steps(
    stats: PipelineStats, steps: Sequence[Step], ev: Evaluation, run: BatchRun
) -> set[str]:
    """Each step's tallies, as the synchronous pipeline counts them: an answer per row, a
    request per key this run's batches sent (one line each), tokens once per key, as paid or as
    served from the cache. A key sent by this run counts as paid in the first frame that reads
    it back, and as cached in later frames (as a prompt repeated across a synchronous run's
    streaming batches is). Returns the keys counted as paid."""
    from .pipeline import StepStats, _tally, sum_steps

    counted: set[str] = set()
    for step, batch, answered in zip(steps, ev.batches, ev.answered, strict=True):
        tally = stats.steps.setdefault(step.name, StepStats())
        tally.endpoint, tally.model = batch.base_url, batch.model
        stats.endpoints[step.name] = (batch.base_url, batch.model)
        seen: set[str] = set()
        paid: set[str] = set()
        for key, outcome in answered:
            if key in run.sent:
                paid.add(key)
                if outcome.error is None:
                    outcome = dataclasses.replace(outcome, cached=False)
            elif outcome.error is not None:
                seen.add(key)  # its failed line was counted by the frame that read it first
            requests = tally.requests
            _tally(tally, outcome, key, seen)
            tally.calls += tally.requests - requests  # one batch line per request
        run.sent -= paid
        counted |= paid
    sum_steps(stats)
    # The synchronous pipeline counts its cache hits as it goes; here the tallies have them.
    stats.cached = sum(t.cached for t in stats.steps.values())
    return counted


def enrich_frame(
    df: pl.DataFrame, steps: Sequence[Step], settings: Settings, stats: PipelineStats
) -> pl.DataFrame:
    """``df`` with a column per step and the row errors' column, through the Batch API."""
    from .pipeline import ERROR_COLUMN

    results, errors = pipeline_in_rounds(df, steps, settings, stats)
    new = [
        pl.Series(step.name, results[k], dtype=step.post().dtype) for k, step in enumerate(steps)
    ]
    return df.with_columns([*new, pl.Series(ERROR_COLUMN, errors, dtype=pl.String)])
