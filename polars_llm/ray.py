"""The same steps on Ray Data: past one machine, with one budget and one set of claims.

``enrich(ds, steps)`` runs the steps of ``pipeline`` (or of a pipeline file) over a
``ray.data.Dataset``. It is ``ds.map_batches`` with a callable class, so each Ray worker holds one
engine (one event loop, clients, limiters, cache) for all the batches it is given; Arrow batches
become Polars frames without a copy.

Every worker of the cluster shares one rate budget, one 429 cooldown, one set of in-flight claims
and a tier of answers with no extra service: a named Ray actor, :class:`ClusterState`, holds them
and workers reach it through :class:`RayState`, a home of :class:`polars_llm.shared.SharedState`.
A call to an actor costs about a millisecond, so the budget is handed out in chunks of time (the
limiter spaces its own requests inside them) and the calls a worker makes while one is on its way
go together in the next. With ``shared_url`` set, Redis plays that part instead.

Settings are resolved on the driver, where the environment has the endpoint and the key, and
shipped to the workers. The key travels inside an object that no repr, log line, task name or
dashboard page shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

try:
    import ray
    import ray.data
    from ray.exceptions import RayError
except ImportError as e:  # pragma: no cover - the extra is installed in CI
    from .errors import ConfigError

    raise ConfigError(
        "polars_llm.ray needs Ray Data: pip install -e '.[ray]' in the polars-llm clone"
    ) from e

from .enrich import EnrichRun
from .errors import ConfigError, InputError, PolarsLLMError, TooManyFailures
from .pipeline import ERROR_COLUMN, PipelineStats, Step, check_steps, load_pipeline, pipeline
from .prompt import placeholders
from .settings import Settings, get_settings
from .shared import Meeting, SharedStateError, stated_limits, use_home

# The actor that holds the cluster's shared state: one per cluster, found by name.
ACTOR_NAME = "polars-llm-shared"
ACTOR_NAMESPACE = "polars-llm"
# Answers the actor keeps for other workers, at most (the oldest go first): a bound on its memory.
MAX_ANSWER_BYTES = 256 * 1024 * 1024
# Rows a worker enriches at a time: enough for the engine to keep its concurrency busy.
DEFAULT_BATCH_SIZE = 1024
# Ray CPUs each worker asks for: it waits on the network, it does not compute.
WORKER_CPUS = 0.25
# Seconds the driver waits for the workers' numbers once the job is over.
TALLY_WAIT = 30.0


class RayJobError(PolarsLLMError):
    """The Ray job failed, or the cluster's shared state (its actor) cannot be reached."""


# --------------------------------------------------------------------------------------------
# The cluster's shared state
# --------------------------------------------------------------------------------------------
class ClusterState:
    """Budget timelines, cooldowns, claims and answers of every worker of a Ray cluster.

    Runs as one named actor. Its methods are plain and quick: the actor runs them one at a time,
    so every check-and-take is atomic, and times are this actor's monotonic clock, returned as
    durations, so workers whose clocks disagree still share one timeline.
    """

    def __init__(self, max_answer_bytes: int = MAX_ANSWER_BYTES) -> None:
        self._tat: dict[str, float] = {}
        self._claims: dict[str, tuple[str, float]] = {}  # key -> (owner, expiry)
        self._learned: dict[str, tuple[int | None, int | None]] = {}  # stated rpm, tpm
        self._answers: OrderedDict[str, str] = OrderedDict()
        self._answer_bytes = 0
        self._max_answer_bytes = max_answer_bytes
        self._applied = 0

    def apply(self, owner: str, ops: list[tuple[Any, ...]]) -> list[Any]:
        """Run a worker's operations in order; one result per operation."""
        now = time.monotonic()
        self._applied += 1
        if self._applied % 1000 == 0:  # expired claims would pile up otherwise
            self._claims = {k: v for k, v in self._claims.items() if v[1] > now}
        return [getattr(self, f"_{op[0]}")(owner, now, *op[1:]) for op in ops]

    def _reserve(self, owner: str, now: float, scope: str, seconds: float) -> float:
        start = max(self._tat.get(scope, now), now)
        if seconds > 0:
            self._tat[scope] = start + seconds
        return start - now

    def _pause(self, owner: str, now: float, scope: str, seconds: float) -> None:
        self._tat[scope] = max(self._tat.get(scope, now), now + seconds)

    def _claim(self, owner: str, now: float, key: str, ttl: float) -> bool:
        held = self._claims.get(key)
        if held is not None and held[0] != owner and held[1] > now:
            return False
        self._claims[key] = (owner, now + ttl)
        return True

    def _release(self, owner: str, now: float, key: str) -> None:
        held = self._claims.get(key)
        if held is not None and held[0] == owner:
            del self._claims[key]

    def _limits(self, owner: str, now: float, scope: str) -> tuple[int | None, int | None]:
        return self._learned.get(scope, (None, None))

    def _learn(self, owner: str, now: float, scope: str, rpm: int | None, tpm: int | None) -> None:
        self._learned[scope] = stated_limits(self._learned.get(scope), rpm, tpm)

    def _claim_many(self, owner: str, now: float, keys: Sequence[str], ttl: float) -> list[bool]:
        return [self._claim(owner, now, key, ttl) for key in keys]

    def _release_many(self, owner: str, now: float, keys: Sequence[str]) -> None:
        for key in keys:
            self._release(owner, now, key)

    def _get(self, owner: str, now: float, keys: Sequence[str]) -> list[str | None]:
        return [self._answers.get(k) for k in keys]

    def _put(self, owner: str, now: float, key: str, value: str) -> None:
        old = self._answers.pop(key, None)
        if old is not None:
            self._answer_bytes -= len(old)
        self._answers[key] = value
        self._answer_bytes += len(value)
        while self._answer_bytes > self._max_answer_bytes and self._answers:
            _, dropped = self._answers.popitem(last=False)
            self._answer_bytes -= len(dropped)

    def counts(self) -> dict[str, int]:
        """How much the actor holds, for tests and for a look from ``ray.get_actor``."""
        now = time.monotonic()
        return {
            "scopes": len(self._tat),
            "claims": sum(1 for _, expiry in self._claims.values() if expiry > now),
            "answers": len(self._answers),
            "answer_bytes": self._answer_bytes,
            "calls": self._applied,
        }


def cluster_state() -> Any:
    """The handle of the cluster's ``ClusterState`` actor, started on first use.

    The actor is detached: jobs that run at once, or one after the other (a rerun), share one
    budget and find the answers of the others. ``ray.kill`` it to free its memory.
    """
    actor = ray.remote(num_cpus=0)(ClusterState)
    return actor.options(
        name=ACTOR_NAME,
        namespace=ACTOR_NAMESPACE,
        get_if_exists=True,
        lifetime="detached",
    ).remote()


class RayState:
    """A worker's end of ``ClusterState``: the ``SharedState`` interface over actor calls.

    Calls made while one is on its way to the actor wait and go together in the next, so a
    worker makes at most one actor call at a time however many requests it has in flight.
    """

    holds_answers = True

    def __init__(self, actor: Any) -> None:
        self._actor = actor
        self._owner = f"{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self._pending: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self._sender: asyncio.Task[None] | None = None

    async def _call(self, *op: Any) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((op, future))
        if self._sender is None or self._sender.done():
            self._sender = asyncio.ensure_future(self._send())
        return await future

    async def _send(self) -> None:
        await asyncio.sleep(0)  # the calls of this turn of the loop go in one message
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                results = await self._actor.apply.remote(self._owner, [op for op, _ in batch])
            except RayError as e:
                error = SharedStateError(
                    f"cannot reach the shared state actor {ACTOR_NAME!r} of the Ray cluster: "
                    f"{type(e).__name__}. Rerun the job; answers so far are cached."
                )
                error.__cause__ = e
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)

    async def reserve(self, scope: str, seconds: float) -> float:
        return float(await self._call("reserve", scope, seconds))

    async def pause(self, scope: str, seconds: float) -> None:
        await self._call("pause", scope, seconds)

    async def claim(self, key: str, ttl: float) -> bool:
        return bool(await self._call("claim", key, ttl))

    async def release(self, key: str) -> None:
        await self._call("release", key)

    async def claim_many(self, keys: Sequence[str], ttl: float) -> list[bool]:
        return [bool(r) for r in await self._call("claim_many", list(keys), ttl)]

    async def release_many(self, keys: Sequence[str]) -> None:
        await self._call("release_many", list(keys))

    async def meet(self, scope: str) -> Meeting:
        rpm, tpm = await self._call("limits", scope)
        return Meeting(True, rpm, tpm)  # a cluster's workers share its budget

    async def learn(self, scope: str, rpm: int | None, tpm: int | None) -> None:
        await self._call("learn", scope, rpm, tpm)

    async def get_answers(self, keys: Sequence[str]) -> list[str | None]:
        if not keys:
            return []
        return list(await self._call("get", list(keys)))

    async def put_answer(self, key: str, value: str) -> None:
        await self._call("put", key, value)

    async def aclose(self) -> None:
        if self._sender is not None and not self._sender.done():
            await self._sender


# --------------------------------------------------------------------------------------------
# Settings, resolved on the driver
# --------------------------------------------------------------------------------------------
class _Secret:
    """The API key and shared URL on their way to the workers: shown nowhere."""

    __slots__ = ("api_key", "shared_url")

    def __init__(self, api_key: str | None, shared_url: str | None) -> None:
        self.api_key = api_key
        self.shared_url = shared_url

    def __repr__(self) -> str:
        return "<polars-llm credentials, hidden>"

    def __getstate__(self) -> tuple[str | None, str | None]:
        return self.api_key, self.shared_url

    def __setstate__(self, state: tuple[str | None, str | None]) -> None:
        self.api_key, self.shared_url = state


def resolve(
    steps: Sequence[Step] | str | Path,
    settings: Settings | None = None,
    **options: Any,
) -> tuple[list[Step], Settings]:
    """The steps and the settings the workers run with, resolved here on the driver.

    A pipeline file's ``[settings]`` apply over ``settings`` (default: the process-wide ones),
    and ``options`` (any ``Settings`` field) over both. The endpoint, key, cache folder and
    shared URL are read from this process's environment, so workers need none of it.
    """
    file_settings: dict[str, Any] = {}
    if isinstance(steps, (str, Path)):
        step_list, file_settings = load_pipeline(steps)
    else:
        step_list = list(steps)
        for step in step_list:
            if not isinstance(step, Step):
                raise ConfigError(
                    f"steps must be Step objects or a pipeline file path, got {type(step).__name__}"
                )
    base = settings if settings is not None else get_settings()
    try:
        base = base.replace(**file_settings).replace(**options)
    except TypeError as e:
        raise ConfigError(f"bad setting: {e}") from e
    endpoint = base.endpoint()
    cache_dir = base.cache_path()
    resolved = dataclasses.replace(
        base,
        base_url=None if endpoint.local else endpoint.base_url,
        api_key=None if endpoint.local else endpoint.api_key,
        cache=cache_dir is not None,
        cache_dir=str(cache_dir) if cache_dir is not None else None,
        shared_url=base.shared_url or os.environ.get("POLARS_LLM_SHARED_URL") or None,
        on_error="null",
        progress=False,
    )
    return step_list, resolved


# --------------------------------------------------------------------------------------------
# The workers
# --------------------------------------------------------------------------------------------
class RunTally:
    """What the workers of one job counted, added up for the driver (a Ray actor per job)."""

    def __init__(self) -> None:
        self.stats = PipelineStats()

    def add(self, part: PipelineStats) -> None:
        self.stats.add(part)

    def total(self) -> PipelineStats:
        return self.stats


class _Enrich:
    """One Ray worker: an engine for every batch it is given (``map_batches`` callable class)."""

    def __init__(
        self,
        steps: list[Step],
        settings: Settings,
        secret: _Secret,
        state: Any | None,
        tally: Any | None = None,
    ) -> None:
        self.steps = steps
        self.settings = dataclasses.replace(
            settings, api_key=secret.api_key, shared_url=secret.shared_url
        )
        self.needed = sorted({n for s in steps for n in placeholders(s.template)})
        self.names = [s.name for s in steps]
        self.tally = tally  # a RunTally's handle: each batch's numbers go there
        if state is not None:
            # Every call of this worker shares the cluster's budget, claims and answers.
            use_home(RayState(state))

    def __call__(self, table: pa.Table) -> pa.Table:
        columns = [c for c in self.needed if c in table.column_names]
        df = (
            pl.from_arrow(table.select(columns)) if columns else pl.DataFrame(height=table.num_rows)
        )
        assert isinstance(df, pl.DataFrame)
        stats = PipelineStats()
        try:
            enriched = pipeline(
                df,
                self.steps,
                settings=self.settings,
                on_error="null",
                progress=lambda _: None,
                stats=stats,
            )
        finally:
            if self.tally is not None:
                # Counted before the batch is handed on (the driver, once it has every batch,
                # has every batch's numbers), and the calls of a batch that failed too. A lost
                # tally costs the numbers, not the job.
                with contextlib.suppress(RayError):
                    ray.get(self.tally.add.remote(stats))
        added = enriched.select([*self.names, ERROR_COLUMN]).to_arrow()
        for field, column in zip(added.schema, added.columns, strict=True):
            table = table.append_column(field, column)
        return table


def enrich(
    ds: ray.data.Dataset,
    steps: Sequence[Step] | str | Path,
    settings: Settings | None = None,
    *,
    workers: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    **options: Any,
) -> ray.data.Dataset:
    """Run the steps over a Ray Dataset: one column per step, and ``llm_error``.

    The same steps as :func:`polars_llm.pipeline` and ``polars-llm enrich``: ``Step`` objects or
    the path of a pipeline file. ``options`` are ``Settings`` fields (``model=``, ``rpm=``, ...)
    applied over ``settings`` and the file's ``[settings]``. ``workers`` is how many Ray actors
    run the engine (default: as many as Ray sees fit) and ``batch_size`` the rows each is given
    at a time.

    Errors stay per row: a row whose call failed gets nulls and its reason in ``llm_error``, and
    the job goes on. A bad key, an unknown model or an unreachable endpoint stops the job
    (``BatchAborted``, raised where the dataset is consumed).

    The dataset is lazy, as every Ray Dataset: nothing is sent until it is consumed
    (``write_parquet``, ``iter_batches``, ``take_all``, ...).

    Examples
    --------
    >>> import ray, polars_llm.ray
    >>> ds = ray.data.from_items([{"review": "great tea"}])  # doctest: +SKIP
    >>> out = polars_llm.ray.enrich(ds, [Step("mood", "Mood of: {review}")])  # doctest: +SKIP
    """
    return _enrich(ds, steps, settings, workers, batch_size, None, options)


def _enrich(
    ds: ray.data.Dataset,
    steps: Sequence[Step] | str | Path,
    settings: Settings | None,
    workers: int | None,
    batch_size: int,
    tally: Any | None,
    options: dict[str, Any],
) -> ray.data.Dataset:
    """``enrich``, whose workers add their numbers to the ``RunTally`` actor ``tally``."""
    if workers is not None and workers < 1:
        raise ConfigError(f"workers must be at least 1, got {workers}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    step_list, resolved = resolve(steps, settings, **options)
    columns = list(ds.schema().names)
    if ERROR_COLUMN in columns:
        raise ConfigError(
            f"the dataset already has an {ERROR_COLUMN!r} column (is it the output of an "
            "earlier run?); drop it first"
        )
    check_steps(step_list, columns)
    secret = _Secret(resolved.api_key, resolved.shared_url)
    public = dataclasses.replace(resolved, api_key=None, shared_url=None)
    # With a shared URL, Redis holds the shared state; else the cluster's own actor does.
    state = cluster_state() if resolved.shared_url is None else None
    return ds.map_batches(
        _Enrich,
        compute=ray.data.ActorPoolStrategy(size=workers)
        if workers is not None
        else ray.data.ActorPoolStrategy(min_size=1),
        fn_constructor_kwargs={
            "steps": step_list,
            "settings": public,
            "secret": secret,
            "state": state,
            "tally": tally,
        },
        batch_format="pyarrow",
        batch_size=batch_size,
        num_cpus=WORKER_CPUS,
    )


# --------------------------------------------------------------------------------------------
# The CLI's run: a folder of Parquet files in, one output file per input file
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class RayRun(EnrichRun):
    """``polars-llm enrich IN_DIR OUT_DIR --ray [ADDRESS]``: the CLI's run, on a Ray cluster.

    Every Parquet file of ``input`` is enriched by the cluster as one dataset, and the driver
    writes one file of the same name in ``output`` for each, atomically (temporary file, then
    rename). The outputs are moved into place together once every row is done and the failures
    are within the allowed share: a run that fails or is killed leaves no output file. A rerun
    resumes from the caches: the workers' own, and the answers the cluster's actor still holds.

    The workers add up what they did (answers, cache hits, calls, tokens, per step) in a
    ``RunTally`` actor of the job's own; the driver prints the run's numbers from it and writes
    ``--report`` as :class:`polars_llm.enrich.EnrichRun` does.
    """

    address: str | None = None

    def not_written(self) -> str:
        """What a stopped run left at the output: nothing (the outputs move together)."""
        return f"nothing was written to {self.output}"

    def run(self, steps: list[Step], settings: Settings) -> None:
        """Check the folders and the steps, then enrich every file and write the outputs."""
        from .enrich import _check_against_input, _check_folder, _check_report_path
        from .files import InputFile, Reader, location
        from .prices import load_prices

        self.steps, self.settings = steps, settings
        self.caching = settings.cache_path() is not None
        self.price_table = load_prices(self.prices)
        if self.report is not None:
            _check_report_path(self.report, self.input, self.output)
        input_dir, output_dir = Path(self.input), Path(self.output)
        files = self._input_files()
        # Reader says in one line what is wrong with a file; then its schema is readable.
        rows = [Reader(InputFile(location(f), f.name)).rows for f in files]
        schemas = [pq.read_schema(f) for f in files]
        for path, schema in zip(files[1:], schemas[1:], strict=True):
            if not schema.equals(schemas[0]):
                raise InputError(
                    f"{path} does not have the columns and types of {files[0]}; the files of "
                    f"{input_dir} must share one schema"
                )
        _check_against_input(steps, schemas[0].names, files[0])
        if not output_dir.is_dir():
            raise InputError(f"the output folder {output_dir} does not exist; create it first")
        if output_dir.resolve() == input_dir.resolve():
            raise InputError("the output folder is the input folder; give another output folder")
        _check_folder(location(output_dir / files[0].name), "output")
        if self.report is not None:
            _check_folder(location(self.report), "--report file")
        self.files, self.total_rows = len(files), sum(rows)
        self.started = True
        _connect(self.address)
        # Ray Data logs a failed job's traceback on stderr; the CLI says it in one line.
        logging.getLogger("ray.data").setLevel(logging.CRITICAL)
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # the driver splits the rows back by file
        ctx.enable_progress_bars = False
        ctx.raise_original_map_exception = True  # our errors, not Ray's UserCodeException
        ds = ray.data.read_parquet([str(f.resolve()) for f in files])
        tally: Any = ray.remote(num_cpus=0)(RunTally).remote()
        counted: PipelineStats | None = None
        try:
            out = _enrich(
                ds, steps, settings, None, min(self.batch_size, DEFAULT_BATCH_SIZE), tally, {}
            )
            try:
                self._write(out, files, rows)
            finally:
                # What the workers counted, for the numbers and the report, even of a failed
                # run; never in place of the run's own error.
                with contextlib.suppress(Exception):
                    counted = ray.get(tally.total.remote(), timeout=TALLY_WAIT)
        finally:
            with contextlib.suppress(Exception):
                ray.kill(tally)
            if counted is not None:
                self.stats = counted
        from .enrich import say

        if counted is None:
            say("the workers' numbers were lost with the job's tally actor; the output is whole")
        else:
            say(self._numbers())
        failed = self.stats.rows_failed
        tail = f", {failed} failed (see {ERROR_COLUMN})" if failed else ""
        say(f"wrote {len(files)} file(s) to {output_dir}: {self.total_rows} rows{tail}")

    def _input_files(self) -> list[Path]:
        input_dir = Path(self.input)
        if not input_dir.is_dir():
            raise InputError(
                f"with --ray, INPUT is a folder of Parquet files; {input_dir} is not a folder"
            )
        files = sorted(p for p in input_dir.iterdir() if p.suffix == ".parquet" and p.is_file())
        if not files:
            raise InputError(f"{input_dir} holds no .parquet file; give a folder of them")
        return files

    def _write(self, out: ray.data.Dataset, files: list[Path], rows: list[int]) -> None:
        from .files import AtomicOutput, location, remove_stale_temp_files

        total = sum(rows)
        allowed = max(self.max_failed_rows, int(self.max_failed_rate * total + 1e-9))
        failed = 0
        targets = [location(Path(self.output) / f.name) for f in files]
        with contextlib.ExitStack() as stack:
            writers = []
            for target in targets:
                remove_stale_temp_files(target)
                writers.append(stack.enter_context(AtomicOutput(target, "parquet")))
            index, left = 0, rows[0]
            try:
                for batch in out.iter_batches(batch_format="pyarrow", batch_size=None):
                    table: pa.Table = batch
                    errors = table.column(ERROR_COLUMN)
                    failed += len(errors) - errors.null_count
                    if self.first_error is None and len(errors) > errors.null_count:
                        self.first_error = next(e for e in errors.to_pylist() if e is not None)
                    while table.num_rows:
                        while left == 0:
                            index += 1
                            left = rows[index]
                        part = table.slice(0, left)
                        writers[index].write(part)
                        left -= part.num_rows
                        table = table.slice(part.num_rows)
            except RayError as e:
                raise _unwrap(e) from e
            if failed > allowed:
                raise TooManyFailures(
                    f"{failed} of {total} row(s) failed, more than the {allowed} allowed "
                    f"(--max-failed-rows {self.max_failed_rows}, --max-failed-rate "
                    f"{self.max_failed_rate:g}); first: {self.first_error}. Nothing was written "
                    f"to {self.output}. The answers received are cached: fix the cause or raise "
                    "the limit, then rerun the same command",
                    failed=failed,
                    total=total,
                )
            for writer in writers:
                writer.commit()
            self.written = [str(t) for t in targets]
            self.committed = True


def _connect(address: str | None) -> None:
    """Join the Ray cluster at ``address``, or start a local one when it is None."""
    if ray.is_initialized():
        return
    try:
        ray.init(
            address=address or None,
            logging_level=logging.WARNING,
            log_to_driver=False,
            include_dashboard=False if address is None else None,
        )
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise ConfigError(
            f"cannot join the Ray cluster at {address!r}: {e}; give its address as "
            "--ray ray://HOST:10001 or --ray auto (the cluster this machine belongs to)"
        ) from e


def _unwrap(error: RayError) -> BaseException:
    """The error a worker raised, without Ray's wrapping (its traceback is in Ray's logs)."""
    seen: BaseException | None = error
    for _ in range(10):  # Ray wraps a UDF's error in a UserCodeException in a RayTaskError
        if seen is None or isinstance(seen, PolarsLLMError):
            break
        seen = getattr(seen, "cause", None) or seen.__cause__
    if isinstance(seen, PolarsLLMError):
        return seen
    first = " ".join(str(error).split())[:300]
    return RayJobError(f"the Ray job failed: {type(error).__name__}: {first}")
