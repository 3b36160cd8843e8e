"""The on-disk cache: pending answers, bad answers, damaged and read-only caches, many processes,
and `polars-llm cache stats/clear/export/import` run as real processes."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import diskcache
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from polars_llm import cache as cache_module
from polars_llm.cache import CacheWarning, ResultCache
from polars_llm.testing import FakeServer


def key(i: int) -> str:
    return f"{i:064x}"


def cli(args: Sequence[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The CLI as a real process."""
    return subprocess.run(
        [sys.executable, "-m", "polars_llm.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=os.environ.copy(),
    )


@contextlib.contextmanager
def writes_blocked(folder: Path) -> Iterator[None]:
    """Hold SQLite's write lock on the cache from another connection, as another process would."""
    con = sqlite3.connect(folder / "cache.db", isolation_level=None)
    con.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        con.execute("COMMIT")
        con.close()


def on_disk(folder: Path) -> dict[str, str]:
    """What another process reading the database sees."""
    con = sqlite3.connect(folder / "cache.db")
    try:
        return dict(con.execute("SELECT key, value FROM Cache").fetchall())
    finally:
        con.close()


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """Make a folder and its files read-only: chmod, or for root (who ignores it) chattr +i."""
    paths = [folder, *folder.rglob("*")]
    for path in paths:
        path.chmod(0o500 if path.is_dir() else 0o400)
    immutable = _accepts_files(folder)
    if immutable:
        subprocess.run(["chattr", "+i", *map(str, paths)], check=True, capture_output=True)
    try:
        assert not _accepts_files(folder), "this test needs a folder that refuses new files"
        yield
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", *map(str, paths)], check=True)
        for path in paths:
            path.chmod(0o700 if path.is_dir() else 0o600)


def _accepts_files(folder: Path) -> bool:
    probe = folder / "probe"
    try:
        probe.touch()
    except OSError:
        return False
    probe.unlink()
    return True


# --------------------------------------------------------------------------------------------
# Pending answers and bad answers
# --------------------------------------------------------------------------------------------
def test_an_answer_is_found_before_it_reaches_the_disk(tmp_path: Path) -> None:
    """get_many sees an answer put while another process holds the write lock, before it is on disk."""
    cache = ResultCache(tmp_path)
    cache.put(key(0), {"text": "first"})
    cache.flush()
    with writes_blocked(tmp_path):
        cache.put(key(1), {"text": "pending"})
        assert cache.get_many([key(0), key(1), key(2)]) == [
            {"text": "first"},
            {"text": "pending"},
            None,
        ]
        assert key(1) not in on_disk(tmp_path)
    cache.flush()
    assert json.loads(on_disk(tmp_path)[key(1)]) == {"text": "pending"}
    assert ResultCache(tmp_path).get(key(1)) == {"text": "pending"}
    cache.close()


def test_peek_finds_answers_put_lately_without_the_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """peek finds pending and lately written answers in memory, the oldest leaving past the cap."""
    monkeypatch.setattr(cache_module, "_RECENT_BYTES", 100)
    cache = ResultCache(tmp_path)
    with writes_blocked(tmp_path):
        cache.put(key(1), {"text": "a" * 40})
        assert cache.peek(key(1)) == {"text": "a" * 40}  # not on disk yet
    cache.flush()
    for i in (2, 3):
        cache.put(key(i), {"text": str(i) * 40})
        cache.flush()
    assert cache.peek(key(1)) is None  # past the cap: only on disk now
    assert cache.get(key(1)) == {"text": "a" * 40}
    assert cache.peek(key(3)) == {"text": "3" * 40}
    assert cache.peek(key(4)) is None
    cache.close()


def test_a_lone_surrogate_is_skipped_and_the_other_answers_are_written(tmp_path: Path) -> None:
    """An answer that cannot be stored warns once; the answers in its transaction are written."""
    cache = ResultCache(tmp_path)
    cache.put(key(9), {"text": "warm"})
    cache.flush()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with writes_blocked(tmp_path):  # the three go in one transaction
            cache.put(key(1), {"text": "before"}, owner="a")
            cache.put(key(2), {"text": "bad \ud800 answer"}, owner="a")
            cache.put(key(3), {"text": "after"}, owner="b")
        cache.flush("a")
        cache.flush("b")
    (message,) = [str(w.message) for w in caught if w.category is CacheWarning]
    assert message.startswith(f"an answer could not be stored in the cache at {tmp_path} (")
    assert "surrogates not allowed" in message and message.endswith("a rerun asks for it again")
    fresh = ResultCache(tmp_path)
    assert fresh.get_many([key(1), key(2), key(3)]) == [{"text": "before"}, None, {"text": "after"}]
    cache.close()


def test_answers_written_together_are_all_stored_and_counted(tmp_path: Path) -> None:
    """Many answers written in one transaction are all on disk, counted once each, and an
    overwritten answer that lived in a value file leaves no file behind."""
    cache = ResultCache(tmp_path)
    cache.put(key(0), {"text": "x" * 100_000})  # too big to store inline: a value file
    cache.flush()
    assert len(list(tmp_path.glob("*/*/*.val"))) == 1
    with writes_blocked(tmp_path):  # all of these go in one transaction
        for i in range(1, 1001):
            cache.put(key(i), {"text": f"answer {i}"})
        cache.put(key(0), {"text": "short now"})
        cache.put(key(5), {"text": "answer 5, again"})
    cache.flush()
    fresh = ResultCache(tmp_path)
    assert len(fresh) == 1001
    assert fresh.get_many([key(0), key(5), key(1000)]) == [
        {"text": "short now"},
        {"text": "answer 5, again"},
        {"text": "answer 1000"},
    ]
    assert list(tmp_path.glob("*/*/*.val")) == []
    cache.close()


FILE_LIMIT = """
import resource, signal, sys
from polars_llm.cache import ResultCache
from polars_llm.errors import CacheWriteError
cache = ResultCache(sys.argv[1])
cache.put("0" * 64, {"text": "warm"}); cache.flush()
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
cache.put("a" * 64, {"text": "x" * 400_000}, owner="big")  # a value file over the limit
cache.put("b" * 64, {"text": "small"}, owner="small")
cache.flush("small")
print("small: ok", flush=True)
try:
    cache.flush("big")
except CacheWriteError as e:
    print("big:", type(e.__cause__).__name__, flush=True)
"""


def test_a_write_error_fails_only_the_batch_that_owns_it(tmp_path: Path) -> None:
    """A failed write is raised by its owner's flush; another owner's answers are written."""
    proc = subprocess.run(
        [sys.executable, "-c", FILE_LIMIT, str(tmp_path)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["small: ok", "big: OSError"]
    cache = ResultCache(tmp_path)
    assert cache.get_many(["a" * 64, "b" * 64]) == [None, {"text": "small"}]
    cache.flush("big")  # errors belong to the process that had them
    cache.close()


# --------------------------------------------------------------------------------------------
# Damaged and read-only caches
# --------------------------------------------------------------------------------------------
def _filled(folder: Path) -> None:
    cache = ResultCache(folder)
    cache.put(key(0), {"text": "é" * 40_000})  # past diskcache's 32 KiB: kept in a value file
    for i in (1, 2):
        cache.put(key(i), {"text": f"answer {i}"})
    cache.close()


def _keys(folder: Path) -> list[str]:
    return list(on_disk(folder))


def _garbled_db(folder: Path) -> None:
    (folder / "cache.db").write_bytes(b"this is not a database " * 500)


def _raw_values(value: str) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        keys = _keys(folder)
        with diskcache.Cache(str(folder)) as raw:
            for k in keys:
                raw.set(k, value)

    return damage


def _truncated_value_files(folder: Path) -> None:
    files = list(folder.glob("*/*/*.val"))
    assert files
    for value_file in files:
        data = value_file.read_bytes()
        value_file.write_bytes(data[: len(data) // 2 + 1])  # cut inside a two-byte character


DAMAGE: dict[str, Callable[[Path], None]] = {
    "garbled cache.db": _garbled_db,
    "non-JSON value": _raw_values("{not json"),
    "JSON list value": _raw_values("[1, 2]"),
    "JSON string value": _raw_values('"just a string"'),
    "null text": _raw_values('{"text": null, "usage": [1, 1]}'),
    "truncated value file": _truncated_value_files,
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_cache_is_a_miss_with_one_warning(tmp_path: Path, case: str) -> None:
    """Damaged entries or a damaged database read as misses, with one CacheWarning per cache."""
    _filled(tmp_path)
    DAMAGE[case](tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cache = ResultCache(tmp_path)
        first = cache.get_many([key(0), key(1)])
        second = cache.get_many([key(0)])
        cache.put(key(5), {"text": "new"})
        cache.flush()
    assert first[0] is None and second == [None]
    messages = [str(w.message) for w in caught if w.category is CacheWarning]
    assert len(messages) == 1, messages
    if case == "garbled cache.db":
        assert cache.problem is not None and cache.damaged
        assert "is damaged" in messages[0] and "polars-llm cache clear" in messages[0]
        assert cache.get(key(5)) is None  # running without the cache
    else:
        assert cache.problem is None
        assert "unreadable entries" in messages[0]
        assert cache.get(key(5)) == {"text": "new"}
    cache.close()


def test_a_read_only_cache_folder_is_a_miss_with_one_warning(tmp_path: Path) -> None:
    """A cache in a folder that refuses new files runs without the cache, saying so once."""
    folder = tmp_path / "cache"
    _filled(folder)
    with read_only(folder), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cache = ResultCache(folder)
        assert cache.get_many([key(0)]) == [None]
        cache.put(key(1), {"text": "x"})
        cache.flush()
    messages = [str(w.message) for w in caught if w.category is CacheWarning]
    assert len(messages) == 1 and "read-only" in messages[0], messages
    assert cache.problem is not None and not cache.damaged


def _write_input(folder: Path) -> Path:
    path = folder / "in.parquet"
    pl.DataFrame({"q": ["a", "b", "c"]}).write_parquet(path)
    return path


def _long_answer(body: dict) -> str:
    """Answers long enough for diskcache to keep them in value files."""
    return "é" * 40_000 + body["messages"][-1]["content"]


@pytest.mark.parametrize("case", list(DAMAGE))
def test_cli_copes_with_a_damaged_cache(tmp_path: Path, case: str) -> None:
    """enrich asks again with one warning line; cache stats/clear give one line each."""
    folder = tmp_path / "cache"
    src, out = _write_input(tmp_path), tmp_path / "out.parquet"
    with FakeServer(reply=_long_answer) as server:
        args = ["enrich", str(src), str(out), "--step", "a=Say {q}", "--cache-dir", str(folder),
                "--base-url", server.base_url, "--api-key", "k", "--no-progress"]  # fmt: skip
        assert cli(args).returncode == 0
        DAMAGE[case](folder)
        run = cli(args)
        assert server.stats().calls == 6  # every damaged answer was asked again
    assert run.returncode == 0, run.stderr
    assert pl.read_parquet(out)["a"].to_list() == [
        _long_answer({"messages": [{"content": f"Say {q}"}]}) for q in "abc"
    ]
    warned = [line for line in run.stderr.splitlines() if line.startswith("polars-llm: warning:")]
    assert len(warned) == 1, run.stderr
    assert "Traceback" not in run.stderr

    stats = cli(["cache", "stats", "--cache-dir", str(folder)])
    clear = cli(["cache", "clear", "--yes", "--cache-dir", str(folder)])
    if case == "garbled cache.db":
        assert stats.returncode == 2
        assert stats.stderr.splitlines() == [stats.stderr.strip()]
        assert stats.stderr.startswith(f"polars-llm: error: the cache at {folder} is damaged")
        assert clear.returncode == 0, clear.stderr
        assert clear.stdout.strip() == f"removed the damaged cache in {folder}"
        after = cli(["cache", "stats", "--cache-dir", str(folder)])
        assert after.returncode == 0 and "entries: 0\n" in after.stdout
    else:
        assert stats.returncode == 0, stats.stderr
        assert stats.stderr == "" and "entries: " in stats.stdout
        assert clear.returncode == 0, clear.stderr
        assert clear.stdout.startswith("removed ") and clear.stderr == ""


def test_cli_on_a_read_only_cache_folder(server: FakeServer, tmp_path: Path) -> None:
    """enrich runs without the cache after one warning; stats and clear exit 2 with one line."""
    folder = tmp_path / "cache"
    _filled(folder)
    src, out = _write_input(tmp_path), tmp_path / "out.parquet"
    with read_only(folder):
        run = cli(
            ["enrich", str(src), str(out), "--step", "a=Say {q}", "--cache-dir", str(folder),
             "--base-url", server.base_url, "--api-key", "k", "--no-progress"]
        )  # fmt: skip
        stats = cli(["cache", "stats", "--cache-dir", str(folder)])
        clear = cli(["cache", "clear", "--yes", "--cache-dir", str(folder)])
    assert run.returncode == 0, run.stderr
    warned = [line for line in run.stderr.splitlines() if line.startswith("polars-llm: warning:")]
    assert len(warned) == 1 and "read-only" in warned[0], run.stderr
    for result in (stats, clear):
        assert result.returncode == 2
        assert len(result.stderr.splitlines()) == 1
        assert result.stderr.startswith(
            f"polars-llm: error: the cache folder {folder} is read-only"
        )


# --------------------------------------------------------------------------------------------
# Many processes
# --------------------------------------------------------------------------------------------
OPENER = """
import os, sys, time
from polars_llm.cache import ResultCache
folder, i, go = sys.argv[1], int(sys.argv[2]), sys.argv[3]
print("ready", flush=True)
while not os.path.exists(go):  # all open at the same moment
    time.sleep(0.001)
cache = ResultCache(folder)
assert cache.problem is None, cache.problem
cache.put(f"{i:064x}", {"text": f"process {i}"})
cache.close()
"""


def test_sixteen_processes_open_one_cache_folder_at_once(tmp_path: Path) -> None:
    """Sixteen processes opening one new cache folder at the same moment all open and write."""
    folder, go = tmp_path / "cache", tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", OPENER, str(folder), str(i), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(16)
    ]
    for p in procs:  # every interpreter has started and imported polars-llm
        assert p.stdout is not None and p.stdout.readline() == "ready\n", p.communicate()
    go.touch()
    errors = [p.communicate(timeout=240)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 16, errors
    cache = ResultCache(folder)
    assert len(cache) == 16
    assert cache.get_many([key(i) for i in range(16)]) == [
        {"text": f"process {i}"} for i in range(16)
    ]


# --------------------------------------------------------------------------------------------
# export and import
# --------------------------------------------------------------------------------------------
def test_export_then_import_merges_two_caches(tmp_path: Path) -> None:
    """export writes key/value rows; import adds the new keys and keeps the ones already there."""
    a, b, file = tmp_path / "a", tmp_path / "b", tmp_path / "answers.parquet"
    cache_a = ResultCache(a)
    for i in range(5):
        cache_a.put(key(i), {"text": f"from a {i}", "usage": [1, 2]})
    cache_a.put(key(9), {"text": "é" * 40_000})  # kept in a value file
    cache_a.close()
    cache_b = ResultCache(b)
    cache_b.put(key(0), {"text": "b's own answer"})
    cache_b.put(key(7), {"text": "only in b"})
    cache_b.close()

    exported = cli(["cache", "export", str(file), "--cache-dir", str(a)])
    assert exported.returncode == 0, exported.stderr
    assert exported.stdout.strip() == f"exported 6 entries from {a} to {file}"
    table = pq.read_table(file)
    assert table.schema == pa.schema([("key", pa.string()), ("value", pa.string())])
    assert sorted(table.column("key").to_pylist()) == sorted([key(i) for i in (0, 1, 2, 3, 4, 9)])
    assert list(tmp_path.glob(".*tmp*")) == []

    imported = cli(["cache", "import", str(file), "--cache-dir", str(b)])
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.strip() == f"imported 5 new entries into {b}; kept 1 already there"
    merged = ResultCache(b)
    assert len(merged) == 7
    assert merged.get(key(0)) == {"text": "b's own answer"}
    assert merged.get(key(3)) == {"text": "from a 3", "usage": [1, 2]}
    assert merged.get(key(9)) == {"text": "é" * 40_000}
    assert merged.get(key(7)) == {"text": "only in b"}


def _bad_files(folder: Path) -> dict[str, tuple[Path, str]]:
    good = {"key": [key(1), key(2)], "value": ['{"text":"x"}', '{"text":"y"}']}

    def parquet(name: str, **columns: list[str]) -> Path:
        path = folder / f"{name}.parquet"
        pl.DataFrame({**good, **columns}).write_parquet(path)
        return path

    not_parquet = folder / "notes.parquet"
    not_parquet.write_text("key,value\n")
    no_value = folder / "no-value.parquet"
    pl.DataFrame({"key": good["key"]}).write_parquet(no_value)
    return {
        "bad key": (parquet("bad-key", key=[key(1), "not-a-key"]), "row 2: the key 'not-a-key'"),
        "short key": (parquet("short-key", key=["abc123", key(2)]), "row 1: the key 'abc123'"),
        "list value": (parquet("list", value=['{"text":"x"}', "[1]"]), "row 2: the value is not"),
        "not JSON": (parquet("nojson", value=["{oops", "{}"]), "row 1: the value is not a JSON"),
        "not parquet": (not_parquet, "is not a Parquet file"),
        "no value column": (no_value, "has no text column 'value'"),
        "missing": (folder / "nope.parquet", "does not exist"),
    }


def test_import_refuses_a_bad_file_whole(tmp_path: Path) -> None:
    """A bad row, a non-Parquet file or a missing column: exit 3, one line, nothing imported."""
    folder = tmp_path / "cache"
    cache = ResultCache(folder)
    cache.put(key(7), {"text": "kept"})
    cache.close()
    for case, (path, hint) in _bad_files(tmp_path).items():
        result = cli(["cache", "import", str(path), "--cache-dir", str(folder)])
        assert result.returncode == 3, (case, result.stderr)
        assert len(result.stderr.splitlines()) == 1, (case, result.stderr)
        assert result.stderr.startswith("polars-llm: error: ") and hint in result.stderr, case
        assert set(on_disk(folder)) == {key(7)}, case


def test_export_to_a_missing_folder_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    """Exporting into a folder that does not exist exits 3 with one line."""
    _filled(tmp_path / "cache")
    target = tmp_path / "no" / "answers.parquet"
    result = cli(["cache", "export", str(target), "--cache-dir", str(tmp_path / "cache")])
    assert result.returncode == 3
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith(f"polars-llm: error: cannot write {target}")
    assert not (tmp_path / "no").exists()


def test_cache_help_documents_export_import_and_exit_codes() -> None:
    """`polars-llm cache --help` lists the commands with examples and the exit codes."""
    result = cli(["cache", "--help"])
    assert result.returncode == 0
    for text in ("export", "import", "Exit codes:", "read-only", "64 hex digits"):
        assert text in result.stdout, text
    assert textwrap.dedent(result.stdout).count("polars-llm cache ") >= 4


def test_a_deleted_folders_cache_closes_without_a_full_collection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The threads that read a cache (the caller's, the writer, the engine's cache-read thread)
    close their connections when its folder is found gone, so the next call starts without a
    full garbage collection (tens of milliseconds in a large process) and no file stays open."""

    def cache_files(folder: Path) -> list[str]:
        found = []
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/self/fd/{fd}")
                if target.startswith(f"{folder}/cache.db"):
                    found.append(target)
        return found

    folder = tmp_path / "gone"
    with FakeServer() as server:
        for rows in (["a", "b"], ["a", "c"]):  # the second call reads "a" on the loop's side too
            out = pl.DataFrame({"q": rows}).with_columns(
                a=pl.col("q").llm.complete(
                    base_url=server.base_url, api_key="k", cache_dir=folder, progress=False
                )
            )
            assert out["a"].null_count() == 0
    assert cache_files(folder)  # the folder's database is open while it is in use
    shutil.rmtree(folder)
    collections: list[int] = []
    monkeypatch.setattr(
        cache_module, "gc", type("Recorder", (), {"collect": lambda: collections.append(1)})
    )
    cache_module.open_cache(tmp_path / "another")
    assert cache_files(folder) == []
    assert collections == []


def test_deleted_cache_folders_leave_no_threads_or_open_files(tmp_path: Path) -> None:
    """The README's test pattern, a temporary cache folder per test, run many times in one
    process: each folder's writer thread, shared-state thread and SQLite connections are let
    go once the folder is gone, so the process does not run out of file descriptors."""
    import tempfile
    import threading

    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    def one_test(server: FakeServer) -> None:
        with tempfile.TemporaryDirectory(dir=tmp_path) as folder:
            out = pl.DataFrame({"q": ["a", "b"]}).with_columns(
                a=pl.col("q").llm.complete(
                    base_url=server.base_url, api_key="k", cache_dir=folder, progress=False
                )
            )
            assert out["a"].null_count() == 0

    with FakeServer() as server:
        for _ in range(3):  # what the first runs start once (the engine, its pools)
            one_test(server)
        threads, files = threading.active_count(), fds()
        for _ in range(30):
            one_test(server)
        # The last folder's resources are let go only when a later call finds it gone.
        cache_module.open_cache(tmp_path / "another")
        for _ in range(50):  # the last folders' threads end after closing their connections
            if threading.active_count() <= threads:
                break
            time.sleep(0.1)
        assert threading.active_count() <= threads + 1
        assert fds() <= files + 6  # before: 10 more per folder, 300 here
