"""The on-disk result cache: sha256 request keys to JSON objects, over diskcache.

Only JSON strings go in and only strings come out: diskcache would pickle other values and unpickle
whatever it finds, so a tampered cache folder could run code (CVE-2025-69872). ``_StrictDisk``
refuses pickled entries outright.

Writes go through one writer thread per cache, which drains everything queued into one
transaction: the event loop never waits on an SQLite write, a busy run batches its writes, and a
quiet one writes each result as soon as it arrives (a crash keeps what was answered). Until the
writer has committed an answer, lookups find it in a pending overlay, so a lookup right after a
``put`` (the streaming engine's next morsel) never pays for it again. The answers written lately
stay in memory too (up to 64 MiB of text): ``peek(key)`` finds them without touching SQLite, cheap
enough for the event loop right before a call is paid for. Lookups all happen at the start of a
batch, so a batch must ``peek`` again before sending: another batch may have been answered since.

A cache that cannot be used never stops a run. A damaged database or a read-only folder makes
the whole cache a miss (``problem`` says why) and an unreadable entry (not JSON, not an object, a
truncated value file) is a miss; each kind is told once per cache as a ``CacheWarning``. An answer
that cannot be stored (a lone surrogate) is skipped with a warning, and never fails the other
answers written in the same transaction.

Write errors belong to their owner: ``put(key, value, owner)`` files a failed write under
``owner`` and ``flush(owner)`` raises only that owner's error, so a write error of one batch never
fails another. ``put``/``flush`` without an owner share the owner ``None``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import fcntl
import gc
import json
import os
import queue
import re
import shutil
import sqlite3
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import diskcache
import orjson

from .errors import CacheWriteError, ConfigError, InputError


class CacheWarning(UserWarning):
    """The cache could not be used as it is; polars-llm went on without the part it could not use."""


class _StrictDisk(diskcache.Disk):
    """A diskcache Disk that stores and returns strings only, never pickles."""

    def store(self, value: Any, read: bool, key: Any = diskcache.core.UNKNOWN) -> Any:
        if not isinstance(value, str):
            raise TypeError("the polars-llm cache stores JSON strings only")
        return super().store(value, read, key=key)

    def fetch(self, mode: int, filename: str | None, value: Any, read: bool) -> Any:
        if mode == diskcache.core.MODE_PICKLE:
            # Someone else's pickle: never load it; treat as a miss.
            return None
        return super().fetch(mode, filename, value, read)


# Keys per bulk read, passed as one JSON array: the keys are looked up one by one in the index
# (the CROSS JOIN keeps json_each the outer loop, so a large cache is never scanned).
_READ_CHUNK = 20_000
# Each row: the key's place in the array, and its text when stored inline (else NULL).
_SELECT = (
    f"SELECT j.key, CASE WHEN c.mode = {diskcache.core.MODE_RAW} AND typeof(c.value) = 'text' "
    "THEN c.value END FROM json_each(?1) AS j CROSS JOIN Cache AS c "
    "ON c.key = j.value AND c.raw = 1 WHERE c.expire_time IS NULL OR c.expire_time > ?2"
)
# How long the writer gathers answers before writing them in one transaction. A commit per answer
# costs several times the insert itself, and waking the writer for each answer costs the event
# loop too; lookups see answers not yet written (the pending overlay), so only a crash in these
# few milliseconds could lose what they hold.
_GATHER = 0.005
# A busy run (at least _BUSY answers per _GATHER: 800 a second) gathers on, up to _GATHER_BUSY
# seconds: SQLite costs a fraction per answer in large transactions of what it costs in small
# ones, and that CPU is taken from the event loop's. Only that long of answers is at risk in a
# crash.
_BUSY = 4
_GATHER_BUSY = 0.05
# One row of diskcache's table for a text stored inline (what ``Cache.set`` writes for it), or
# the same columns updated when the key is there already.
_UPSERT = (
    "INSERT INTO Cache(key, raw, store_time, expire_time, access_time, access_count, tag, size, "
    "mode, filename, value) SELECT json_extract(e.value, '$[0]'), 1, ?1, NULL, ?1, 0, NULL, 0, ?2, NULL, "
    "json_extract(e.value, '$[1]') FROM json_each(?3) AS e WHERE true "
    "ON CONFLICT(key, raw) DO UPDATE SET store_time = excluded.store_time, expire_time = NULL, "
    "access_time = excluded.access_time, access_count = 0, tag = NULL, size = 0, "
    "mode = excluded.mode, filename = NULL, value = excluded.value"
)
# The value files of entries about to be replaced (huge answers are kept in files).
_REPLACED = (
    "SELECT filename FROM Cache WHERE raw = 1 AND filename IS NOT NULL AND key IN "
    "(SELECT value FROM json_each(?))"
)
_STOP = object()
_FLUSH = object()
# diskcache writes its settings to SQLite every time a cache is opened. Hundreds of processes
# doing that at once on one folder have deadlocked, so openers take turns behind a file lock,
# and a database busy with a long write is retried for up to this many seconds.
_OPEN_TIMEOUT = 120.0
# How long one SQLite statement waits for another process's write transaction.
_SQLITE_TIMEOUT = 30.0
_LOCK_FILE = ".polars-llm-open.lock"
# Characters of recently written answers kept in memory for peek (and lookups).
_RECENT_BYTES = 64 * 2**20
# What diskcache keeps in a cache folder: the database and two levels of value-file folders.
_DB_FILES = ("cache.db", "cache.db-wal", "cache.db-shm")
_VALUE_DIR = re.compile(r"[0-9a-f]{2}")
_KEY = re.compile(r"[0-9a-f]{64}")


class ResultCache:
    """Results by request key, as JSON objects; safe to share across threads."""

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory).expanduser()
        # Why the cache is not in use (damaged, read-only), or None when it is.
        self.problem: str | None = None
        # Whether that is because its database is damaged (clearing it is then the remedy).
        self.damaged = False
        self._cache: diskcache.Cache | None = None
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(
                f"cannot open the cache folder {self.directory}: {e}. "
                "Set cache_dir= or $POLARS_LLM_CACHE_DIR to a writable folder, or cache=False."
            ) from e
        self._warned: set[str] = set()
        self._warn_lock = threading.Lock()
        try:
            self._cache = _open_diskcache(self.directory)
        except (sqlite3.Error, OSError, diskcache.Timeout) as e:
            self.damaged = _is_damage(e)
            self.problem = _describe_open_error(self.directory, e)
            self._warn("open", f"{self.problem}; going on without the cache")
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        # Set when a flush or a stop is queued: the writer stops gathering and writes at once.
        self._urgent = threading.Event()
        self._writer: threading.Thread | None = None
        self._writer_lock = threading.Lock()
        # Answers put but not yet committed: key -> JSON text.
        self._pending: dict[str, str] = {}
        # Answers committed lately, oldest first, up to _RECENT_BYTES of text: peek finds them
        # without SQL, so a call about to be sent can check for an answer that just arrived.
        self._recent: OrderedDict[str, str] = OrderedDict()
        self._recent_size = 0
        self._pending_lock = threading.Lock()
        self._errors: dict[object, BaseException] = {}

    # -- reads ---------------------------------------------------------------------------------
    def get_many(self, keys: list[str]) -> list[dict[str, Any] | None]:
        """The cached result of each key, or None.

        An entry that is not a JSON object is a miss, told once as a ``CacheWarning``.
        """
        return [self._decode(text) for text in self.get_raw_many(keys)]

    def get_raw_many(self, keys: list[str]) -> list[str | None]:
        """The JSON text cached for each key, or None; not decoded (``decode`` does that).

        Answers put but not yet on disk come first. The rest are read thousands of keys per SQL
        statement on diskcache's own connection (the keys go in as one JSON array), far faster
        than one ``get`` per key: a fully cached column of a million rows is read in a fraction
        of a second. Only entries stored inline as text are taken this way; any other entry
        (stored in a file, say) goes through diskcache's ``get`` and ``_StrictDisk``.
        """
        found: dict[str, str] = {}
        with self._pending_lock:
            if self._pending or self._recent:
                for k in keys:
                    text = self._pending.get(k) or self._recent.get(k)
                    if text is not None:
                        found[k] = text
        rest = [k for k in keys if k not in found] if found else keys
        if self._cache is not None and rest:
            try:
                self._read(rest, found)
            except (sqlite3.Error, OSError) as e:
                self._warn(
                    "read",
                    f"cannot read the cache at {self.directory} ({e}); its answers are treated "
                    f"as missing. {_REMEDY.format(folder=self.directory)}",
                )
        return [found.get(k) for k in keys]

    def decode(self, text: str | None) -> dict[str, Any] | None:
        """The entry of a JSON text from ``get_raw_many``, or None (a miss)."""
        return self._decode(text)

    def _read(self, keys: list[str], found: dict[str, str]) -> None:
        cache = self._cache
        assert cache is not None
        slow: list[str] = []
        sql = cache._sql  # diskcache's per-thread connection: the documented schema below
        now = time.time()
        for start in range(0, len(keys), _READ_CHUNK):
            chunk = keys[start : start + _READ_CHUNK]
            for i, value in sql(_SELECT, (orjson.dumps(chunk).decode(), now)):
                if value is not None:
                    found[chunk[i]] = value
                else:
                    slow.append(chunk[i])
        for key in slow:
            try:
                value = cache.get(key)
            except (OSError, UnicodeDecodeError) as e:  # a value file truncated or unreadable
                self._unreadable(e)
                continue
            if isinstance(value, str):
                found[key] = value
            else:
                self._unreadable(TypeError("not text"))

    def _decode(self, text: str | None) -> dict[str, Any] | None:
        if text is None:
            return None
        try:
            # orjson reads an entry in a fraction of json's time: a million cached rows are
            # decoded in the caller's thread. It refuses NaN, which json wrote for a NaN in a
            # vector: those few entries take the slow way.
            value = orjson.loads(text)
        except orjson.JSONDecodeError:
            try:
                value = json.loads(text)
            except ValueError as e:
                self._unreadable(e)
                return None
        if not isinstance(value, dict):
            self._unreadable(TypeError(f"a JSON {type(value).__name__}, not an object"))
            return None
        # An answer is text or a vector: anything else would come back as a silent null.
        text, vector = value.get("text", ""), value.get("vector", [])
        if not isinstance(text, str) or not isinstance(vector, list):
            self._unreadable(TypeError(f"an answer of {text!r:.40} / {vector!r:.40}"))
            return None
        return value

    def _unreadable(self, error: BaseException) -> None:
        self._warn(
            "entry",
            f"the cache at {self.directory} has unreadable entries (first: {error}); they are "
            "treated as missing and asked again",
        )

    def get(self, key: str) -> dict[str, Any] | None:
        """The cached result of one key, or None."""
        return self.get_many([key])[0]

    def peek(self, key: str) -> dict[str, Any] | None:
        """An answer this process put lately (on disk or not yet), without reading the disk.

        Cheap enough for the event loop: check it right before paying for a call, since another
        batch (the streaming engine's next morsel) may have received the answer after this one
        looked the key up.
        """
        with self._pending_lock:
            text = self._pending.get(key) or self._recent.get(key)
        return self._decode(text)

    # -- writes --------------------------------------------------------------------------------
    def put(self, key: str, value: dict[str, Any], owner: object = None) -> None:
        """Queue a result for writing; returns at once. ``flush(owner)`` waits until it is on disk.

        Lookups see the result at once. If the write fails, ``flush(owner)`` raises the error,
        and only for that owner.
        """
        if self._cache is None:
            return
        text = _dumps(value)
        with self._pending_lock:
            self._pending[key] = text
        self._ensure_writer()
        self._queue.put((key, text, owner))

    def flush(self, owner: object = None) -> None:
        """Wait until every queued result is written; raise ``owner``'s write failure, if any."""
        if self._writer is not None:
            done = threading.Event()
            self._queue.put((_FLUSH, done))
            self._urgent.set()
            done.wait()
        error = self._errors.pop(owner, None)
        if error is not None:
            raise CacheWriteError(
                f"could not write to the cache at {self.directory}: {error}. Free some space or "
                "set cache_dir= / $POLARS_LLM_CACHE_DIR to another folder"
            ) from error

    def _ensure_writer(self) -> None:
        if self._writer is not None:
            return
        with self._writer_lock:
            if self._writer is None:
                self._writer = threading.Thread(
                    target=self._write_loop, name="polars-llm-cache-writer", daemon=True
                )
                self._writer.start()

    def _write_loop(self) -> None:
        # One method call per transaction: nothing it held (answers, and through their owners
        # whole batches) outlives it while the thread waits for the next answer.
        while self._write_next():
            pass
        # This thread's own connection: the last one to close cleans up the WAL files.
        if self._cache is not None:
            self._cache.close()

    def _write_next(self) -> bool:
        """Wait for answers, gather, write them in one transaction; False after a stop."""
        items = [self._queue.get()]
        self._urgent.clear()  # a flush queued from now on cuts the gathering short
        # Let a busy run's answers gather (see _GATHER): a look after _GATHER, and at a busy
        # run's pace one more at _GATHER_BUSY, each time draining what else is waiting. Two
        # wakes, not one per _GATHER: each wake takes the GIL from the event loop. A flush
        # or a stop waits for nothing.
        for gather in (_GATHER, _GATHER_BUSY - _GATHER) if _is_entry(items[0]) else ():
            self._urgent.wait(gather)
            before = len(items)
            while True:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if not all(_is_entry(i) for i in items[before:]) or len(items) - before < _BUSY:
                break
        entries = [i for i in items if _is_entry(i)]
        if entries:
            self._write(entries)
        for item in items:
            if isinstance(item, tuple) and item[0] is _FLUSH:
                item[1].set()
        return not any(i is _STOP for i in items)

    def _write(self, entries: list[tuple[str, str, object]]) -> None:
        cache = self._cache
        assert cache is not None
        written = entries
        try:
            try:
                with cache.transact():
                    replaced = _set_many(cache, entries)
                for filename in replaced:  # after the commit, as diskcache's own set does
                    cache.disk.remove(filename)
            except Exception:
                # One by one, so one answer that cannot be stored fails only itself.
                written = []
                for key, text, owner in entries:
                    try:
                        cache.set(key, text)
                        written.append((key, text, owner))
                    except ValueError as e:  # a lone surrogate: not encodable as UTF-8
                        self._warn(
                            "unstorable",
                            f"an answer could not be stored in the cache at {self.directory} "
                            f"({e}); it was skipped, and a rerun asks for it again",
                        )
                    except Exception as e:  # full disk, lost permissions: the owner is told
                        self._errors.setdefault(owner, e)
        finally:
            with self._pending_lock:
                for key, text, _ in written:
                    self._recent_size += len(text) - len(self._recent.pop(key, ""))
                    self._recent[key] = text
                while self._recent_size > _RECENT_BYTES:
                    self._recent_size -= len(self._recent.popitem(last=False)[1])
                for key, text, _ in entries:
                    # A later put of the same key stays pending until it is written too.
                    if self._pending.get(key) is text:
                        del self._pending[key]

    # -- the whole cache -----------------------------------------------------------------------
    def __len__(self) -> int:
        return 0 if self._cache is None else len(self._cache)

    def volume(self) -> int:
        """Bytes the cache takes on disk."""
        return 0 if self._cache is None else int(self._cache.volume())

    def clear(self) -> int:
        """Remove every entry; returns how many there were."""
        self.flush()
        with self._pending_lock:
            self._recent.clear()
            self._recent_size = 0
        if self._cache is None:
            return 0
        return int(self._cache.clear())

    def release(self) -> None:
        """Close, and let go of the database: every thread's connection to it closes now, and
        answers put from now on are not stored (its folder is gone)."""
        self.close()  # this thread's connection and the writer's
        cache = self._cache
        if cache is not None:
            # The connections are diskcache's, one per thread in a thread-local, and only the
            # thread that opened one may close it: the engine's cache-read threads close theirs.
            for reader in list(_readers):
                try:
                    reader.submit(cache.close).result(timeout=_READER_CLOSE_WAIT)
                except RuntimeError:  # shut down (a closed engine): its threads are gone
                    with contextlib.suppress(ValueError):
                        _readers.remove(reader)
                except TimeoutError:  # busy with a long read: it closes after, a collection now
                    pass
        self._cache = None

    def close(self) -> None:
        """Write what is queued, stop the writer and close the database."""
        if self._writer is not None:
            self.flush()
            self._queue.put(_STOP)
            self._urgent.set()
            self._writer.join()
            self._writer = None
        if self._cache is not None:
            self._cache.close()

    # -- export and import ---------------------------------------------------------------------
    def export_parquet(self, path: Path) -> int:
        """Write every readable entry to a Parquet file of ``key`` and ``value`` (JSON text).

        The file appears atomically: it is written next to ``path`` and moved onto it. Returns
        how many entries were written; unreadable entries are left out with a warning.
        """
        import pyarrow as pa
        import pyarrow.parquet as pq

        cache = self._require()
        schema = pa.schema([("key", pa.string()), ("value", pa.string())])
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        written = 0
        try:
            with pq.ParquetWriter(tmp, schema) as writer:
                for keys in _key_chunks(cache):
                    values = self.get_many(keys)
                    pairs = [(k, v) for k, v in zip(keys, values, strict=True) if v is not None]
                    if not pairs:
                        continue
                    writer.write_table(
                        pa.table(
                            {
                                "key": [k for k, _ in pairs],
                                "value": [_dumps(v) for _, v in pairs],
                            },
                            schema=schema,
                        )
                    )
                    written += len(pairs)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        return written

    def import_parquet(self, path: Path) -> tuple[int, int]:
        """Add the entries of a Parquet file made by ``export_parquet``; keep existing keys.

        Every row is checked first (a 64-hex key, a JSON object value); a bad file raises
        InputError and nothing is imported. The entries go in in one transaction. Returns
        (entries added, entries already present).
        """
        cache = self._require()
        _check_import_file(path)
        added = kept = 0
        with cache.transact():
            for keys, texts in _import_batches(path):
                for key, text in zip(keys, texts, strict=True):
                    if cache.add(key, text):
                        added += 1
                    else:
                        kept += 1
        return added, kept

    def _require(self) -> diskcache.Cache:
        if self._cache is None:
            raise ConfigError(self.problem or f"the cache at {self.directory} is not open")
        self.flush()
        return self._cache

    def _warn(self, kind: str, message: str) -> None:
        with self._warn_lock:
            if kind in self._warned:
                return
            self._warned.add(kind)
        warnings.warn(message, CacheWarning, stacklevel=3)


_REMEDY = (
    "To start afresh, run `polars-llm cache clear --cache-dir {folder}`, or set cache_dir= / "
    "$POLARS_LLM_CACHE_DIR to another folder"
)


def _is_damage(error: BaseException) -> bool:
    # "file is not a database", "database disk image is malformed"; not a lock or a permission.
    return isinstance(error, sqlite3.DatabaseError) and not isinstance(
        error, sqlite3.OperationalError
    )


def _describe_open_error(folder: Path, error: BaseException) -> str:
    text = str(error)
    if _is_damage(error):
        return f"the cache at {folder} is damaged ({text}). {_REMEDY.format(folder=folder)}"
    read_only = isinstance(error, OSError) and error.errno in (
        errno.EACCES,
        errno.EPERM,
        errno.EROFS,
    )
    if read_only or "readonly" in text or "unable to open" in text:
        return (
            f"the cache folder {folder} is read-only ({text}); make it writable, or set "
            "cache_dir= / $POLARS_LLM_CACHE_DIR to a writable folder"
        )
    return f"cannot open the cache at {folder} ({text}). {_REMEDY.format(folder=folder)}"


@contextlib.contextmanager
def _open_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on the folder's open-lock file; it also proves the folder writable.

    SQLite is never opened in a folder that refuses writes: with read-only WAL files left by
    another process it can crash the process (SIGBUS) instead of failing.
    """
    fd = os.open(folder / _LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        # An opener that hangs (stopped, stuck on NFS) must not hold every other one forever:
        # past the deadline, open without the lock and rely on SQLite's own busy handling.
        deadline = time.monotonic() + _OPEN_TIMEOUT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.005)
        yield
    finally:
        os.close(fd)


def _open_diskcache(folder: Path) -> diskcache.Cache:
    deadline = time.monotonic() + _OPEN_TIMEOUT
    delay = 0.01
    with _open_lock(folder):
        while True:
            try:
                # eviction_policy "none": a cache of paid-for answers is never thinned silently;
                # `polars-llm cache clear` empties it. It also spares a write on every read.
                # cull_limit 0: nothing expires or is evicted, so skip the culling query that
                # diskcache otherwise runs on every write.
                return diskcache.Cache(
                    str(folder),
                    timeout=_SQLITE_TIMEOUT,
                    disk=_StrictDisk,
                    eviction_policy="none",
                    size_limit=2**62,
                    cull_limit=0,
                )
            except sqlite3.OperationalError as e:
                # Another process's long write transaction outlasted diskcache's own retries.
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(delay)
                delay = min(2 * delay, 1.0)


def remove_cache_files(folder: Path) -> None:
    """Delete what diskcache keeps in ``folder`` (its database and value files), even damaged."""
    for name in _DB_FILES:
        with contextlib.suppress(FileNotFoundError):
            (folder / name).unlink()
    for entry in folder.iterdir():
        if entry.is_dir() and _VALUE_DIR.fullmatch(entry.name):
            shutil.rmtree(entry)


def _is_entry(item: Any) -> bool:
    """Whether a writer queue item is an answer to write (not a flush or a stop)."""
    return isinstance(item, tuple) and item[0] is not _FLUSH


def _dumps(value: dict[str, Any]) -> str:
    if "vector" not in value:  # orjson would write a NaN in a vector as null
        try:
            return orjson.dumps(value).decode()  # a fraction of json's time, the same text
        except TypeError:
            pass  # a lone surrogate: json writes it, and the write reports it (see _write)
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _key_chunks(cache: diskcache.Cache, size: int = 10_000) -> Iterator[list[str]]:
    """Every key of the cache, a chunk at a time, in insertion order."""
    last = -1
    while True:
        rows = cache._sql(
            "SELECT rowid, key FROM Cache WHERE raw = 1 AND rowid > ? ORDER BY rowid LIMIT ?",
            (last, size),
        ).fetchall()
        if not rows:
            return
        last = rows[-1][0]
        yield [key for _, key in rows if isinstance(key, str)]


def _import_batches(path: Path) -> Iterator[tuple[list[Any], list[Any]]]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    for rb in pf.iter_batches(columns=["key", "value"], batch_size=10_000):
        yield rb.column(0).to_pylist(), rb.column(1).to_pylist()


def _check_import_file(path: Path) -> None:
    """Raise InputError unless every row of ``path`` is a 64-hex key and a JSON object."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    hint = "give a file written by `polars-llm cache export`"
    try:
        pf = pq.ParquetFile(path)
    except FileNotFoundError as e:
        raise InputError(f"{path} does not exist; check the path") from e
    except (pa.ArrowException, ValueError, OSError) as e:
        raise InputError(f"{path} is not a Parquet file ({e}); {hint}") from e
    schema = pf.schema_arrow
    for name in ("key", "value"):
        kind = schema.field(name).type if name in schema.names else None
        if kind is None or not (
            pa.types.is_string(kind)
            or pa.types.is_large_string(kind)
            or pa.types.is_string_view(kind)
        ):
            raise InputError(f"{path} has no text column {name!r}; {hint}")
    row = 0
    try:
        for keys, texts in _import_batches(path):
            for key, text in zip(keys, texts, strict=True):
                row += 1
                if not isinstance(key, str) or not _KEY.fullmatch(key):
                    raise InputError(
                        f"{path}, row {row}: the key {key!r} is not 64 hex digits; {hint}. "
                        "Nothing was imported"
                    )
                try:
                    ok = isinstance(text, str) and isinstance(json.loads(text), dict)
                except ValueError:
                    ok = False
                if not ok:
                    raise InputError(
                        f"{path}, row {row}: the value is not a JSON object; {hint}. "
                        "Nothing was imported"
                    )
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"cannot read {path} ({e}); the file may be truncated") from e


def _set_many(cache: diskcache.Cache, entries: list[tuple[str, str, object]]) -> list[str]:
    """``cache.set`` of every entry, inside the caller's transaction; the value files that rows
    updated here no longer use.

    Texts stored inline (all but huge answers) go in one statement: ``Cache.set`` runs a select
    and an insert per entry, the writer's main cost in a busy run. The table's triggers keep
    diskcache's count and size right.
    """
    limit = cache.disk.min_file_size
    inline = [(k, t) for k, t, _ in entries if len(t) < limit]
    for key, text, _ in entries:
        if len(text) >= limit:
            cache.set(key, text)
    # One statement each for the whole group, its rows passed as one JSON array: SQLite does
    # the per-row work in C, and this thread hands the GIL back to the event loop once per
    # statement rather than once per row.
    keys = [k for k, _ in inline]
    replaced = [name for (name,) in cache._sql(_REPLACED, (orjson.dumps(keys).decode(),))]
    rows = orjson.dumps(inline).decode()
    cache._con.execute(_UPSERT, (time.time(), diskcache.core.MODE_RAW, rows))
    return replaced


_caches: dict[Path, ResultCache] = {}
_caches_lock = threading.Lock()
# Threads of the engine's that read caches (see register_reader), and how long a released cache
# waits for each to close its connection.
_readers: list[concurrent.futures.Executor] = []
_READER_CLOSE_WAIT = 0.1


def register_reader(executor: concurrent.futures.Executor) -> None:
    """An executor whose threads read caches: a released cache closes their connections there."""
    _readers.append(executor)


def _forget_caches_in_child() -> None:
    # A forked child has the parent's caches but not their writer threads or connections.
    global _caches, _caches_lock
    _caches = {}
    _caches_lock = threading.Lock()
    _readers.clear()


os.register_at_fork(after_in_child=_forget_caches_in_child)


def _take_gone_folders() -> list[tuple[Path, ResultCache]]:
    """Under ``_caches_lock``: take out the caches whose folder was deleted (a test's temporary
    folder, say), for ``_let_go`` once the lock is free."""
    gone = [path for path in _caches if not path.exists()]
    return [(path, _caches.pop(path)) for path in gone]


def _let_go(gone: list[tuple[Path, ResultCache]]) -> None:
    """Close the caches of deleted folders. Each open cache holds a writer thread and a
    connection per thread that used it (three files each): a long-lived process that used many
    temporary folders would otherwise run out of file descriptors."""
    for _, cache in gone:
        cache.release()
    if gone and _holds_databases_in([path for path, _ in gone]):
        # Connections that other threads opened (Polars' own, say) sit in a reference cycle
        # (sqlite3's statement cache): only a collection closes them. It costs tens of
        # milliseconds in a large process, before the first request of the call that opens
        # a cache: only when such a file is still open.
        gc.collect()


def _holds_databases_in(folders: list[Path]) -> bool:
    """Whether this process still has the cache database of one of ``folders`` open (its WAL
    files included; True where it cannot tell: without /proc)."""
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return True
    inside = tuple(f"{folder}{os.sep}{diskcache.core.DBNAME}" for folder in folders)
    for fd in fds:
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed meanwhile (the listing's own descriptor, say)
            continue
        if target.startswith(inside):
            return True
    return False


def open_cache(directory: Path | str) -> ResultCache:
    """The process-wide ResultCache for a folder, opened on first use."""
    path = Path(directory).expanduser().resolve()
    with _caches_lock:
        gone = _take_gone_folders()
        cache = _caches.get(path)
        if cache is None:
            cache = _caches[path] = ResultCache(path)
    # Outside the lock: closing waits a moment for the engine's cache-read thread, and other
    # threads' calls need not wait with it.
    _let_go(gone)
    return cache
