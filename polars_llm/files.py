"""The files of ``polars-llm enrich``: what INPUT names, how each file is read and written.

INPUT is a file, a glob or a folder, on the local disk or in object storage (``s3://``,
``gs://``, ``az://``, through fsspec: the ``s3``, ``gcs`` and ``azure`` extras). A file gives
one OUTPUT file; a glob or a folder gives one output file per input file inside the OUTPUT
folder, at the same relative path, so hive partitions (``date=2024-01-01/part-0.parquet``) are
kept. The format follows the extension: ``.csv``, ``.ndjson``/``.jsonl``, else Parquet.

Each output file is written atomically: locally to a locked temporary file beside it, renamed
into place once complete; in object storage to a local temporary file uploaded once complete
(an object store shows an object only when its upload has finished).
"""

from __future__ import annotations

import contextlib
import fcntl
import glob as globlib
import os
import re
import secrets
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import InputError

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".ndjson": "ndjson"}
FORMATS[".jsonl"] = "ndjson"
# The extra that brings each object store's fsspec filesystem.
_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure"}
_MAGIC = re.compile(r"[*?\[]")


def one_line(message: object) -> str:
    """``message`` with its runs of whitespace, newlines included, made single spaces."""
    return " ".join(str(message).split())


def file_format(name: str) -> str:
    """The format an extension names; Parquet when it names none."""
    return FORMATS.get(os.path.splitext(name)[1].lower(), "parquet")


# --------------------------------------------------------------------------------------------
# Where a path lives
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Location:
    """A path on the local disk (``fs`` is None) or in an object store (an fsspec filesystem)."""

    url: str
    path: str
    fs: Any = None

    @property
    def remote(self) -> bool:
        return self.fs is not None

    def child(self, relative: str) -> Location:
        """The location ``relative`` (with ``/``) below this folder."""
        if self.fs is None:
            return Location(str(Path(self.path, relative)), str(Path(self.path, relative)))
        base = self.path.rstrip("/")
        return Location(f"{self.url.rstrip('/')}/{relative}", f"{base}/{relative}", self.fs)

    def open(self) -> BinaryIO:
        if self.fs is None:
            return open(self.path, "rb")
        return self.fs.open(self.path, "rb")

    def exists(self) -> bool:
        return self.fs.exists(self.path) if self.fs is not None else Path(self.path).exists()

    def is_dir(self) -> bool:
        return self.fs.isdir(self.path) if self.fs is not None else Path(self.path).is_dir()

    def __str__(self) -> str:
        return self.url


def location(text: str | os.PathLike[str]) -> Location:
    """Where ``text`` points: a URL with a scheme goes through fsspec, anything else is local."""
    text = os.fspath(text)
    scheme, sep, _ = text.partition("://")
    if not sep or len(scheme) < 2:  # a Windows drive letter is not a scheme
        return Location(text, text)
    try:
        import fsspec  # type: ignore[import-untyped]  # no type hints shipped
    except ImportError as e:
        raise InputError(f"{text}: {_install_hint(scheme)}") from e
    try:
        fs, path = fsspec.core.url_to_fs(text)
    except ImportError as e:  # fsspec knows the scheme; its package is missing
        raise InputError(f"{text}: {_install_hint(scheme)}") from e
    except ValueError as e:
        raise InputError(f"{text}: {one_line(e)}; {_install_hint(scheme)}") from e
    return Location(text, path, fs)


def _install_hint(scheme: str) -> str:
    extra = _EXTRAS.get(scheme)
    if extra is None:
        return f"{scheme}:// is not a storage polars-llm knows; use a local path, s3://, gs:// or az://"
    return (
        f"{scheme}:// needs the {extra} extra: pip install -e '.[{extra}]' in the polars-llm clone"
    )


# --------------------------------------------------------------------------------------------
# What INPUT names
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InputFile:
    """One file to enrich, and its path relative to INPUT's folder (for the OUTPUT folder)."""

    where: Location
    relative: str

    @property
    def format(self) -> str:
        return file_format(self.where.path)


def expand_input(text: str | os.PathLike[str]) -> tuple[list[InputFile], bool]:
    """The files INPUT names, and whether it names a set (a glob or a folder) or one file."""
    where = location(text)
    if _MAGIC.search(where.path):
        return _globbed(where), True
    if not where.exists():
        raise InputError(f"input file {where} does not exist; check the path")
    if where.is_dir():
        return _folder(where), True
    return [InputFile(where, os.path.basename(where.path.rstrip("/")))], False


def _globbed(where: Location) -> list[InputFile]:
    # The folder before the first wildcard is the base that relative paths start from.
    parts = where.path.split("/")
    fixed = next(i for i, part in enumerate(parts) if _MAGIC.search(part))
    base = "/".join(parts[:fixed])
    if where.fs is None:
        found = sorted(p for p in globlib.glob(where.path, recursive=True) if os.path.isfile(p))
    else:
        found = sorted(p for p in where.fs.glob(where.path) if not where.fs.isdir(p))
    files = [_input_file(where, p, base) for p in found]
    if not files:
        raise InputError(f"no file matches {where}; check the pattern")
    return files


def _folder(where: Location) -> list[InputFile]:
    base = where.path.rstrip("/")
    if where.fs is None:
        found = sorted(
            os.path.join(root, name)
            for root, dirs, names in os.walk(base)
            for name in names
            if not _hidden(os.path.relpath(os.path.join(root, name), base))
        )
    else:
        found = sorted(p for p in where.fs.find(base) if not _hidden(os.path.relpath(p, base)))
    files = [_input_file(where, p, base) for p in found if _ext_format(p) is not None]
    if not files:
        raise InputError(
            f"the folder {where} has no .parquet, .csv or .ndjson/.jsonl files; check the path"
        )
    return files


def _ext_format(path: str) -> str | None:
    return FORMATS.get(os.path.splitext(path)[1].lower())


def _hidden(relative: str) -> bool:
    """Files that data tools keep beside the data: ``_SUCCESS``, ``.crc``, temporary files."""
    return any(part.startswith((".", "_")) for part in relative.split(os.sep))


def _input_file(where: Location, path: str, base: str) -> InputFile:
    relative = os.path.relpath(path, base) if base else path
    if where.fs is None:
        return InputFile(Location(path, path), relative)
    return InputFile(Location(where.fs.unstrip_protocol(path), path, where.fs), relative)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------
class Reader:
    """One input file: its columns and rows (read on creation), then its content in batches."""

    def __init__(self, file: InputFile) -> None:
        self.file = file
        self.format = file.format
        with self._reading():
            if self.format == "parquet":
                with self._source() as source:
                    pf = pq.ParquetFile(source)
                    self.schema: pa.Schema = pf.schema_arrow
                    self.rows = pf.metadata.num_rows
            else:
                with self._source() as source:
                    self.schema = self._lazy(source).head(0).collect().to_arrow().schema
                with self._source() as source:
                    self.rows = int(self._lazy(source).select(pl.len()).collect().item())

    @contextlib.contextmanager
    def _reading(self) -> Iterator[None]:
        where = self.file.where
        try:
            yield
        except FileNotFoundError as e:
            raise InputError(f"input file {where} does not exist; check the path") from e
        except IsADirectoryError as e:
            raise InputError(f"input {where} is a folder; give a file") from e
        except (pa.ArrowException, pl.exceptions.PolarsError, ValueError) as e:
            raise InputError(self._not_readable(e)) from e
        except OSError as e:
            raise InputError(f"cannot read {where}: {e.strerror or one_line(e)}") from e

    @contextlib.contextmanager
    def _source(self) -> Iterator[Any]:
        """The file's path when local (Arrow and Polars read it best), else an open handle."""
        where = self.file.where
        if not where.remote:
            yield where.path
            return
        with where.open() as fh:
            yield fh

    @property
    def columns(self) -> list[str]:
        return list(self.schema.names)

    def empty(self) -> pa.Table:
        """No rows, with the file's columns and types."""
        with self._reading(), self._source() as source:
            if self.format == "parquet":
                return pq.ParquetFile(source).schema_arrow.empty_table()
            return self._lazy(source).head(0).collect().to_arrow()

    def _lazy(self, source: Any) -> pl.LazyFrame:
        if self.format == "csv":
            return pl.scan_csv(source)
        return pl.scan_ndjson(source)

    def _not_readable(self, e: BaseException) -> str:
        kind = {"parquet": "a Parquet", "csv": "a CSV", "ndjson": "an NDJSON"}[self.format]
        hint = (
            "convert it first, e.g. pl.read_csv(...).write_parquet(...), or name it .csv/.ndjson"
            if self.format == "parquet"
            else "check the file, or convert it to Parquet"
        )
        return f"{self.file.where} is not {kind} file ({one_line(e)}); {hint}"

    def batches(self, batch_size: int, columns: list[str] | None = None) -> Iterator[pa.Table]:
        """The file's rows, ``batch_size`` at a time; a read failure is bad input, not a crash."""
        with self._source() as source:
            if self.format == "parquet":
                chunks: Iterator[Any] = pq.ParquetFile(source).iter_batches(
                    batch_size=batch_size, columns=columns
                )
            else:
                scan = self._lazy(source)
                if columns is not None:
                    scan = scan.select(columns)
                chunks = iter(scan.collect_batches(chunk_size=batch_size))
            while True:
                try:
                    chunk = next(chunks)
                except StopIteration:
                    return
                except (pa.ArrowException, pl.exceptions.PolarsError, OSError) as e:
                    raise InputError(
                        f"cannot read {self.file.where}: {one_line(e)}; the file may be "
                        "truncated or corrupt"
                    ) from e
                if isinstance(chunk, pl.DataFrame):
                    yield chunk.to_arrow()
                else:
                    yield pa.Table.from_batches([chunk])


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------
def temp_prefix(path: str) -> str:
    return f".{os.path.basename(path)}.tmp-"


def remove_stale_temp_files(where: Location) -> None:
    """Delete temporary files left beside a local output by runs that were killed (kill -9).

    A live run holds an exclusive lock on its temporary file; the kernel drops it when the
    process dies, whatever host or container it ran in. A file we can lock is abandoned.
    """
    if where.remote:
        return
    folder = Path(where.path).parent
    prefix = temp_prefix(where.path)
    with contextlib.suppress(OSError):
        for entry in folder.iterdir():
            if not entry.name.startswith(prefix):
                continue
            try:
                with open(entry, "rb") as fh:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    entry.unlink()
            except OSError:
                continue  # locked by a run in progress, or already gone


class AtomicOutput:
    """An output file written batch by batch to a temporary file, then put in place whole.

    The schema is the first batch's; later batches are cast to it. On any exception (Ctrl-C
    included) the temporary file is deleted and the target is left as it was.
    """

    def __init__(self, where: Location, fmt: str | None = None) -> None:
        self.where = where
        self.format = fmt or file_format(where.path)
        self.tmp = ""
        self.fh: Any = None
        self.writer: pq.ParquetWriter | None = None
        self.schema: pa.Schema | None = None

    def __enter__(self) -> AtomicOutput:
        if self.where.remote:
            fd, self.tmp = tempfile.mkstemp(prefix="polars-llm-", suffix=".part")
        else:
            # A unique name (two containers may share a pid) and an exclusive lock held while the
            # file is written, which tells other runs it is not abandoned.
            # Created with mode 0o666 like any new file, so the umask decides who may read it
            # (mkstemp's 0o600 would take the readers of a 0o644 output away).
            prefix = os.path.join(os.path.dirname(self.where.path), temp_prefix(self.where.path))
            while True:
                self.tmp = prefix + secrets.token_hex(8)
                try:
                    fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
                    break
                except FileExistsError:
                    continue
        self.fh = os.fdopen(fd, "wb")  # closed in commit or __exit__
        fcntl.flock(self.fh, fcntl.LOCK_EX)
        return self

    def write(self, table: pa.Table) -> None:
        if self.schema is None:
            self.schema = table.schema
        elif not table.schema.equals(self.schema):
            table = table.cast(self.schema)
        if self.format == "parquet":
            if self.writer is None:
                self.writer = pq.ParquetWriter(self.fh, self.schema)
            self.writer.write_table(table)
            return
        df = pl.from_arrow(table)
        assert isinstance(df, pl.DataFrame)
        if self.format == "csv":
            # CSV holds no nested values: a struct (an extract step) is written as JSON.
            nested = [n for n, t in df.schema.items() if isinstance(t, pl.Struct)]
            df = df.with_columns(pl.col(n).struct.json_encode() for n in nested)
            df.write_csv(self.fh, include_header=self.fh.tell() == 0)
        else:
            df.write_ndjson(self.fh)

    def commit(self) -> None:
        """Put the complete file at the target."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        self.fh.flush()
        os.fsync(self.fh.fileno())
        if self.where.remote:
            self.fh.close()
            self.where.fs.put_file(self.tmp, self.where.path)
            with contextlib.suppress(OSError):
                os.unlink(self.tmp)
            return
        self.fh.close()
        os.replace(self.tmp, self.where.path)
        _fsync_folder(os.path.dirname(self.where.path) or ".")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if self.writer is not None:
            with contextlib.suppress(Exception):
                self.writer.close()
        if self.fh is not None:
            with contextlib.suppress(Exception):
                self.fh.close()
        if exc_type is not None or self.where.remote:
            with contextlib.suppress(OSError):
                os.unlink(self.tmp)


def _fsync_folder(folder: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
