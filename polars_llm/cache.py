"""The on-disk result cache: sha256 request keys to JSON strings, over diskcache.

Only JSON strings go in and only strings come out: diskcache would pickle other values and unpickle
whatever it finds, so a tampered cache folder could run code (CVE-2025-69872). ``_StrictDisk``
refuses pickled entries outright.

Writes go through one writer thread per cache, which drains everything queued into one
transaction: the event loop never waits on an SQLite write, a busy run batches its writes, and a
quiet one writes each result as soon as it arrives (a crash keeps what was answered).
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any

import diskcache

from .errors import CacheWriteError, ConfigError


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


# Keys per bulk read: well under SQLite's limit of host parameters per statement.
_CHUNK = 500
_STOP = object()
_FLUSH = object()


class ResultCache:
    """Results by request key, as JSON objects; safe to share across threads."""

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory).expanduser()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            # eviction_policy "none": a cache of paid-for answers is never thinned silently;
            # `polars-llm cache clear` empties it. It also spares a write on every read.
            # cull_limit 0: nothing expires or is evicted, so skip the culling query that
            # diskcache otherwise runs on every write.
            self._cache = diskcache.Cache(
                str(self.directory),
                disk=_StrictDisk,
                eviction_policy="none",
                size_limit=2**62,
                cull_limit=0,
            )
        except OSError as e:
            raise ConfigError(
                f"cannot open the cache folder {self.directory}: {e}. "
                "Set cache_dir= or $POLARS_LLM_CACHE_DIR to a writable folder, or cache=False."
            ) from e
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._writer_lock = threading.Lock()
        self._write_error: BaseException | None = None

    def get_many(self, keys: list[str]) -> list[dict[str, Any] | None]:
        """The cached result of each key, or None.

        Reads in chunks of several hundred keys per SQL query on diskcache's own connection,
        about four times faster than one ``get`` per key: a fully cached column of a million
        rows is read in seconds. Only entries stored inline as text are taken this way; any
        other entry (stored in a file, say) goes through ``get`` and ``_StrictDisk``.
        """
        found: dict[str, str] = {}
        slow: list[str] = []
        sql = self._cache._sql  # diskcache's per-thread connection: the documented schema below
        now = time.time()
        for start in range(0, len(keys), _CHUNK):
            chunk = keys[start : start + _CHUNK]
            rows = sql(
                "SELECT key, mode, value FROM Cache WHERE raw = 1 AND key IN "
                f"({','.join('?' * len(chunk))}) AND (expire_time IS NULL OR expire_time > ?)",
                (*chunk, now),
            ).fetchall()
            for key, mode, value in rows:
                if mode == diskcache.core.MODE_RAW and isinstance(value, str):
                    found[key] = value
                else:
                    slow.append(key)
        for key in slow:
            value = self._cache.get(key)
            if isinstance(value, str):
                found[key] = value
        loads = json.loads
        return [loads(found[k]) if k in found else None for k in keys]

    def get(self, key: str) -> dict[str, Any] | None:
        """The cached result of one key, or None."""
        return self.get_many([key])[0]

    def put(self, key: str, value: dict[str, Any]) -> None:
        """Queue a result for writing; returns at once. ``flush`` waits until it is on disk."""
        self._ensure_writer()
        self._queue.put((key, json.dumps(value, separators=(",", ":"), ensure_ascii=False)))

    def flush(self) -> None:
        """Wait until every queued result is written; re-raise a write failure."""
        if self._writer is not None:
            done = threading.Event()
            self._queue.put((_FLUSH, done))
            done.wait()
        if self._write_error is not None:
            error, self._write_error = self._write_error, None
            raise CacheWriteError(
                f"could not write to the cache at {self.directory}: {error}. Free some space or "
                "set cache_dir= / $POLARS_LLM_CACHE_DIR to another folder"
            ) from error

    def __len__(self) -> int:
        return len(self._cache)

    def volume(self) -> int:
        """Bytes the cache takes on disk."""
        return int(self._cache.volume())

    def clear(self) -> int:
        """Remove every entry; returns how many there were."""
        self.flush()
        return int(self._cache.clear())

    def close(self) -> None:
        """Write what is queued, stop the writer and close the database."""
        if self._writer is not None:
            self.flush()
            self._queue.put(_STOP)
            self._writer.join()
            self._writer = None
        self._cache.close()

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
        while True:
            items = [self._queue.get()]
            # Drain what else is waiting, so a busy run writes many results per transaction.
            while True:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            pairs = [i for i in items if isinstance(i, tuple) and i[0] is not _FLUSH]
            if pairs:
                try:
                    with self._cache.transact():
                        for key, text in pairs:
                            self._cache.set(key, text)
                except Exception as e:  # reported by the next flush()
                    self._write_error = e
            for item in items:
                if isinstance(item, tuple) and item[0] is _FLUSH:
                    item[1].set()
            if any(i is _STOP for i in items):
                return


_caches: dict[Path, ResultCache] = {}
_caches_lock = threading.Lock()


def _forget_caches_in_child() -> None:
    # A forked child has the parent's caches but not their writer threads or connections.
    global _caches, _caches_lock
    _caches = {}
    _caches_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_caches_in_child)


def open_cache(directory: Path | str) -> ResultCache:
    """The process-wide ResultCache for a folder, opened on first use."""
    path = Path(directory).expanduser().resolve()
    with _caches_lock:
        cache = _caches.get(path)
        if cache is None:
            cache = _caches[path] = ResultCache(path)
        return cache
