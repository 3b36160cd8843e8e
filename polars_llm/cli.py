"""The ``polars-llm`` command line: enrich a Parquet file of any size, and manage the cache.

``polars-llm enrich IN OUT --step NAME=TEMPLATE ...`` reads ``IN`` in batches, runs the steps on
each batch with :func:`polars_llm.pipeline` and writes each enriched batch as it goes, so memory
stays bounded whatever the file's size. The output goes to a temporary file next to ``OUT`` that
replaces ``OUT`` atomically once every row is done: a killed run never leaves a partial file. The
cache is the checkpoint: every answer is on disk as soon as it arrives, so rerunning the same
command after a crash sends only what was not answered yet.

Exit codes: 0 success, 1 unexpected error, 2 bad usage or configuration, 3 bad input, 4 too many
failed rows, 5 aborted by the endpoint (bad key, unknown model, unreachable), 130 interrupted
(Ctrl-C), 143 terminated (SIGTERM).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import fcntl
import json
import math
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from .cache import open_cache
from .errors import (
    BatchAborted,
    ConfigError,
    InputError,
    PolarsLLMError,
    TooManyFailures,
)
from .pipeline import (
    ERROR_COLUMN,
    PipelineStats,
    Step,
    StepPlan,
    check_steps,
    load_pipeline,
    pipeline,
    plan,
)
from .prompt import placeholders
from .settings import Settings, default_cache_dir, get_settings

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INPUT = 3
EXIT_FAILURES = 4
EXIT_ABORTED = 5
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143

DEFAULT_BATCH_SIZE = 50_000
# Seconds between two progress lines when stderr is not a terminal (logs of a scheduler).
LOG_INTERVAL = 10.0

PREFIX = "polars-llm"

EXIT_CODES_HELP = """\b
Exit codes:
  0    success (rows that failed within --max-failed-rows/--max-failed-rate
       are written with their error in llm_error)
  1    unexpected error (e.g. the disk filled up while writing)
  2    bad usage or configuration: unknown option, malformed --step or
       template, bad pipeline file, a template naming a later step
  3    bad input: missing file, not Parquet, no rows, a template naming a
       column the input does not have, a step named like an input column,
       output folder missing or not writable
  4    more rows failed than allowed; nothing is written to OUTPUT
  5    aborted by the endpoint: bad API key, unknown model, endpoint
       unreachable; nothing is written to OUTPUT
  130  interrupted (Ctrl-C); 143 terminated (SIGTERM); nothing is written
       to OUTPUT, and a rerun resumes from the cache"""

ENRICH_EPILOG = f"""\b
Examples:
  polars-llm enrich reviews.parquet enriched.parquet \\
    --step sentiment='Sentiment of this review, one word: {{review}}' \\
    --step reply='Write a short reply to a {{sentiment}} review: {{review}}' \\
    --model gpt-4o-mini --concurrency 32 --rpm 500
  polars-llm enrich in.parquet out.parquet --pipeline pipeline.toml
  polars-llm enrich in.parquet out.parquet --step s='Summarize: {{text}}' --dry-run

\b
A pipeline file (TOML) names steps in order, with optional [settings]:
  [settings]
  concurrency = 16
  [steps.sentiment]
  prompt = "Sentiment of this review, one word: {{review}}"
  labels = ["positive", "negative", "neutral"]
  [steps.reply]
  prompt = "Write a short reply to a {{sentiment}} review: {{review}}"
  params = {{ temperature = 0.3, max_tokens = 120 }}

\b
The output has every input column, in order, then one column per step,
then llm_error (null where the row succeeded, else which step failed and
why). Rerunning is safe and cheap: answers are cached as they arrive, and
OUTPUT is replaced atomically only when every row is done.

{EXIT_CODES_HELP}
"""


# --------------------------------------------------------------------------------------------
# Errors and messages
# --------------------------------------------------------------------------------------------
class _Interrupted(BaseException):
    """Ctrl-C or SIGTERM during a run."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def _one_line(message: object) -> str:
    return " ".join(str(message).split())


def _say(message: str) -> None:
    click.echo(f"{PREFIX}: {message}", err=True)


def _error(message: object) -> None:
    click.echo(f"{PREFIX}: error: {_one_line(message)}", err=True)


class _Cli(click.Group):
    """A group whose every expected error is one line on stderr with a documented exit code."""

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        try:
            code = super().main(
                args, prog_name or PREFIX, complete_var, standalone_mode=False, **extra
            )
        except click.exceptions.NoArgsIsHelpError as e:
            click.echo(e.format_message(), err=True)
            code = EXIT_USAGE
        except click.UsageError as e:
            where = e.ctx.command_path if e.ctx is not None else PREFIX
            _error(f"{e.format_message()} (see '{where} --help')")
            code = EXIT_USAGE
        except click.Abort:  # Ctrl-C or end of input at a confirmation prompt
            _say("aborted")
            code = EXIT_INTERRUPTED
        except click.ClickException as e:
            _error(e.format_message())
            code = e.exit_code
        code = code if isinstance(code, int) else EXIT_OK
        if standalone_mode:
            sys.exit(code)
        return code


@click.group(
    cls=_Cli,
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog=EXIT_CODES_HELP,
)
@click.version_option(package_name="polars-llm", prog_name=PREFIX)
def cli() -> None:
    """Enrich Parquet files with LLM calls: deduplicated, cached, concurrent, rate-limited.

    Run 'polars-llm enrich --help' for the options and examples.
    """


def main(argv: Sequence[str] | None = None) -> None:
    """The console script ``polars-llm``."""
    cli.main(args=list(argv) if argv is not None else None, prog_name=PREFIX)


# --------------------------------------------------------------------------------------------
# enrich
# --------------------------------------------------------------------------------------------
def _parse_step(value: str) -> tuple[str, str]:
    name, sep, template = value.partition("=")
    name = name.strip()
    if not sep or not name or not template:
        raise click.BadParameter(
            f"{value!r} is not NAME=TEMPLATE; write e.g. "
            "--step sentiment='Sentiment of this review: {review}'",
            param_hint="'--step'",
        )
    return name, template


def _steps_callback(
    ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> list[tuple[str, str]]:
    return [_parse_step(v) for v in values]


@dataclass
class _Options:
    input: Path
    output: Path
    steps: list[tuple[str, str]]
    pipeline_file: Path | None
    model: str | None
    system: str | None
    max_tokens: int | None
    temperature: float | None
    base_url: str | None
    api_key: str | None
    concurrency: int | None
    rpm: int | None
    tpm: int | None
    timeout: float | None
    cache_dir: Path | None
    no_cache: bool
    batch_size: int
    max_failed_rows: int
    max_failed_rate: float
    dry_run: bool
    report: Path | None
    progress: bool | None


@cli.command(epilog=ENRICH_EPILOG, context_settings={"max_content_width": 100})
@click.argument("input_path", metavar="INPUT", type=click.Path(path_type=Path))
@click.argument("output_path", metavar="OUTPUT", type=click.Path(path_type=Path))
@click.option(
    "--step",
    "steps",
    multiple=True,
    metavar="NAME=TEMPLATE",
    callback=_steps_callback,
    help="A step: new column NAME from a prompt TEMPLATE whose {placeholders} name input "
    "columns or earlier steps. Repeat for more steps; they run in the order given, after the "
    "--pipeline file's steps. Example: --step sentiment='Sentiment of this review: {review}'",
)
@click.option(
    "--pipeline",
    "pipeline_file",
    type=click.Path(path_type=Path),
    metavar="FILE",
    help="A TOML pipeline file of [steps.NAME] tables (prompt, model, system, params, labels, "
    "schema) and optional [settings]; options given here override its settings. "
    "Example: --pipeline pipeline.toml",
)
@click.option(
    "--model",
    help="Model for every step that does not name one. Default: gpt-4o-mini on a remote "
    "endpoint, the embedded model when none is configured. Example: --model gpt-4o-mini",
)
@click.option(
    "--system",
    help="System message for the --step steps. Example: --system 'You are a terse analyst.'",
)
@click.option(
    "--max-tokens",
    type=click.IntRange(min=1),
    metavar="N",
    help="Longest answer, in tokens, for the --step steps. Example: --max-tokens 120",
)
@click.option(
    "--temperature",
    type=click.FloatRange(min=0),
    metavar="T",
    help="Sampling temperature for the --step steps. Example: --temperature 0",
)
@click.option(
    "--base-url",
    metavar="URL",
    help="OpenAI-compatible endpoint. Default: $OPENAI_BASE_URL; else OpenAI when "
    "$OPENAI_API_KEY is set; else the embedded local model. "
    "Example: --base-url http://localhost:8000/v1",
)
@click.option(
    "--api-key",
    metavar="KEY",
    help="API key. Default: $OPENAI_API_KEY (prefer it: a key on the command line shows in "
    "the process list). Example: --api-key sk-...",
)
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    metavar="N",
    help="Requests in flight at once, per endpoint (default 32). Example: --concurrency 32",
)
@click.option(
    "--rpm",
    type=click.IntRange(min=1),
    metavar="N",
    help="Requests per minute the client keeps under (default: unlimited). Example: --rpm 500",
)
@click.option(
    "--tpm",
    type=click.IntRange(min=1),
    metavar="N",
    help="Tokens per minute the client keeps under (default: unlimited). Example: --tpm 200000",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    help="Seconds one request may take before it is retried (default 180). Example: --timeout 60",
)
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    metavar="DIR",
    help="Cache folder. Default: $POLARS_LLM_CACHE_DIR, else ~/.cache/polars-llm. "
    "Example: --cache-dir /data/llm-cache",
)
@click.option(
    "--no-cache",
    is_flag=True,
    help="Neither read nor write the cache (a rerun then pays for every call again).",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=DEFAULT_BATCH_SIZE,
    show_default=True,
    metavar="ROWS",
    help="Rows read, enriched and written at a time; memory grows with it. "
    "Example: --batch-size 10000",
)
@click.option(
    "--max-failed-rows",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    metavar="N",
    help="Failed rows allowed: up to this many (or up to --max-failed-rate), the output is "
    "written with each failed row's reason in llm_error; above both, exit 4 and no output. "
    "Example: --max-failed-rows 10",
)
@click.option(
    "--max-failed-rate",
    type=click.FloatRange(0, 1),
    default=0.0,
    show_default=True,
    metavar="F",
    help="Share of input rows allowed to fail (see --max-failed-rows). "
    "Example: --max-failed-rate 0.01",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Read the input and show, per step, the prompts, cache hits, calls to send and the "
    "estimated tokens and cost; call nothing and write nothing.",
)
@click.option(
    "--report",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="FILE",
    help="Write a JSON report of the run (rows, calls, cache hits, failures by reason, tokens, "
    "seconds, exit code), also when the run fails. Example: --report run.json",
)
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Show a progress bar (--progress) or nothing (--no-progress). Default: a bar on a "
    "terminal, else a log line on stderr every 10 s.",
)
def enrich(
    input_path: Path,
    output_path: Path,
    steps: list[tuple[str, str]],
    pipeline_file: Path | None,
    **options: Any,
) -> int:
    """Add LLM-written columns to the Parquet file INPUT and write it to OUTPUT.

    INPUT is read in batches of --batch-size rows; each batch is enriched and written as it
    goes, so files of any size fit in memory. Identical prompts are sent once, and every answer
    is cached as it arrives: if the run is killed, rerun the same command and it continues where
    it stopped without paying twice. OUTPUT appears, atomically, only when every row is done.
    """
    if not steps and pipeline_file is None:
        raise click.UsageError(
            "no steps: give --step NAME=TEMPLATE (repeatable) or --pipeline FILE"
        )
    opts = _Options(
        input=input_path, output=output_path, steps=steps, pipeline_file=pipeline_file, **options
    )
    return _Enrich(opts).run()


@dataclass
class _Totals:
    """StepPlans of several batches, summed by step."""

    plans: dict[str, StepPlan] = field(default_factory=dict)
    batches: int = 0


class _Enrich:
    """One ``enrich`` invocation: validate, run or plan, report, and map errors to exit codes."""

    def __init__(self, opts: _Options) -> None:
        self.opts = opts
        self.started = False
        self.t0 = time.monotonic()
        self.total_rows = 0
        self.steps: list[Step] = []
        self.stats = PipelineStats()
        self.plan_rows: list[dict[str, Any]] | None = None
        self.first_error: str | None = None
        self.committed = False  # the output is in place

    # -- entry ---------------------------------------------------------------------------------
    def run(self) -> int:
        error: str | None = None
        try:
            with _signals_as_interrupts():
                self._run()
            code = EXIT_OK
        except _Interrupted as e:
            if self.committed:
                # The signal came after the output was moved into place: the run succeeded.
                code = EXIT_OK
            else:
                code = e.code
                what = "interrupted" if code == EXIT_INTERRUPTED else "terminated"
                error = f"{what}; nothing was written to {self.opts.output}"
                _say(f"{error}. Rerun the same command to resume: the answers so far are cached.")
        except click.UsageError:
            raise
        except InputError as e:
            code, error = EXIT_INPUT, str(e)
            _error(e)
        except ConfigError as e:  # TemplateError included
            code, error = EXIT_USAGE, str(e)
            _error(e)
        except TooManyFailures as e:
            code, error = EXIT_FAILURES, str(e)
            _error(e)
        except BatchAborted as e:
            code, error = EXIT_ABORTED, _aborted_message(e)
            _error(error)
        except PolarsLLMError as e:
            code, error = EXIT_ERROR, str(e)
            _error(e)
        except ImportError as e:
            code = EXIT_USAGE
            error = (
                f"{e}. With no endpoint configured polars-llm runs the embedded model, which needs "
                "`pip install 'polars-llm[local]'`; or give --base-url/--api-key "
                "($OPENAI_BASE_URL/$OPENAI_API_KEY)"
            )
            _error(error)
        except OSError as e:
            code, error = EXIT_ERROR, f"{e.strerror or e} ({e.filename or self.opts.output})"
            _error(f"{error}; nothing was written to {self.opts.output}")
        except Exception as e:
            code, error = EXIT_ERROR, f"{type(e).__name__}: {e}"
            traceback.print_exc()
            _error(f"unexpected {error}; nothing was written to {self.opts.output}")
        if self.opts.report is not None and self.started:
            self._write_report(code, error)
        return code

    def _run(self) -> None:
        opts = self.opts
        steps, settings = self._steps_and_settings()
        self.steps = steps
        pf = _open_parquet(opts.input)
        self.total_rows = pf.metadata.num_rows
        columns = list(pf.schema_arrow.names)
        _check_against_input(steps, columns, opts.input)
        check_steps(steps, columns)
        if self.total_rows == 0:
            raise InputError(
                f"{opts.input} has no rows (its columns: {', '.join(columns)}); "
                "give a file with at least one row"
            )
        if opts.report is not None:
            _check_folder(opts.report, "--report file")
        if opts.dry_run:
            self.started = True
            self._dry_run(pf, steps, settings)
            return
        _check_folder(opts.output, "output")
        _remove_stale_temp_files(opts.output)
        self.started = True
        self._enrich(pf, steps, settings, columns)

    # -- configuration -------------------------------------------------------------------------
    def _steps_and_settings(self) -> tuple[list[Step], Settings]:
        opts = self.opts
        steps: list[Step] = []
        file_settings: dict[str, Any] = {}
        if opts.pipeline_file is not None:
            steps, file_settings = load_pipeline(opts.pipeline_file)
        params = {
            k: v
            for k, v in (("max_tokens", opts.max_tokens), ("temperature", opts.temperature))
            if v is not None
        }
        for name, template in opts.steps:
            steps.append(Step(name=name, template=template, system=opts.system, params=params))
        names = [s.name for s in steps]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"more than one step is named {', '.join(dupes)}; rename one")
        settings = get_settings()
        try:
            settings = settings.replace(**file_settings)
        except TypeError as e:
            raise ConfigError(f"[settings] of {opts.pipeline_file}: {e}") from e
        settings = settings.replace(
            model=opts.model,
            base_url=opts.base_url,
            api_key=opts.api_key,
            concurrency=opts.concurrency,
            rpm=opts.rpm,
            tpm=opts.tpm,
            timeout=opts.timeout,
            cache_dir=opts.cache_dir,
            cache=False if opts.no_cache else None,
            progress=opts.progress,
        )
        return steps, settings

    # -- the run -------------------------------------------------------------------------------
    def _enrich(
        self, pf: pq.ParquetFile, steps: list[Step], settings: Settings, columns: list[str]
    ) -> None:
        opts = self.opts
        needed = _needed_columns(steps, columns)
        new_names = [s.name for s in steps] + [ERROR_COLUMN]
        allowed = max(
            opts.max_failed_rows, math.floor(opts.max_failed_rate * self.total_rows + 1e-9)
        )
        progress = _Progress(self.total_rows, opts.progress)
        try:
            with _AtomicParquet(opts.output) as out:
                for rb in _batches(pf, opts.input, batch_size=opts.batch_size):
                    if rb.num_rows == 0:
                        continue
                    df = _to_polars(rb, needed, opts.input)
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
                    table = pa.Table.from_batches([rb])
                    arrow_added = added.to_arrow()
                    for name, column in zip(
                        arrow_added.column_names, arrow_added.columns, strict=True
                    ):
                        table = table.append_column(arrow_added.schema.field(name), column)
                    out.write(table)
                    del df, enriched, added, table
                out.commit()
                self.committed = True
        finally:
            progress.close(self.stats)
        failed = self.stats.rows_failed
        tail = f", {failed} failed (see {ERROR_COLUMN})" if failed else ""
        _say(f"wrote {opts.output}: {self.total_rows} rows{tail}")

    def _too_many_message(self, allowed: int) -> str:
        s = self.stats
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(s.failures_by_reason.items()))
        return (
            f"{s.rows_failed} row(s) failed, more than the {allowed} allowed "
            f"(--max-failed-rows {self.opts.max_failed_rows}, "
            f"--max-failed-rate {self.opts.max_failed_rate:g}); by reason: {reasons}; "
            f"first: {self.first_error}. Nothing was written to {self.opts.output}. The answers "
            "received are cached: fix the cause or raise the limit, then rerun the same command"
        )

    # -- dry run -------------------------------------------------------------------------------
    def _dry_run(self, pf: pq.ParquetFile, steps: list[Step], settings: Settings) -> None:
        opts = self.opts
        needed = _needed_columns(steps, list(pf.schema_arrow.names))
        totals = _Totals()
        for rb in _batches(pf, opts.input, batch_size=opts.batch_size, columns=needed or None):
            if rb.num_rows == 0:
                continue
            totals.batches += 1
            df = _to_polars(rb, needed, opts.input)
            for sp in plan(df, steps, settings=settings):
                _add_plan(totals.plans, sp)
        self.plan_rows = [dataclasses.asdict(sp) for sp in totals.plans.values()]
        click.echo(_plan_table(totals, self.total_rows, opts))

    # -- report --------------------------------------------------------------------------------
    def _write_report(self, code: int, error: str | None) -> None:
        s = self.stats
        report: dict[str, Any] = {
            "input": str(self.opts.input),
            "output": None if self.opts.dry_run else str(self.opts.output),
            "dry_run": self.opts.dry_run,
            "rows": self.total_rows,
            "rows_done": s.rows_done,
            "calls": s.calls,
            "cache_hits": s.cached,
            "failed_rows": s.rows_failed,
            "failures_by_reason": dict(sorted(s.failures_by_reason.items())),
            "first_failure": self.first_error,
            "prompt_tokens": s.prompt_tokens,
            "completion_tokens": s.completion_tokens,
            "seconds": round(time.monotonic() - self.t0, 3),
            "exit_code": code,
            "error": error,
            "steps": [
                {
                    "name": st.name,
                    "template": st.template,
                    "model": st.model,
                    "kind": "extract"
                    if st.schema is not None
                    else "classify"
                    if st.labels is not None
                    else "complete",
                }
                for st in self.steps
            ],
        }
        if self.plan_rows is not None:
            report["plan"] = self.plan_rows
        path = self.opts.report
        assert path is not None
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            tmp.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
            os.replace(tmp, path)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            _error(f"could not write the report {path}: {e.strerror or e}")


# --------------------------------------------------------------------------------------------
# Helpers of enrich
# --------------------------------------------------------------------------------------------
def _aborted_message(e: BatchAborted) -> str:
    # The engine's message already says what to check; the answers so far are cached.
    return f"aborted: {e} Nothing was written to the output; a rerun reuses the cached answers"


def _open_parquet(path: Path) -> pq.ParquetFile:
    if not path.exists():
        raise InputError(f"input file {path} does not exist; check the path")
    if path.is_dir():
        raise InputError(f"input {path} is a folder; give a Parquet file")
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, ValueError) as e:
        raise InputError(
            f"{path} is not a Parquet file ({_one_line(e)}); convert it first, e.g. "
            "pl.read_csv(...).write_parquet(...)"
        ) from e
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror or e}") from e


def _batches(pf: pq.ParquetFile, path: Path, **options: Any) -> Iterator[pa.RecordBatch]:
    """The file's record batches; a read failure is bad input, not a crash."""
    batches = pf.iter_batches(**options)
    while True:
        try:
            rb = next(batches)
        except StopIteration:
            return
        except (pa.ArrowException, OSError) as e:
            raise InputError(
                f"cannot read {path}: {_one_line(e)}; the file may be truncated or corrupt"
            ) from e
        yield rb


def _check_against_input(steps: Sequence[Step], columns: Sequence[str], path: Path) -> None:
    """Say which placeholder or step name does not fit the input, with the code it deserves.

    Problems of the steps alone (a placeholder naming a later step) are ConfigError (exit 2);
    problems with the input's columns (a missing column, a step named like a column) are
    InputError (exit 3).
    """
    names = [s.name for s in steps]
    if ERROR_COLUMN in names:
        raise ConfigError(f"{ERROR_COLUMN!r} is the column of row errors; name the step otherwise")
    if ERROR_COLUMN in columns:
        raise InputError(
            f"{path} already has an {ERROR_COLUMN!r} column (is it the output of an earlier "
            f"run?); enrich the original file, or drop that column first"
        )
    available = list(columns)
    for k, step in enumerate(steps):
        if step.name in columns:
            raise InputError(
                f"step {step.name!r}: {path} already has a column {step.name!r}; "
                "give the step another name"
            )
        for name in placeholders(step.template):
            if name in available:
                continue
            if name == "":
                raise ConfigError(
                    f"step {step.name!r}: {{}} needs a column name here, e.g. {{review}}"
                )
            if name in names[k:]:
                raise ConfigError(
                    f"step {step.name!r} uses {{{name}}}, which a later step computes; "
                    f"put step {name!r} first"
                )
            close = difflib.get_close_matches(name, available, n=1)
            hint = f"did you mean {{{close[0]}}}? " if close else ""
            raise InputError(
                f"step {step.name!r}: {{{name}}} is not a column of {path} nor an earlier step; "
                f"{hint}available: {', '.join(available)}"
            )
        available.append(step.name)


def _needed_columns(steps: Sequence[Step], columns: Sequence[str]) -> list[str]:
    wanted = {n for s in steps for n in placeholders(s.template)}
    return [c for c in columns if c in wanted]


def _to_polars(rb: pa.RecordBatch, needed: list[str], path: Path) -> pl.DataFrame:
    """The columns the templates read, as a polars DataFrame (zero columns if none)."""
    if not needed:
        return pl.DataFrame(height=rb.num_rows)
    try:
        return pl.from_arrow(rb.select(needed))
    except Exception as e:  # an Arrow type polars cannot read
        raise InputError(
            f"cannot read columns {', '.join(needed)} of {path}: {_one_line(e)}"
        ) from e


def _check_folder(path: Path, what: str) -> None:
    """Raise InputError unless ``path``'s folder exists and a file can be created in it."""
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


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.tmp-"


def _remove_stale_temp_files(path: Path) -> None:
    """Delete temporary files left next to ``path`` by runs that were killed (kill -9).

    A live run holds an exclusive lock on its temporary file; the kernel drops it when the
    process dies, whatever host or container it ran in. A file we can lock is abandoned.
    """
    prefix = _temp_prefix(path)
    with contextlib.suppress(OSError):
        for entry in path.parent.iterdir():
            if not entry.name.startswith(prefix):
                continue
            try:
                with open(entry, "rb") as fh:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    entry.unlink()
            except OSError:
                continue  # locked by a run in progress, or already gone


class _AtomicParquet:
    """A Parquet file written batch by batch to a temporary file, then moved onto ``path``.

    The schema is the first batch's; later batches are cast to it. On any exception (Ctrl-C
    included) the temporary file is deleted and ``path`` is left as it was.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp = path
        self.fh: Any = None
        self.writer: pq.ParquetWriter | None = None
        self.schema: pa.Schema | None = None

    def __enter__(self) -> _AtomicParquet:
        # A unique name (two containers may share a pid) and an exclusive lock held while the
        # file is written, which tells other runs it is not abandoned.
        fd, name = tempfile.mkstemp(dir=self.path.parent, prefix=_temp_prefix(self.path))
        self.tmp = Path(name)
        self.fh = os.fdopen(fd, "wb")  # closed in commit or __exit__
        fcntl.flock(self.fh, fcntl.LOCK_EX)
        return self

    def write(self, table: pa.Table) -> None:
        if self.writer is None:
            self.schema = table.schema
            self.writer = pq.ParquetWriter(self.fh, self.schema)
        elif not table.schema.equals(self.schema):
            table = table.cast(self.schema)
        self.writer.write_table(table)

    def commit(self) -> None:
        self.writer.close()
        self.writer = None
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        os.replace(self.tmp, self.path)
        _fsync_folder(self.path.parent)

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if self.writer is not None:
            with contextlib.suppress(Exception):
                self.writer.close()
        if self.fh is not None:
            with contextlib.suppress(Exception):
                self.fh.close()
        if exc_type is not None:
            with contextlib.suppress(OSError):
                self.tmp.unlink()


def _fsync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _signals_as_interrupts() -> Iterator[None]:
    """Turn Ctrl-C and SIGTERM into ``_Interrupted`` so that the temporary file is removed."""
    if threading.current_thread() is not threading.main_thread():
        try:
            yield
        except KeyboardInterrupt:
            raise _Interrupted(EXIT_INTERRUPTED) from None
        return
    terminated = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal terminated
        terminated = True
        # KeyboardInterrupt is what the engine cancels its in-flight requests on.
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    except KeyboardInterrupt:
        raise _Interrupted(EXIT_TERMINATED if terminated else EXIT_INTERRUPTED) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


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


class _Progress:
    """A tqdm bar on a terminal, else a log line on stderr every LOG_INTERVAL seconds."""

    def __init__(self, total: int, show: bool | None) -> None:
        self.total = total
        self.t0 = time.monotonic()
        self.last_log = self.t0
        self.bar: Any = None
        self.done = 0
        if show is None:
            self.mode = "bar" if sys.stderr.isatty() else "log"
        else:
            self.mode = "bar" if show else "off"
        if self.mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(
                total=total,
                unit="row",
                desc=PREFIX,
                file=sys.stderr,
                leave=True,
                # A terminal of unknown size (a 0x0 pty) would hide the bar.
                **({} if _terminal_columns() else {"ncols": 100, "nrows": 20}),
            )

    def line(self, stats: PipelineStats) -> str:
        elapsed = max(time.monotonic() - self.t0, 1e-9)
        tokens = stats.prompt_tokens + stats.completion_tokens
        return (
            f"{PREFIX}: {stats.rows_done}/{self.total} rows, {stats.cached} cached, "
            f"{stats.rows_failed} failed, {stats.rows_done / elapsed:.0f} rows/s, "
            f"{_human(tokens)} tokens"
        )

    def update(self, stats: PipelineStats) -> None:
        if self.mode == "bar":
            tokens = stats.prompt_tokens + stats.completion_tokens
            self.bar.set_postfix_str(
                f"{stats.cached} cached, {stats.rows_failed} failed, {_human(tokens)} tokens",
                refresh=False,
            )
            self.bar.update(stats.rows_done - self.done)
            self.done = stats.rows_done
        elif self.mode == "log":
            now = time.monotonic()
            if now - self.last_log >= LOG_INTERVAL:
                self.last_log = now
                click.echo(self.line(stats), err=True)

    def close(self, stats: PipelineStats) -> None:
        if self.mode == "bar":
            self.update(stats)
            self.bar.close()
        elif self.mode == "log":
            click.echo(self.line(stats), err=True)


# --------------------------------------------------------------------------------------------
# Dry run table
# --------------------------------------------------------------------------------------------
_SUMMED = (
    "prompts",
    "unique",
    "cached",
    "to_send",
    "unknown",
    "est_prompt_tokens",
    "est_completion_tokens",
)


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


def _plan_table(totals: _Totals, rows: int, opts: _Options) -> str:
    header = [
        "step",
        "model",
        "prompts",
        "unique",
        "cached",
        "to send",
        "unknown",
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
        f"Dry run: {rows:,} rows of {opts.input}, {len(plans)} step(s). "
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
        "the template). Costs are estimates; ? = no price known for the model.",
    ]
    if totals.batches > 1:
        lines.append(
            f"Approximate: the input was read in {totals.batches} batches of up to "
            f"{opts.batch_size:,} rows and the counts are summed per batch, so a prompt repeated "
            "in several batches counts once in each (unique and to send may be overstated)."
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# cache
# --------------------------------------------------------------------------------------------
def _cache_dir_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--cache-dir",
        type=click.Path(file_okay=False, path_type=Path),
        metavar="DIR",
        help="Cache folder. Default: $POLARS_LLM_CACHE_DIR, else ~/.cache/polars-llm.",
    )(f)


def _cache_folder(cache_dir: Path | None) -> Path:
    return (cache_dir or default_cache_dir()).expanduser()


@cli.group()
def cache() -> None:
    """Inspect or empty the on-disk cache of answers.

    \b
    Examples:
      polars-llm cache stats
      polars-llm cache clear --yes --cache-dir /data/llm-cache
    """


@cache.command()
@_cache_dir_option
def stats(cache_dir: Path | None) -> int:
    """Show the cache folder, its number of entries and its size on disk."""
    folder = _cache_folder(cache_dir)
    if not folder.exists():
        click.echo(f"folder:  {folder}\nentries: 0\nsize:    0 B (the folder does not exist)")
        return EXIT_OK
    try:
        store = open_cache(folder)
        entries, size = len(store), store.volume()
    except (ConfigError, OSError) as e:
        _error(f"cannot open the cache {folder}: {e}")
        return EXIT_USAGE
    click.echo(f"folder:  {folder}\nentries: {entries:,}\nsize:    {_bytes(size)}")
    return EXIT_OK


@cache.command()
@_cache_dir_option
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
def clear(cache_dir: Path | None, yes: bool) -> int:
    """Remove every cached answer (the next runs pay for their calls again)."""
    folder = _cache_folder(cache_dir)
    if not folder.exists():
        click.echo(f"removed 0 entries: {folder} does not exist")
        return EXIT_OK
    try:
        store = open_cache(folder)
        entries = len(store)
    except (ConfigError, OSError) as e:
        _error(f"cannot open the cache {folder}: {e}")
        return EXIT_USAGE
    if not yes and entries:
        try:
            sure = click.confirm(
                f"Remove all {entries:,} cached answers in {folder}?", default=False, err=True
            )
        except click.Abort as e:
            if isinstance(e.__context__, KeyboardInterrupt):
                raise
            click.echo(err=True)  # end the prompt's line
            _error("no answer to the confirmation (no terminal?); pass --yes to clear without it")
            return EXIT_USAGE
        if not sure:
            click.echo("nothing removed")
            return EXIT_OK
    removed = store.clear()
    click.echo(f"removed {removed:,} entries from {folder}")
    return EXIT_OK


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


if __name__ == "__main__":
    main()
