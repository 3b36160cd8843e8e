"""The ``polars-llm`` command line: enrich a Parquet file of any size, and manage the cache.

``polars-llm enrich IN OUT --step NAME=TEMPLATE ...`` reads ``IN`` in batches, runs the steps on
each batch with :func:`polars_llm.pipeline` and writes each enriched batch as it goes, so memory
stays bounded whatever the file's size. The output goes to a temporary file next to ``OUT`` that
replaces ``OUT`` atomically once every row is done: a killed run never leaves a partial file. The
cache is the checkpoint: every answer is on disk as soon as it arrives, so rerunning the same
command after a crash sends only what was not answered yet. The run itself is
:mod:`polars_llm.enrich`; this module parses the options and turns errors into exit codes.

Exit codes: 0 success, 1 unexpected error, 2 bad usage or configuration, 3 bad input, 4 too many
failed rows, 5 aborted by the endpoint (bad key, unknown model, unreachable), 75 Batch API jobs
pending (``--batch --no-wait``), 130 interrupted (Ctrl-C), 143 terminated (SIGTERM).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sqlite3
import sys
import threading
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from .batch import BatchPending
from .cache import CacheWarning, ResultCache, open_cache, remove_cache_files
from .enrich import PREFIX, EnrichRun, one_line, say
from .errors import (
    BatchAborted,
    ConfigError,
    InputError,
    PolarsLLMError,
    TooManyFailures,
)
from .local import INSTALL_HINT
from .pipeline import Step, load_pipeline
from .prompt import placeholders
from .settings import Settings, default_cache_dir, get_settings

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INPUT = 3
EXIT_FAILURES = 4
EXIT_ABORTED = 5
EXIT_PENDING = 75  # EX_TEMPFAIL: try again later
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143

DEFAULT_BATCH_SIZE = 50_000

EXIT_CODES_HELP = """\b
Exit codes:
  0    success (rows that failed within --max-failed-rows/--max-failed-rate
       are written with their error in llm_error)
  1    unexpected error (e.g. the disk filled up while writing)
  2    bad usage or configuration: unknown option, malformed --step or
       template, bad pipeline file (not TOML or UTF-8, a value of the wrong
       type), a template naming a later step, --report naming INPUT or
       OUTPUT
  3    bad input: missing file, not Parquet, no rows, a template naming a
       column the input does not have or a list, array, struct or binary
       column, text that is not UTF-8, a step named like an input column,
       output folder missing or not writable
  4    more rows failed than allowed; nothing is written to OUTPUT
  5    aborted by the endpoint: bad API key, unknown model, endpoint
       unreachable; nothing is written to OUTPUT
  75   --batch --no-wait: Batch API jobs are pending; nothing is written
       to OUTPUT; rerun the same command later
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


def _error(message: object) -> None:
    click.echo(f"{PREFIX}: error: {one_line(message)}", err=True)


def _warning_line(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    """Show a warning as one ``polars-llm: warning:`` line, without the source line."""
    click.echo(f"{PREFIX}: warning: {one_line(message)}", err=True)


class _Cli(click.Group):
    """A group whose every expected error is one line on stderr with a documented exit code."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        try:
            with warnings.catch_warnings():
                warnings.showwarning = _warning_line
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
            say("aborted")
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
@click.version_option(package_name="polars-llm-enrich", prog_name=PREFIX)
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
def _parse_step(value: str, option: str = "--step") -> tuple[str, str]:
    name, sep, template = value.partition("=")
    name = name.strip()
    if not sep or not name or not template:
        raise click.BadParameter(
            f"{value!r} is not NAME=TEMPLATE; write e.g. "
            f"{option} sentiment='Sentiment of this review: {{review}}'",
            param_hint=f"'{option}'",
        )
    return name, template


def _steps_callback(
    ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> list[tuple[str, str]]:
    option = param.opts[0] if param.opts else "--step"
    return [_parse_step(v, option) for v in values]


def _labels_callback(
    ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> list[list[str]]:
    sets = [[label.strip() for label in value.split(",") if label.strip()] for value in values]
    for value, labels in zip(values, sets, strict=True):
        if len(labels) < 2:
            raise click.BadParameter(
                f"{value!r} names {len(labels)} label(s); give two or more, comma-separated, "
                "e.g. --labels positive,negative,neutral",
                param_hint="'--labels'",
            )
    return sets


@dataclass
class _StepOptions:
    """The options that make the steps and the settings they run with."""

    steps: list[tuple[str, str]]
    pipeline_file: Path | None
    classify: list[tuple[str, str]]
    labels: list[list[str]]
    extract: list[tuple[str, str]]
    schemas: tuple[Path, ...]
    model: str | None
    system: str | None
    max_tokens: int | None
    temperature: float | None
    base_url: str | None
    api_key: str | None
    concurrency: int | None
    rpm: int | None
    tpm: int | None
    shared_url: str | None
    timeout: float | None
    cache_dir: Path | None
    no_cache: bool
    progress: bool | None
    batch: bool


@cli.command(epilog=ENRICH_EPILOG, context_settings={"max_content_width": 100})
# Plain strings: a Path would turn s3://bucket/key into s3:/bucket/key.
@click.argument("input_path", metavar="INPUT")
@click.argument("output_path", metavar="OUTPUT")
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
    "--classify",
    multiple=True,
    metavar="NAME=TEMPLATE",
    callback=_steps_callback,
    help="A classify step: column NAME, an Enum of the --labels given with it (the n-th --labels "
    "goes with the n-th --classify). Example: --classify sentiment='Sentiment: {review}' "
    "--labels positive,negative,neutral",
)
@click.option(
    "--labels",
    multiple=True,
    metavar="A,B,C",
    callback=_labels_callback,
    help="The labels of a --classify step, comma-separated. Example: --labels yes,no",
)
@click.option(
    "--extract",
    multiple=True,
    metavar="NAME=TEMPLATE",
    callback=_steps_callback,
    help="An extract step: column NAME, a Struct of the JSON schema in the --schema file given "
    "with it (the n-th --schema goes with the n-th --extract). "
    "Example: --extract facts='Facts in: {review}' --schema facts.json",
)
@click.option(
    "--schema",
    "schemas",
    multiple=True,
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="FILE",
    help="A JSON schema file (an object schema) for an --extract step. Example: --schema facts.json",
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
    "--shared-url",
    metavar="URL",
    help="Redis server through which processes on several machines share one rate budget, "
    "in-flight claims and answers (default: $POLARS_LLM_SHARED_URL; else the processes of one "
    "machine share them beside the cache folder). Example: --shared-url redis://redis:6379/0",
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
    "--ray",
    "ray_address",
    is_flag=False,
    flag_value="",
    default=None,
    metavar="[ADDRESS]",
    help="Run on a Ray cluster (needs the ray extra): INPUT and OUTPUT are folders, and each "
    "Parquet file of INPUT gives one file of the same name in OUTPUT. Without ADDRESS, a local "
    "cluster; put --ray last or write --ray=ADDRESS. Example: --ray ray://head:10001",
)
@click.option(
    "--prices",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="FILE",
    help="A JSON file of prices in USD per million tokens, "
    '{"MODEL": {"input": 0.15, "output": 0.6}, ...}, over the built-in table (default: '
    "$POLARS_LLM_PRICES). Example: --prices prices.json",
)
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Show a progress bar (--progress) or nothing (--no-progress). Default: a bar on a "
    "terminal, else a log line on stderr every 10 s.",
)
@click.option(
    "--batch",
    is_flag=True,
    help="Send the calls as OpenAI Batch API jobs: half the price, answered within 24 hours. "
    "Waits for them (progress from the batches' counts), one round per dependent step; a "
    "rerun resumes the same batches. With --dry-run: batch files, lines and batch prices.",
)
@click.option(
    "--no-wait",
    is_flag=True,
    help="With --batch: submit the jobs and exit 75 (pending) without waiting; rerun the same "
    "command later to collect the answers (and submit the next step's) and write OUTPUT.",
)
def enrich(
    input_path: str,
    output_path: str,
    steps: list[tuple[str, str]],
    pipeline_file: Path | None,
    batch_size: int,
    max_failed_rows: int,
    max_failed_rate: float,
    dry_run: bool,
    report: Path | None,
    no_wait: bool,
    ray_address: str | None,
    prices: Path | None,
    **options: Any,
) -> int:
    """Add LLM-written columns to INPUT and write it to OUTPUT.

    INPUT is a Parquet, CSV or NDJSON file (by extension), or a folder or a glob of them (then
    OUTPUT is a folder with one file per input file, hive partitions kept); either may be
    s3://, gs:// or az://.

    INPUT is read in batches of --batch-size rows; each batch is enriched and written as it
    goes, so files of any size fit in memory. Identical prompts are sent once, and every answer
    is cached as it arrives: if the run is killed, rerun the same command and it continues where
    it stopped without paying twice. OUTPUT appears, atomically, only when every row is done.
    """
    if not (steps or options["classify"] or options["extract"]) and pipeline_file is None:
        raise click.UsageError(
            "no steps: give --step NAME=TEMPLATE (repeatable), --classify, --extract "
            "or --pipeline FILE"
        )
    if no_wait and not options["batch"]:
        raise click.UsageError("--no-wait goes with --batch (the Batch API)")
    for typed, given, n_typed, n_given in (
        ("--classify", "--labels", len(options["classify"]), len(options["labels"])),
        ("--extract", "--schema", len(options["extract"]), len(options["schemas"])),
    ):
        if n_typed != n_given:
            raise click.UsageError(
                f"each {typed} needs one {given}, in the same order: got {n_typed} {typed} "
                f"and {n_given} {given}"
            )
    if ray_address is not None:
        if options["batch"]:
            raise click.UsageError("--batch (the Batch API) does not run with --ray; drop one")
        return _run_enrich(
            _ray_run(
                Path(input_path),  # with --ray, local folders only
                Path(output_path),
                ray_address,
                batch_size,
                max_failed_rows,
                max_failed_rate,
                dry_run,
                report,
                None if prices is None else str(prices),
            ),
            _StepOptions(steps=steps, pipeline_file=pipeline_file, **options),
        )
    run = EnrichRun(
        input=input_path,
        output=output_path,
        batch_size=batch_size,
        max_failed_rows=max_failed_rows,
        max_failed_rate=max_failed_rate,
        dry_run=dry_run,
        report=report,
        progress=options["progress"],
        wait=not no_wait,
        prices=None if prices is None else str(prices),
    )
    return _run_enrich(run, _StepOptions(steps=steps, pipeline_file=pipeline_file, **options))


def _ray_run(
    input_path: Path,
    output_path: Path,
    address: str,
    batch_size: int,
    max_failed_rows: int,
    max_failed_rate: float,
    dry_run: bool,
    report: Path | None,
    prices: str | None,
) -> Any:
    """The run of ``enrich --ray`` (polars_llm.ray.RayRun).

    A dry run sends nothing, so it needs no cluster: the plan of the input folder is made here,
    from this machine's cache folder, as without --ray.
    """
    options: dict[str, Any] = {
        "batch_size": batch_size,
        "max_failed_rows": max_failed_rows,
        "max_failed_rate": max_failed_rate,
        "dry_run": dry_run,
        "report": report,
        "progress": None,
        "prices": prices,
    }
    if dry_run:
        return EnrichRun(input=str(input_path), output=str(output_path), **options)
    try:
        from .ray import RayRun
    except ConfigError as e:  # Ray is not installed
        raise click.UsageError(str(e)) from e
    return RayRun(input=input_path, output=output_path, address=address or None, **options)


def _run_enrich(run: EnrichRun, opts: _StepOptions) -> int:
    """Run, report, and turn what went wrong into one line on stderr and an exit code."""
    error: str | None = None
    try:
        with _signals_as_interrupts():
            run.run(*_steps_and_settings(opts))
        code = EXIT_OK
    except _Interrupted as e:
        if run.committed:
            # The signal came after the output was moved into place: the run succeeded.
            code = EXIT_OK
        else:
            code = e.code
            what = "interrupted" if code == EXIT_INTERRUPTED else "terminated"
            error = f"{what}; {run.not_written()}"
            say(f"{error}. Rerun the same command to resume: {run.rerun_hint()}.")
    except click.UsageError:
        raise
    except BatchPending as e:
        code, error = EXIT_PENDING, str(e)
        ids = ", ".join(e.batch_ids)
        say(
            f"pending; rerun the same command later (batches: {ids}). Nothing was written to "
            f"{run.output}"
        )
    except Exception as e:
        code, error = failure(e, run.output, run)
        if code == EXIT_ERROR and not isinstance(e, (PolarsLLMError, OSError)):
            traceback.print_exc()
        _error(error)
    if run.report is not None and run.started:
        try:
            run.write_report(code, error)
        except OSError as e:
            _error(f"could not write the report {run.report}: {e.strerror or e}")
    return code


def failure(e: Exception, output: str | os.PathLike[str], run: Any = None) -> tuple[int, str]:
    """The exit code of an error that ``EnrichRun.run`` raised, and the one-line reason to give.

    The Airflow operator raises with the same reason and maps the code to a task outcome.
    ``run`` (an EnrichRun), when given, says what a stopped run left and what a rerun does.
    """
    left = run.not_written() if run is not None else f"nothing was written to {output}"
    if isinstance(e, InputError):
        return EXIT_INPUT, str(e)
    if isinstance(e, ConfigError):  # TemplateError included
        return EXIT_USAGE, str(e)
    if isinstance(e, TooManyFailures):
        return EXIT_FAILURES, str(e)
    if isinstance(e, BatchAborted):
        return EXIT_ABORTED, _aborted_message(e, left, run)
    if isinstance(e, PolarsLLMError):
        return EXIT_ERROR, str(e)
    if isinstance(e, ImportError):
        return EXIT_USAGE, (
            f"{e}. With no endpoint configured polars-llm runs the embedded model: {INSTALL_HINT}; "
            "or give --base-url/--api-key "
            "($OPENAI_BASE_URL/$OPENAI_API_KEY)"
        )
    if isinstance(e, OSError):
        where = e.filename or output
        return EXIT_ERROR, f"{e.strerror or e} ({where}); {left}"
    return EXIT_ERROR, f"unexpected {type(e).__name__}: {e}; {left}"


def _steps_and_settings(opts: _StepOptions) -> tuple[list[Step], Settings]:
    """The steps of the --pipeline file then of --step, and the settings they run with."""
    steps: list[Step] = []
    file_settings: dict[str, Any] = {}
    if opts.pipeline_file is not None:
        steps, file_settings = load_pipeline(opts.pipeline_file)
    params = {
        k: v
        for k, v in (("max_tokens", opts.max_tokens), ("temperature", opts.temperature))
        if v is not None
    }
    typed = [
        [Step(name=n, template=t, system=opts.system, params=params) for n, t in opts.steps],
        [
            Step(name=n, template=t, system=opts.system, params=params, labels=labels)
            for (n, t), labels in zip(opts.classify, opts.labels, strict=True)
        ],
        [
            Step(name=n, template=t, system=opts.system, params=params, schema=_schema(path))
            for (n, t), path in zip(opts.extract, opts.schemas, strict=True)
        ],
    ]
    steps.extend(_in_dependency_order(typed, [s.name for s in steps]))
    names = [s.name for s in steps]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"more than one step is named {', '.join(dupes)}; rename one")
    settings = get_settings()
    try:
        settings = settings.replace(**file_settings)
    except TypeError as e:
        raise ConfigError(f"[settings] of {opts.pipeline_file}: {e}") from e
    given = dict(
        model=opts.model,
        base_url=opts.base_url,
        api_key=opts.api_key,
        concurrency=opts.concurrency,
        rpm=opts.rpm,
        tpm=opts.tpm,
        shared_url=opts.shared_url,
        timeout=opts.timeout,
        cache_dir=opts.cache_dir,
        cache=False if opts.no_cache else None,
        progress=opts.progress,
        batch=True if opts.batch else None,
    )
    settings = settings.replace(**{k: v for k, v in given.items() if v is not None})
    return steps, settings


def _schema(path: Path) -> dict[str, Any]:
    """The JSON schema of an --extract step, from its --schema file."""
    try:
        schema = json.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read the --schema file {path}: {e.strerror or e}") from e
    except json.JSONDecodeError as e:
        raise ConfigError(f"the --schema file {path} is not valid JSON: {e}") from e
    if not isinstance(schema, dict):
        raise ConfigError(
            f"the --schema file {path} holds a {type(schema).__name__}, not a JSON schema object"
        )
    return schema


def _in_dependency_order(lists: list[list[Step]], before: list[str]) -> list[Step]:
    """The --step, --classify and --extract steps merged, each list in its own order.

    click does not say how options of different names interleave on the command line, so a
    step goes as soon as the steps its template names (among these) are placed. A template that
    names a step that cannot come first is left in place for check_steps to report.
    """
    queues = [list(steps) for steps in lists]
    names = {s.name for q in queues for s in q}
    placed = set(before)
    merged: list[Step] = []
    while any(queues):
        ready = next(
            (q for q in queues if q and set(placeholders(q[0].template)) & names <= placed),
            None,
        )
        if ready is None:  # a cycle or a reference to a later step: keep the given order
            merged.extend(s for q in queues for s in q)
            break
        step = ready.pop(0)
        merged.append(step)
        placed.add(step.name)
    return merged


def _aborted_message(e: BatchAborted, left: str, run: Any) -> str:
    # The engine's message already says what to check.
    rerun = run.rerun_hint() if run is not None else "a rerun reuses the cached answers"
    return f"aborted: {e} {left[:1].upper()}{left[1:]}; {rerun}"


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


CACHE_EXIT_CODES_HELP = """\b
Exit codes:
  0    success
  1    unexpected error (e.g. the disk filled up while importing)
  2    bad usage, or a cache that cannot be used: damaged (clear removes
       it), or in a read-only folder
  3    bad FILE: missing, not Parquet, a row whose key is not 64 hex digits
       or whose value is not a JSON object (nothing is imported), or a
       folder FILE cannot be written in"""


@cli.group(epilog=CACHE_EXIT_CODES_HELP)
def cache() -> None:
    """Inspect, empty, export or import the on-disk cache of answers.

    \b
    Examples:
      polars-llm cache stats
      polars-llm cache clear --yes --cache-dir /data/llm-cache
      polars-llm cache export answers.parquet     # on one machine
      polars-llm cache import answers.parquet     # on another
    """


def _open_store(folder: Path, *, damaged_ok: bool = False) -> ResultCache | None:
    """The cache in ``folder``; None, with its one error line, when it cannot be used (with
    ``damaged_ok``, a damaged cache is returned: clearing is its remedy)."""
    try:
        with warnings.catch_warnings():
            # The command says what is wrong itself, in one line.
            warnings.simplefilter("ignore", CacheWarning)
            store = open_cache(folder)
    except (ConfigError, OSError) as e:
        _error(f"cannot open the cache {folder}: {e}")
        return None
    if store.problem is not None and not (damaged_ok and store.damaged):
        _error(store.problem)
        return None
    return store


@cache.command()
@_cache_dir_option
def stats(cache_dir: Path | None) -> int:
    """Show the cache folder, its number of entries and its size on disk."""
    folder = _cache_folder(cache_dir)
    if not folder.exists():
        click.echo(f"folder:  {folder}\nentries: 0\nsize:    0 B (the folder does not exist)")
        return EXIT_OK
    store = _open_store(folder)
    if store is None:
        return EXIT_USAGE
    try:
        entries, size = len(store), store.volume()
    except sqlite3.Error as e:
        _error(f"cannot read the cache {folder} ({e}); 'polars-llm cache clear' removes it")
        return EXIT_USAGE
    click.echo(f"folder:  {folder}\nentries: {entries:,}\nsize:    {_bytes(size)}")
    return EXIT_OK


@cache.command()
@_cache_dir_option
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
def clear(cache_dir: Path | None, yes: bool) -> int:
    """Remove every cached answer (the next runs pay for their calls again).

    A damaged cache is removed whole, which lets the next run start afresh.
    """
    folder = _cache_folder(cache_dir)
    if not folder.exists():
        click.echo(f"removed 0 entries: {folder} does not exist")
        return EXIT_OK
    store = _open_store(folder, damaged_ok=True)
    if store is None:
        return EXIT_USAGE
    entries = len(store)
    if not yes and (entries or store.damaged):
        question = (
            f"The cache in {folder} is damaged. Remove it?"
            if store.damaged
            else f"Remove all {entries:,} cached answers in {folder}?"
        )
        try:
            sure = click.confirm(question, default=False, err=True)
        except click.Abort as e:
            if isinstance(e.__context__, KeyboardInterrupt):
                raise
            click.echo(err=True)  # end the prompt's line
            _error("no answer to the confirmation (no terminal?); pass --yes to clear without it")
            return EXIT_USAGE
        if not sure:
            click.echo("nothing removed")
            return EXIT_OK
    if store.damaged:
        try:
            remove_cache_files(folder)
        except OSError as e:
            _error(f"cannot remove the damaged cache in {folder}: {e.strerror or e}")
            return EXIT_USAGE
        click.echo(f"removed the damaged cache in {folder}")
        return EXIT_OK
    removed = store.clear()
    click.echo(f"removed {removed:,} entries from {folder}")
    return EXIT_OK


@cache.command(name="export")
@click.argument("file", metavar="FILE.parquet", type=click.Path(dir_okay=False, path_type=Path))
@_cache_dir_option
def export_(file: Path, cache_dir: Path | None) -> int:
    """Write every cached answer to FILE.parquet (columns key and value, JSON text).

    FILE appears atomically, once complete. Merge it into another machine's cache with
    'polars-llm cache import FILE.parquet'.
    """
    folder = _cache_folder(cache_dir)
    store = _open_store(folder)
    if store is None:
        return EXIT_USAGE
    try:
        written = store.export_parquet(file)
    except OSError as e:
        _error(
            f"cannot write {file}: {e.strerror or e}; check that its folder exists and is writable"
        )
        return EXIT_INPUT
    click.echo(f"exported {written:,} entries from {folder} to {file}")
    return EXIT_OK


@cache.command(name="import")
@click.argument("file", metavar="FILE.parquet", type=click.Path(dir_okay=False, path_type=Path))
@_cache_dir_option
def import_(file: Path, cache_dir: Path | None) -> int:
    """Add the answers of FILE.parquet (made by 'cache export') to the cache.

    Every row is checked first; a bad file is refused whole, and nothing is imported. Answers
    already in the cache are kept as they are.
    """
    folder = _cache_folder(cache_dir)
    store = _open_store(folder)
    if store is None:
        return EXIT_USAGE
    try:
        added, kept = store.import_parquet(file)
    except InputError as e:
        _error(e)
        return EXIT_INPUT
    click.echo(f"imported {added:,} new entries into {folder}; kept {kept:,} already there")
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# batch
# --------------------------------------------------------------------------------------------
@cli.group(name="batch")
def batch_group() -> None:
    """List, check or cancel the Batch API jobs submitted from a cache folder (enrich --batch).

    \b
    Examples:
      polars-llm batch list
      polars-llm batch status --json
      polars-llm batch cancel              # every running batch of the cache folder
      polars-llm batch cancel batch_abc123
    """


def _endpoint_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("--api-key", metavar="KEY", help="API key. Default: $OPENAI_API_KEY.")(f)
    f = click.option(
        "--base-url",
        metavar="URL",
        help="The endpoint the batches went to. Default: $OPENAI_BASE_URL, else OpenAI.",
    )(f)
    return f


def _json_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")(f)


def _batch_settings(cache_dir: Path | None, base_url: str | None, api_key: str | None) -> Settings:
    return get_settings().replace(
        cache_dir=_cache_folder(cache_dir), base_url=base_url, api_key=api_key, cache=True
    )


def _show_batches(entries: Sequence[Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps([dataclasses.asdict(e) for e in entries], indent=2))
        return
    if not entries:
        click.echo("no batches in this cache folder")
        return
    header = ["batch", "status", "model", "lines", "done", "failed", "round", "collected"]
    rows = [
        [
            e.batch_id or f"(upload {e.input_file_id})",
            e.status,
            e.model,
            f"{e.lines:,}",
            f"{e.completed:,}",
            f"{e.failed:,}",
            str(e.round),
            "yes" if e.collected else "no",
        ]
        for e in entries
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    errors = [e for e in entries if e.error]
    for e in errors:
        click.echo(f"{e.batch_id}: {e.error}")


def _batch_command(action: Callable[[], int]) -> int:
    try:
        return action()
    except ConfigError as e:
        _error(e)
        return EXIT_USAGE
    except BatchAborted as e:
        _error(e)
        return EXIT_ABORTED


@batch_group.command(name="list")
@_cache_dir_option
@_json_option
def batch_list(cache_dir: Path | None, as_json: bool) -> int:
    """The batches of the cache folder's ledger, as last seen (no call is made)."""
    from . import batch

    def action() -> int:
        _show_batches(batch.list_batches(_cache_folder(cache_dir)), as_json)
        return EXIT_OK

    return _batch_command(action)


@batch_group.command(name="status")
@_cache_dir_option
@_endpoint_options
@_json_option
def batch_status(
    cache_dir: Path | None, base_url: str | None, api_key: str | None, as_json: bool
) -> int:
    """Ask the endpoint how the running batches of the cache folder are doing, and show all."""
    from . import batch

    def action() -> int:
        _show_batches(batch.refresh(_batch_settings(cache_dir, base_url, api_key)), as_json)
        return EXIT_OK

    return _batch_command(action)


@batch_group.command(name="cancel")
@click.argument("batch_ids", nargs=-1, metavar="[BATCH_ID]...")
@_cache_dir_option
@_endpoint_options
@_json_option
def batch_cancel(
    batch_ids: tuple[str, ...],
    cache_dir: Path | None,
    base_url: str | None,
    api_key: str | None,
    as_json: bool,
) -> int:
    """Cancel the given batches, or every running batch of the cache folder.

    Lines a batch finished before it stopped are kept: the next run collects them into the
    cache and submits only the rest.
    """
    from . import batch

    def action() -> int:
        ids = batch.cancel(_batch_settings(cache_dir, base_url, api_key), batch_ids)
        if as_json:
            click.echo(json.dumps({"cancelled": ids}))
        elif ids:
            click.echo(f"cancelling {len(ids)} batch(es): {', '.join(ids)}")
        else:
            click.echo("no running batch to cancel")
        return EXIT_OK

    return _batch_command(action)


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


if __name__ == "__main__":
    main()
