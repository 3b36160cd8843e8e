"""Run ``polars-llm enrich``: add one LLM-written column per step to a Parquet file of any size.

:class:`EnrichRun` reads the input in batches, checks the steps against its columns, runs
:func:`polars_llm.pipeline` on each batch and writes each enriched batch as it goes, so memory
stays bounded whatever the file's size. The output goes to a locked temporary file next to it that
replaces it atomically once every row is done: a killed run never leaves a partial file, and the
next run removes the temporary files of killed runs. A dry run reads the input and prints, per
step, the calls a run would make and their estimated cost instead. A run shows its progress on
stderr; either kind can write a JSON report of itself.

With ``Settings(batch=True)`` the calls go out as OpenAI Batch API jobs (:mod:`polars_llm.batch`)
before anything is written: each round reads the whole input, sends every row's next step that is
not cached yet, and waits (or, with ``wait=False``, raises
:class:`~polars_llm.batch.BatchPending`); the output is then written from the cache.

What goes wrong is raised as polars-llm's own errors (:class:`~polars_llm.errors.InputError` for
a bad input, :class:`~polars_llm.errors.TooManyFailures`, ...); :mod:`polars_llm.cli` turns them
into one-line messages and exit codes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import polars as pl
import pyarrow as pa

from .errors import ColumnMismatch, ConfigError, EmptyInput, InputError, TooManyFailures
from .files import (
    AtomicOutput,
    Location,
    Reader,
    expand_input,
    file_format,
    location,
    one_line,
    remove_stale_temp_files,
)
from .pipeline import (
    ERROR_COLUMN,
    PipelineStats,
    Step,
    StepPlan,
    StepStats,
    check_steps,
    pipeline,
    plan,
)
from .prices import cost, load_prices
from .prompt import placeholders
from .settings import Settings

# Starts every line the command writes on stderr.
PREFIX = "polars-llm"
# Seconds between two progress lines when stderr is not a terminal (logs of a scheduler).
LOG_INTERVAL = 10.0


def say(message: str) -> None:
    """Write ``polars-llm: message`` on stderr."""
    click.echo(f"{PREFIX}: {message}", err=True)


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------
@dataclass
class EnrichRun:
    """One ``enrich`` run: check the input, then enrich it or plan it; and report on it.

    ``input`` is a file, a glob or a folder, local or in object storage (see
    :mod:`polars_llm.files`); a glob or a folder writes one file per input file into the
    ``output`` folder. ``run`` raises polars-llm's errors (and OSError when the disk fails); what
    it counted stays on the object for ``write_report``, which the caller calls with the outcome.
    """

    input: str | os.PathLike[str]
    output: str | os.PathLike[str]
    batch_size: int
    max_failed_rows: int
    max_failed_rate: float
    dry_run: bool
    report: Path | None
    progress: bool | None
    # Batch API runs only: wait for the batches (False: submit, then raise BatchPending).
    wait: bool = True
    # Where the progress lines and the closing summary go instead of stderr (a scheduler's log).
    log: Callable[[str], None] | None = None
    prices: str | None = None  # a JSON price file (see polars_llm.prices); else the defaults
    # Filled in as the run goes.
    t0: float = field(default_factory=time.monotonic, init=False)
    started: bool = field(default=False, init=False)  # the checks passed: a report is due
    committed: bool = field(default=False, init=False)  # every output is in place
    total_rows: int = field(default=0, init=False)
    steps: list[Step] = field(default_factory=list, init=False)
    stats: PipelineStats = field(default_factory=PipelineStats, init=False)
    plan_rows: list[dict[str, Any]] | None = field(default=None, init=False)
    first_error: str | None = field(default=None, init=False)
    files: int = field(default=0, init=False)  # input files
    written: list[str] = field(default_factory=list, init=False)  # outputs in place
    caching: bool = field(default=True, init=False)  # answers go to the cache: a rerun resumes
    price_table: dict[str, tuple[float, float]] = field(default_factory=dict, init=False)
    settings: Settings | None = field(default=None, init=False)

    def run(self, steps: list[Step], settings: Settings) -> None:
        """Check ``steps`` against the input, then write the output or, for a dry run, the plan."""
        self.steps = steps
        self.settings = settings
        self.caching = settings.cache_path() is not None
        self.price_table = load_prices(self.prices)
        if self.report is not None:
            _check_report_path(self.report, self.input, None if self.dry_run else self.output)
        files, many = expand_input(self.input)
        readers = [Reader(f) for f in files]
        self.files = len(readers)
        for reader in readers:
            _check_against_input(steps, reader.columns, reader.file.where)
            _check_column_types(steps, reader.schema, reader.file.where)
        self.total_rows = sum(r.rows for r in readers)
        if self.total_rows == 0:
            if many:
                raise EmptyInput(
                    f"the {len(readers)} file(s) of {self.input} have no rows; give at least one row"
                )
            raise EmptyInput(
                f"{self.input} has no rows (its columns: {', '.join(readers[0].columns)}); "
                "give a file with at least one row"
            )
        if self.report is not None:
            _check_folder(location(self.report), "--report file")
        if self.dry_run:
            self.started = True
            self._dry_run(readers, steps, settings)
            return
        out = location(self.output)
        if many:
            targets = _check_output_folder(out, location(self.input), readers)
        else:
            _check_folder(out, "output")
            targets = [out]
        for target in targets:
            remove_stale_temp_files(target)
        self.started = True
        work = list(zip(readers, targets, strict=True))
        if not settings.batch:
            self._enrich(work, steps, settings, many)
            return
        from . import batch

        display = _BatchProgress(self.progress, self.log)
        run = batch.BatchRun(wait=self.wait, on_progress=display.update)

        def frames() -> Iterator[pl.DataFrame]:
            for reader in readers:
                needed = _needed_columns(steps, reader.columns)
                for table in reader.batches(self.batch_size, columns=needed or None):
                    if table.num_rows:
                        yield _to_polars(table, needed, reader.file.where)

        try:
            with batch.active(run):
                try:
                    batch.run_in_rounds(frames, steps, settings, run)
                finally:
                    # Before the summary: lines sent while writing are counted by
                    # pipeline_in_rounds itself.
                    self.stats.calls += run.lines_submitted
                display.close()
                self._enrich(work, steps, settings, many)
        finally:
            display.close()

    # -- the run -------------------------------------------------------------------------------
    def _enrich(
        self,
        work: list[tuple[Reader, Location]],
        steps: list[Step],
        settings: Settings,
        many: bool,
    ) -> None:
        new_names = [s.name for s in steps] + [ERROR_COLUMN]
        allowed = max(
            self.max_failed_rows, math.floor(self.max_failed_rate * self.total_rows + 1e-9)
        )
        progress = _Progress(self.total_rows, self.progress, self.log)
        bad_input = False
        try:
            for reader, target in work:
                needed = _needed_columns(steps, reader.columns)
                if not target.remote and many:
                    os.makedirs(os.path.dirname(target.path), exist_ok=True)
                with AtomicOutput(target, None if many else file_format(target.path)) as out:
                    tables = reader.batches(self.batch_size)
                    if reader.rows == 0:  # still one output file, with the enriched columns
                        tables = iter([reader.empty()])
                    for table in tables:
                        if table.num_rows == 0 and out.schema is not None:
                            continue
                        df = _to_polars(table, needed, reader.file.where)
                        if settings.batch:
                            from .batch import enrich_frame

                            enriched = enrich_frame(df, steps, settings, self.stats)
                            progress.update(self.stats)
                        else:
                            enriched = pipeline(
                                df,
                                steps,
                                settings=settings,
                                on_error="null",
                                progress=progress.update,
                                stats=self.stats,
                            )
                        added = enriched.select(new_names)
                        if self.first_error is None:
                            errors = added.get_column(ERROR_COLUMN).drop_nulls()
                            if errors.len():
                                self.first_error = errors[0]
                        if self.stats.rows_failed > allowed:
                            raise TooManyFailures(self._too_many_message(allowed))
                        arrow_added = added.to_arrow()
                        for name, column in zip(
                            arrow_added.column_names, arrow_added.columns, strict=True
                        ):
                            table = table.append_column(arrow_added.schema.field(name), column)
                        out.write(table)
                        del df, enriched, added, table
                    out.commit()
                    self.written.append(str(target))
            self.committed = True
        except InputError:
            bad_input = True  # found mid-file: its one error line says it all, without a tally
            raise
        finally:
            progress.close(self.stats, tally=not bad_input)
        (self.log or say)(self._numbers())
        failed = self.stats.rows_failed
        tail = f", {failed} failed (see {ERROR_COLUMN})" if failed else ""
        if many:
            message = (
                f"wrote {len(self.written)} files to {self.output}: {self.total_rows} rows{tail}"
            )
        else:
            message = f"wrote {self.output}: {self.total_rows} rows{tail}"
        if self.log is not None:
            self.log(message)
        else:
            say(message)

    def _numbers(self) -> str:
        """Answers against rows, calls, tokens paid against served from the cache, and cost."""
        s = self.stats
        asked = s.answers - s.cached
        cached_tokens = s.cached_prompt_tokens + s.cached_completion_tokens
        spent = self.cost()
        money = (
            f"cost ${spent:,.4f}"
            if isinstance(spent, float)
            else f"cost unknown (no price for {spent}; give one with --prices FILE)"
        )
        return (
            f"{s.answers} answers for {s.rows_done} rows x {len(self.steps)} step(s): "
            f"{s.cached} from the cache, {asked} asked in {s.calls} calls ({s.retries} retries); "
            f"tokens paid: {s.prompt_tokens:,} prompt + {s.completion_tokens:,} completion "
            f"({cached_tokens:,} more served from the cache, not paid again); {money}"
        )

    def step_numbers(self) -> list[dict[str, Any]]:
        """Per step: where its requests went (endpoint, model) and what they cost."""
        rows = []
        for step in self.steps:
            tally = self.stats.steps.get(step.name, StepStats())
            endpoint, model = tally.endpoint, tally.model
            if not model and self.settings is not None:
                endpoint, model = _resolve(step, self.settings)
            rows.append(
                {
                    "name": step.name,
                    "template": step.template,
                    "kind": "extract"
                    if step.schema is not None
                    else "classify"
                    if step.labels is not None
                    else "complete",
                    "endpoint": endpoint,
                    "model": model,
                    **{
                        k: v
                        for k, v in dataclasses.asdict(tally).items()
                        if k not in ("endpoint", "model")
                    },
                    "cost_usd": _usd(self._cost(model, tally)),
                }
            )
        return rows

    def _cost(self, model: str, tally: StepStats) -> float | None:
        """USD of one step's paid tokens, at Batch API prices when the run used it."""
        usd = cost(model, tally.prompt_tokens, tally.completion_tokens, self.price_table)
        if usd is not None and self.settings is not None and self.settings.batch:
            from .batch import BATCH_DISCOUNT

            usd *= BATCH_DISCOUNT
        return usd

    def cost(self) -> float | str:
        """USD paid by this run, or the models whose price is unknown (comma-separated)."""
        steps = self.step_numbers()
        unknown = sorted({st["model"] for st in steps if st["cost_usd"] == "unknown"})
        if unknown:
            return ", ".join(unknown)
        return float(sum(st["cost_usd"] for st in steps))

    def not_written(self) -> str:
        """What a stopped run left at the output, for its last message."""
        if not self.written:
            return f"nothing was written to {self.output}"
        return (
            f"{len(self.written)} of {self.files} output files were written to {self.output} "
            "(each complete), the others were not"
        )

    def rerun_hint(self) -> str:
        """What rerunning the same command would do with the answers received so far."""
        if self.caching:
            return "a rerun reuses the answers received so far, which are cached"
        return "the cache is off (--no-cache), so a rerun asks for every answer again"

    def _too_many_message(self, allowed: int) -> str:
        s = self.stats
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(s.failures_by_reason.items()))
        return (
            f"{s.rows_failed} row(s) failed, more than the {allowed} allowed "
            f"(--max-failed-rows {self.max_failed_rows}, "
            f"--max-failed-rate {self.max_failed_rate:g}); by reason: {reasons}; "
            f"first: {self.first_error}. {_capital(self.not_written())}. Fix the cause or "
            f"raise the limit, then rerun the same command: {self.rerun_hint()}"
        )

    # -- dry run -------------------------------------------------------------------------------
    def _dry_run(self, readers: list[Reader], steps: list[Step], settings: Settings) -> None:
        """Print the plan: per step, what a run would send and cost (and as batches, with
        ``settings.batch``)."""
        totals = _Totals()
        for reader in readers:
            needed = _needed_columns(steps, reader.columns)
            for table in reader.batches(self.batch_size, columns=needed or None):
                if table.num_rows == 0:
                    continue
                totals.batches += 1
                df = _to_polars(table, needed, reader.file.where)
                for sp in plan(df, steps, settings=settings, prices=self.price_table):
                    _add_plan(totals.plans, sp)
        self.plan_rows = [dataclasses.asdict(sp) for sp in totals.plans.values()]
        click.echo(_plan_table(totals, self.total_rows, self.input, self.batch_size))
        if settings.batch:
            click.echo(_batch_plan(list(totals.plans.values())))

    # -- report --------------------------------------------------------------------------------
    def summary(self, code: int, error: str | None) -> dict[str, Any]:
        """The report of the run, which ended with exit ``code`` and ``error``, as a dict."""
        s = self.stats
        report: dict[str, Any] = {
            "input": str(self.input),
            "output": None if self.dry_run else str(self.output),
            "dry_run": self.dry_run,
            "files": self.files,
            "files_written": len(self.written),
            "rows": self.total_rows,
            "rows_done": s.rows_done,
            "failed_rows": s.rows_failed,
            "answers": s.answers,
            "cache_hits": s.cached,
            "calls": s.calls,
            "retries": s.retries,
            "failures_by_reason": dict(sorted(s.failures_by_reason.items())),
            "first_failure": self.first_error,
            "prompt_tokens": s.prompt_tokens,
            "completion_tokens": s.completion_tokens,
            "cached_prompt_tokens": s.cached_prompt_tokens,
            "cached_completion_tokens": s.cached_completion_tokens,
            "cost_usd": _usd(spent if isinstance(spent := self.cost(), float) else None),
            "seconds": round(time.monotonic() - self.t0, 3),
            "exit_code": code,
            "error": error,
            "steps": self.step_numbers(),
        }
        if self.plan_rows is not None:
            report["plan"] = self.plan_rows
        return report

    def write_report(self, code: int, error: str | None) -> None:
        """Write the JSON report of the run, which ended with exit ``code`` and ``error``.

        Raises OSError if the report cannot be written; no partial report is left behind.
        """
        report = self.summary(code, error)
        path = self.report
        assert path is not None
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            tmp.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
            os.replace(tmp, path)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise


# --------------------------------------------------------------------------------------------
# Input
# --------------------------------------------------------------------------------------------
def _resolve(step: Step, settings: Settings) -> tuple[str, str]:
    """The endpoint and model a step's requests go to, as its run resolves them."""
    endpoint = settings.endpoint(step.model)
    model = step.model or settings.default_model(endpoint)
    return ("embedded" if endpoint.local else endpoint.base_url), model


def _usd(value: float | None) -> float | str:
    return "unknown" if value is None else round(value, 6)


def _capital(text: str) -> str:
    """``text`` starting a sentence (``str.capitalize`` would lower a path's capitals)."""
    return text[:1].upper() + text[1:]


def _check_against_input(steps: Sequence[Step], columns: Sequence[str], where: object) -> None:
    """``check_steps``, with problems of the input's columns reported as bad input (exit 3)."""
    if ERROR_COLUMN in columns:
        raise InputError(
            f"{where} already has an {ERROR_COLUMN!r} column (is it the output of an earlier "
            f"run?); enrich the original file, or drop that column first"
        )
    try:
        check_steps(steps, columns)
    except ColumnMismatch as e:
        raise InputError(f"{e} (input: {where})") from e


# Arrow types a template cannot put into a prompt as text, and how to make text of them.
_NOT_TEXT = (
    (pa.types.is_list, "a list", ".list.join(', ')"),
    (pa.types.is_large_list, "a list", ".list.join(', ')"),
    (pa.types.is_fixed_size_list, "an array", ".arr.join(', ')"),
    (pa.types.is_struct, "a struct", ".struct.json_encode()"),
    (pa.types.is_map, "a map", ".list.eval(pl.element().struct.json_encode()).list.join(', ')"),
    (pa.types.is_binary, "a binary", ".cast(pl.String)"),
    (pa.types.is_large_binary, "a binary", ".cast(pl.String)"),
    (pa.types.is_fixed_size_binary, "a binary", ".cast(pl.String)"),
    (pa.types.is_union, "a union", ".cast(pl.String)"),
)


def _check_column_types(steps: Sequence[Step], schema: pa.Schema, path: object) -> None:
    """Raise InputError if a template names a column whose values are not text, numbers or dates."""
    wanted = {n for s in steps for n in placeholders(s.template)}
    for name in schema.names:
        if name not in wanted:
            continue
        dtype = schema.field(name).type
        if pa.types.is_dictionary(dtype):
            dtype = dtype.value_type
        for test, kind, fix in _NOT_TEXT:
            if test(dtype):
                raise InputError(
                    f"column {name!r} of {path} is {kind} column ({dtype}); a template can only "
                    "name text, number, boolean and date/time columns: write it as text first, "
                    f"e.g. with polars: pl.col({name!r}){fix}"
                )


def _needed_columns(steps: Sequence[Step], columns: Sequence[str]) -> list[str]:
    wanted = {n for s in steps for n in placeholders(s.template)}
    return [c for c in columns if c in wanted]


def _to_polars(table: pa.Table, needed: list[str], where: object) -> pl.DataFrame:
    """The columns the templates read, as a polars DataFrame (zero columns if none)."""
    if not needed:
        return pl.DataFrame(height=table.num_rows)
    selected = table.select(needed)
    try:
        # Parquet does not check that text is UTF-8; Polars would panic on it.
        for rb in selected.to_batches():
            rb.validate(full=True)
    except pa.ArrowInvalid as e:
        raise InputError(
            f"{where} holds text that is not valid UTF-8 in columns {', '.join(needed)} "
            f"({one_line(e)}); re-encode it as UTF-8"
        ) from e
    try:
        df = pl.from_arrow(selected)
    except Exception as e:  # an Arrow type polars cannot read
        raise InputError(
            f"cannot read columns {', '.join(needed)} of {where}: {one_line(e)}"
        ) from e
    assert isinstance(df, pl.DataFrame)
    return df


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------
def _check_folder(where: Location, what: str) -> None:
    """Raise InputError unless a file can be created at ``where`` (its folder, its bucket)."""
    if where.remote:
        _check_bucket(where, what)
        return
    path = Path(where.path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.exists():
        raise InputError(f"the {what} folder {folder} does not exist; create it first")
    if not folder.is_dir():
        raise InputError(f"the {what} folder {folder} is not a folder; check the path")
    if path.is_dir():
        raise InputError(f"the {what} path {path} is a folder; give a file name")
    probe = folder / f".{path.name}.probe-{os.getpid()}"
    try:
        probe.touch(exist_ok=True)
    except OSError as e:
        raise InputError(
            f"cannot write in the {what} folder {folder} ({e.strerror or e}); "
            "pick a writable folder"
        ) from e
    with contextlib.suppress(OSError):
        probe.unlink()


def _check_report_path(report: Path, input: object, output: object | None) -> None:
    """Raise ConfigError if the --report file would overwrite the input or the output."""
    for what, path in (("input", input), ("output", output)):
        if path is not None and _same_file(report, Path(str(path))):
            raise ConfigError(
                f"--report {report} names the {what} file; give the report its own file, "
                "e.g. --report run.json"
            )


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist yet
        return False


def _check_bucket(where: Location, what: str) -> None:
    bucket = where.path.split("/", 1)[0]
    try:
        found = where.fs.exists(bucket)
    except OSError as e:
        raise InputError(f"cannot reach the {what} bucket {bucket}: {one_line(e)}") from e
    if not found:
        raise InputError(f"the {what} bucket {bucket} of {where} does not exist; create it first")


def _check_output_folder(out: Location, src: Location, readers: list[Reader]) -> list[Location]:
    """The output file of each input file, in the OUTPUT folder; raise if it cannot hold them."""
    targets = [out.child(r.file.relative) for r in readers]
    if out.remote:
        _check_bucket(out, "output")
    else:
        path = Path(out.path)
        if path.exists() and not path.is_dir():
            raise InputError(
                f"{path} is a file, but a glob or a folder as INPUT writes one file per input "
                "file into an OUTPUT folder; give a folder"
            )
        # An existing folder must be writable; a new one needs a writable parent.
        _check_folder(out.child("x") if path.is_dir() else out, "output")
    inputs = {_same(r.file.where) for r in readers}
    clash = [str(t) for t in targets if _same(t) in inputs]
    if clash:
        raise InputError(
            f"the output {clash[0]} would overwrite its own input; give an OUTPUT folder "
            f"outside {src}"
        )
    return targets


def _same(where: Location) -> str:
    """A key that is equal for two spellings of one path."""
    return where.url if where.remote else os.path.realpath(where.path)


# --------------------------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------------------------
def _human(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"


def _terminal_columns() -> int:
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns
    except (OSError, ValueError, AttributeError):  # no terminal, or a stream without a fd
        return 0


def _display(
    show: bool | None, log: Callable[[str], None] | None
) -> tuple[str, Callable[[str], None]]:
    """How progress shows ("bar", "log" or "off") and where its lines go: ``log``, else stderr.

    ``show`` forces the bar (True) or nothing (False); None decides by the terminal. With ``log``
    (a scheduler's log) there is never a bar.
    """
    if log is not None:
        return ("off" if show is False else "log"), log
    mode = ("bar" if sys.stderr.isatty() else "log") if show is None else ("bar" if show else "off")
    return mode, lambda line: click.echo(line, err=True)


class _Progress:
    """A tqdm bar on a terminal, else a log line every LOG_INTERVAL seconds (see _display)."""

    def __init__(self, total: int, show: bool | None, log: Callable[[str], None] | None) -> None:
        self.total = total
        self.t0 = time.monotonic()
        self.last_log = self.t0
        self.bar: Any = None
        self.done = 0
        self.mode, self.emit = _display(show, log)

    def _bar(self) -> Any:
        # Made at the first update, which comes once the endpoint is up: the embedded model's
        # banner, printed as it starts, then gets a line of its own instead of the bar's.
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(
                total=self.total,
                unit="row",
                desc=PREFIX,
                file=sys.stderr,
                leave=True,
                # A terminal of unknown size (a 0x0 pty) would hide the bar.
                **({} if _terminal_columns() else {"ncols": 100, "nrows": 20}),
            )
        return self.bar

    def line(self, stats: PipelineStats) -> str:
        elapsed = max(time.monotonic() - self.t0, 1e-9)
        rate = stats.rows_done / elapsed
        # A slow model (the embedded one does a row in seconds) would show "0 rows/s".
        shown = f"{rate:.0f}" if rate >= 10 or rate == 0 else f"{rate:.2g}"
        return f"{PREFIX}: {stats.rows_done}/{self.total} rows, {_counts(stats)}, {shown} rows/s"

    def update(self, stats: PipelineStats) -> None:
        if self.mode == "bar":
            bar = self._bar()
            bar.set_postfix_str(_counts(stats), refresh=False)
            bar.update(stats.rows_done - self.done)
            self.done = stats.rows_done
        elif self.mode == "log":
            now = time.monotonic()
            if now - self.last_log >= LOG_INTERVAL:
                self.last_log = now
                self.emit(self.line(stats))

    def close(self, stats: PipelineStats, tally: bool = True) -> None:
        if self.mode == "bar":
            self.update(stats)
            self.bar.close()
        elif self.mode == "log" and tally:
            self.emit(self.line(stats))


class _BatchProgress:
    """Lines of the batches waited on: a tqdm bar on a terminal, else a log line every
    LOG_INTERVAL seconds, from the batches' ``request_counts`` (see _display)."""

    def __init__(self, show: bool | None, log: Callable[[str], None] | None) -> None:
        self.mode, self.emit = _display(show, log)
        self.bar: Any = None
        self.last: Any = None
        self.last_log = 0.0

    def line(self, p: Any) -> str:
        return (
            f"{PREFIX}: batches: {p.ended}/{p.batches} ended, {p.completed + p.failed:,}/"
            f"{p.lines:,} lines done, {p.failed:,} failed"
        )

    def update(self, p: Any) -> None:
        self.last = p
        if self.mode == "bar":
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(
                    total=p.lines,
                    unit="line",
                    desc=f"{PREFIX} batch",
                    file=sys.stderr,
                    leave=False,
                    **({} if _terminal_columns() else {"ncols": 100, "nrows": 20}),
                )
            self.bar.total = p.lines
            self.bar.n = p.completed + p.failed
            self.bar.set_postfix_str(f"{p.ended}/{p.batches} batches ended", refresh=False)
            self.bar.refresh()
        elif self.mode == "log":
            now = time.monotonic()
            if now - self.last_log >= LOG_INTERVAL or p.ended == p.batches:
                self.last_log = now
                self.emit(self.line(p))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _batch_plan(plans: list[StepPlan]) -> str:
    """The dry run's Batch API lines: files and lines per model, cost beside synchronous."""
    from .batch import BATCH_DISCOUNT, MAX_LINES

    lines_by_model: dict[str, int] = {}
    for sp in plans:
        lines_by_model[sp.model] = lines_by_model.get(sp.model, 0) + sp.to_send + sp.unknown
    files = sum(math.ceil(n / MAX_LINES) for n in lines_by_model.values())
    now = sum(sp.to_send for sp in plans)
    later = sum(sp.unknown for sp in plans)
    costs = [sp.est_cost_usd for sp in plans]
    if any(c is None for c in costs):
        cost = "cost ? (no price known for a model)"
    else:
        sync = sum(c for c in costs if c)
        cost = f"est. cost ${sync * BATCH_DISCOUNT:,.4f} at batch prices (${sync:,.4f} synchronous)"
    return (
        f"Batch API: {files:,} batch file(s) over {len(lines_by_model)} model(s): {now:,} "
        f"line(s) in the first round, up to {later:,} more in later rounds (steps that read "
        f"answers not cached yet); {cost}."
    )


def _counts(stats: PipelineStats) -> str:
    """Answers from the cache, failed rows and tokens paid, for a progress line."""
    paid = stats.prompt_tokens + stats.completion_tokens
    return (
        f"{stats.cached}/{stats.answers} answers cached, {stats.rows_failed} failed, "
        f"{_human(paid)} tokens paid"
    )


# --------------------------------------------------------------------------------------------
# Dry run table
# --------------------------------------------------------------------------------------------
_SUMMED = (
    "prompts",
    "unique",
    "cached",
    "to_send",
    "unknown",
    "unknown_calls",
    "est_prompt_tokens",
    "est_completion_tokens",
)


@dataclass
class _Totals:
    """StepPlans of several batches, summed by step."""

    plans: dict[str, StepPlan] = field(default_factory=dict)
    batches: int = 0


def _add_plan(plans: dict[str, StepPlan], sp: StepPlan) -> None:
    total = plans.get(sp.name)
    if total is None:
        plans[sp.name] = dataclasses.replace(sp)
        return
    for name in _SUMMED:
        setattr(total, name, getattr(total, name) + getattr(sp, name))
    if total.est_cost_usd is not None and sp.est_cost_usd is not None:
        total.est_cost_usd += sp.est_cost_usd
    else:
        total.est_cost_usd = None


def _plan_table(totals: _Totals, rows: int, path: object, batch_size: int) -> str:
    header = [
        "step",
        "model",
        "prompts",
        "unique",
        "cached",
        "to send",
        "unknown",
        "their calls",
        "est. prompt tok",
        "est. completion tok",
        "est. cost",
    ]

    def cost(value: float | None) -> str:
        return "?" if value is None else f"${value:,.4f}"

    body: list[list[str]] = []
    for sp in totals.plans.values():
        body.append(
            [
                sp.name,
                sp.model,
                f"{sp.prompts:,}",
                f"{sp.unique:,}",
                f"{sp.cached:,}",
                f"{sp.to_send:,}",
                f"{sp.unknown:,}",
                f"{sp.unknown_calls:,}",
                f"{sp.est_prompt_tokens:,}",
                f"{sp.est_completion_tokens:,}",
                cost(sp.est_cost_usd),
            ]
        )
    plans = list(totals.plans.values())
    costs = [sp.est_cost_usd for sp in plans]
    body.append(
        [
            "total",
            "",
            *(f"{sum(getattr(sp, n) for sp in plans):,}" for n in _SUMMED),
            cost(None if any(c is None for c in costs) else sum(c for c in costs if c)),
        ]
    )
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def fmt(row: list[str]) -> str:
        cells = [
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    lines = [
        f"Dry run: {rows:,} rows of {path}, {len(plans)} step(s). "
        "No call was made and nothing was written.",
        "",
        fmt(header),
        fmt(["-" * w for w in widths]),
        *(fmt(r) for r in body[:-1]),
        fmt(["-" * w for w in widths]),
        fmt(body[-1]),
        "",
        "prompts: rows with a prompt; unique: distinct prompts; cached: answers already in the "
        "cache; to send: calls a run would make;",
        "unknown: prompts that depend on an earlier step's answer not cached yet (estimated from "
        "the template); their calls: one per distinct input.",
        "Completion tokens per call: the mean of the step's cached answers, else a label's size "
        "for classify steps, else max_tokens (or 256). Costs are estimates; ? = no price known "
        "for the model (--prices FILE).",
    ]
    if totals.batches > 1:
        lines.append(
            f"Approximate: the input was read in {totals.batches} batches of up to "
            f"{batch_size:,} rows and the counts are summed per batch, so a prompt repeated "
            "in several batches counts once in each (unique and to send may be overstated)."
        )
    return "\n".join(lines)
