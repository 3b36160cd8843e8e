"""Pipelines: dependent LLM steps where each row moves to its next step as soon as it can.

Running steps as successive ``with_columns`` waits for the slowest row of step 1 before any row
starts step 2. ``pipeline`` instead runs one chain per row on the engine loop: a row's step 2
starts the moment its step 1 is answered, so with steps on separately limited models the total
time approaches that of the slowest step rather than the sum. The results are the same: the same
requests (so the same cache keys) in the same row order.
"""

from __future__ import annotations

import difflib
import json
import math
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import polars as pl

from .engine import Batch, CallSpec, Outcome, engine_loop, estimate_tokens, gather_all
from .errors import ColumnMismatch, ConfigError, TemplateError, TooManyFailures
from .options import split_options
from .outputs import LabelPost, PostProcess, SchemaPost, TextPost
from .prices import cost, load_prices
from .progress import Display, Progress
from .prompt import _parse, placeholders, render
from .settings import OnError, Settings, get_settings, type_problem

ERROR_COLUMN = "llm_error"

# Completion tokens assumed per call in a dry run of a text step with no max_tokens and no
# cached answers to learn from.
ASSUMED_COMPLETION_TOKENS = 256


@dataclass(frozen=True, init=False)
class Step:
    """One LLM column of a pipeline: its name, prompt template and how to call the model.

    ``schema`` (Pydantic model or JSON schema) makes it an ``extract`` step, ``labels`` a
    ``classify`` step; otherwise the answer is text. Other keywords are settings of this step
    (``rpm=``, ``timeout=``, ... any :class:`~polars_llm.Settings` field) or chat-completions
    parameters (``temperature=``, ``seed=``, ...); ``extra_body=`` carries provider-specific
    ones. An unknown keyword is refused by name.

    >>> Step("title", "Title for: {text}", temperature=0.2, rpm=600)
    Step(name='title', template='Title for: {text}', params={'temperature': 0.2}, settings={'rpm': 600})
    """

    name: str
    template: str
    model: str | None
    system: str | None
    params: Mapping[str, Any]
    schema: Any
    labels: Sequence[str] | None
    settings: Mapping[str, Any]

    def __init__(
        self,
        name: str,
        template: str,
        model: str | None = None,
        system: str | None = None,
        params: Mapping[str, Any] | None = None,
        schema: Any = None,
        labels: Sequence[str] | None = None,
        *,
        settings: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> None:
        if not name or not isinstance(name, str):
            raise ConfigError("every step needs a non-empty name")
        if not isinstance(template, str):
            raise ConfigError(f"step {name!r}: the prompt must be text, got {template!r}")
        where = f"step {name!r}"
        if params is not None and not isinstance(params, Mapping):
            raise ConfigError(
                f"{where}: params must be a table of request parameters, got {params!r}"
            )
        in_params, body = split_options(dict(params or {}), where=where)
        if in_params:
            raise ConfigError(
                f"{where}: {', '.join(sorted(in_params))} is a setting, not a request parameter; "
                "give it as a keyword of the step (or under [settings])"
            )
        overrides, extra = split_options(options, where=where)
        if settings:
            given, stray = split_options(dict(settings), where=where)
            if stray:
                raise ConfigError(
                    f"{where}: {', '.join(sorted(stray))} is a request parameter, not a setting; "
                    "put it under params = { ... }"
                )
            overrides = {**given, **overrides}
        set_ = object.__setattr__
        set_(self, "name", name)
        set_(self, "template", template)
        set_(self, "model", model)
        set_(self, "system", system)
        set_(self, "params", {**body, **extra})
        set_(self, "schema", schema)
        set_(self, "labels", labels)
        set_(self, "settings", overrides)
        if schema is not None and labels is not None:
            raise ConfigError(f"step {name!r}: give schema or labels, not both")
        placeholders(template)  # a malformed template fails here, not mid-run

    def __repr__(self) -> str:
        shown = [f"name={self.name!r}", f"template={self.template!r}"]
        for key in ("model", "system", "params", "schema", "labels", "settings"):
            value = getattr(self, key)
            if value:
                shown.append(f"{key}={value!r}")
        return f"Step({', '.join(shown)})"

    def post(self) -> PostProcess:
        if self.schema is not None:
            return SchemaPost(self.schema)
        if self.labels is not None:
            return LabelPost(self.labels)
        return TextPost()

    def spec(self, settings: Settings | None) -> CallSpec:
        post = self.post()
        system = post.system(self.system) if isinstance(post, LabelPost) else self.system
        return CallSpec(
            model=self.model,
            system=system,
            params=dict(self.params),
            post=post,
            settings=settings,
            overrides=dict(self.settings),
        )

    @classmethod
    def from_mapping(cls, name: str, table: Mapping[str, Any]) -> Step:
        """A step from a TOML table: prompt, model, system, params, schema, labels, and any
        setting of this step (``rpm = 600``)."""
        known = {"prompt", "model", "system", "params", "schema", "labels"}
        if "prompt" not in table:
            raise ConfigError(f"step {name!r} needs a prompt = '...' with {{column}} placeholders")
        options = {k: v for k, v in table.items() if k not in known}
        return cls(
            name=name,
            template=table["prompt"],
            model=table.get("model"),
            system=table.get("system"),
            params=table.get("params"),
            schema=table.get("schema"),
            labels=table.get("labels"),
            settings=options,
        )


def load_pipeline(path: str | Path) -> tuple[list[Step], dict[str, Any]]:
    """Steps and settings from a TOML pipeline file.

    Example::

        [settings]            # optional: any Settings field
        concurrency = 16

        [steps.sentiment]
        prompt = "Sentiment of this review, one word: {review}"
        labels = ["positive", "negative", "neutral"]

        [steps.reply]
        prompt = "Write a short reply to a {sentiment} review: {review}"
        model = "gpt-4o-mini"
        system = "You are a polite support agent."
        params = { temperature = 0.3, max_tokens = 120 }
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise ConfigError(f"cannot read the pipeline file {path}: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"the pipeline file {path} is not UTF-8 text ({e.reason} at byte {e.start}); "
            "save it as UTF-8"
        ) from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"the pipeline file {path} is not valid TOML: {e}") from e
    steps_table = data.get("steps")
    if not isinstance(steps_table, dict) or not steps_table:
        raise ConfigError(f"{path} has no [steps.NAME] tables; see `polars-llm enrich --help`")
    for name, table in steps_table.items():
        _check_step_table(path, name, table)
    steps = [Step.from_mapping(name, table) for name, table in steps_table.items()]
    settings = data.get("settings", {})
    _check_settings_table(path, settings)
    return steps, dict(settings)


# What each key of a [steps.NAME] table must hold, and how to say it.
_STEP_KEY_TYPES: dict[str, tuple[type, str]] = {
    "prompt": (str, 'a string, e.g. prompt = "Summarize: {text}"'),
    "model": (str, 'a string, e.g. model = "gpt-4o-mini"'),
    "system": (str, 'a string, e.g. system = "You are a terse analyst."'),
    "params": (dict, "a table, e.g. params = { temperature = 0.3 }"),
    "schema": (dict, 'a JSON-schema table, e.g. schema = { type = "object", ... }'),
    "labels": (list, 'a list of strings, e.g. labels = ["positive", "negative"]'),
}


def _check_step_table(path: Path, name: str, table: object) -> None:
    """Raise ConfigError, naming the key and the type it needs, for a wrongly typed step table."""
    if not isinstance(table, dict):
        raise ConfigError(
            f"{path}: steps.{name} must be a table ([steps.{name}] with prompt = ...), "
            f"got {table!r}"
        )
    for key, value in table.items():
        expected = _STEP_KEY_TYPES.get(key)
        if expected is None:
            continue  # Step.from_mapping names unknown keys
        kind, example = expected
        ok = isinstance(value, kind)
        if isinstance(value, list):
            ok = ok and all(isinstance(v, str) for v in value)
        if not ok:
            raise ConfigError(f"{path}: [steps.{name}] {key} must be {example}; got {value!r}")


def _check_settings_table(path: Path, table: object) -> None:
    """Raise ConfigError for a [settings] value whose type the setting cannot take."""
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: settings must be a [settings] table, got {table!r}")
    for key, value in table.items():
        wanted = type_problem(key, value)
        if wanted is not None:
            raise ConfigError(f"{path}: [settings] {key} must be {wanted}; got {value!r}")


def check_steps(steps: Sequence[Step], columns: Sequence[str]) -> None:
    """Raise unless every placeholder names an input column or an earlier step.

    Problems with the input's columns (a missing column, a step named like a column) raise
    ``ColumnMismatch``; problems of the steps alone raise ``ConfigError`` or ``TemplateError``.
    """
    if not steps:
        raise ConfigError("a pipeline needs at least one step")
    names = [s.name for s in steps]
    if ERROR_COLUMN in names:
        raise ConfigError(f"{ERROR_COLUMN!r} is the column of row errors; name the step otherwise")
    available = list(columns)
    for k, step in enumerate(steps):
        if step.name in available:
            raise ColumnMismatch(
                f"step name {step.name!r} is already a column; pick another name for the step"
            )
        for name in placeholders(step.template):
            if name in available:
                continue
            if name == "":
                raise TemplateError(
                    f"step {step.name!r}: {{}} needs a column name here, e.g. {{review}}"
                )
            if name in names[k:]:
                raise TemplateError(
                    f"step {step.name!r}: {{{name}}} is not a column or an earlier step: a "
                    f"later step computes it; put step {name!r} first"
                )
            close = difflib.get_close_matches(name, available, n=1)
            hint = f"did you mean {{{close[0]}}}? " if close else ""
            raise ColumnMismatch(
                f"step {step.name!r}: {{{name}}} is not a column or an earlier step; "
                f"{hint}available: {', '.join(available)}"
            )
        available.append(step.name)


@dataclass
class StepStats:
    """What one step did: where its requests went, how many, and their tokens.

    ``answers`` counts rows answered (a value or an error), ``cached`` those served from the
    cache, ``requests`` the distinct requests sent (identical prompts share one), ``calls`` the
    HTTP attempts (retries and repair rounds included), ``retries`` the attempts beyond the
    first of each request. Tokens count each request once: ``prompt_tokens`` and
    ``completion_tokens`` were paid by this run, the ``cached_*`` ones were paid when the cached
    answers were first asked and cost nothing now.
    """

    endpoint: str = ""  # the base URL used, or "embedded" for the embedded model
    model: str = ""
    answers: int = 0
    cached: int = 0
    requests: int = 0
    calls: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    cached_completion_tokens: int = 0


@dataclass
class PipelineStats:
    """What a pipeline run did, for progress displays and reports.

    ``cached`` counts step answers served from the cache (not rows); ``prompt_tokens`` and
    ``completion_tokens`` are the tokens paid by this run, ``cached_*`` those of the answers
    served from the cache. ``steps`` has the same by step name, with the endpoint and model.
    """

    rows: int = 0
    rows_done: int = 0
    rows_failed: int = 0
    calls: int = 0  # HTTP requests, retries and hedges included
    retries: int = 0
    hedges: int = 0
    cached: int = 0  # answers served from the cache
    prompt_tokens: int = 0  # paid by this run
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0  # served from the cache, not paid again
    cached_completion_tokens: int = 0
    failures_by_reason: dict[str, int] = field(default_factory=dict)
    # step name -> (endpoint URL, model) it was sent to
    endpoints: dict[str, tuple[str, str]] = field(default_factory=dict)
    answers: int = 0
    steps: dict[str, StepStats] = field(default_factory=dict)

    def add(self, part: PipelineStats) -> None:
        """Add what another run of the same steps counted (a Ray worker's batch, say)."""
        _add_counts(self, part)
        for reason, n in part.failures_by_reason.items():
            self.failures_by_reason[reason] = self.failures_by_reason.get(reason, 0) + n
        self.endpoints.update(part.endpoints)
        for name, theirs in part.steps.items():
            mine = self.steps.setdefault(name, StepStats())
            mine.endpoint, mine.model = theirs.endpoint or mine.endpoint, theirs.model or mine.model
            _add_counts(mine, theirs)


def _add_counts(into: PipelineStats | StepStats, part: PipelineStats | StepStats) -> None:
    for f in fields(into):
        mine = getattr(into, f.name)
        if type(mine) is int:
            setattr(into, f.name, mine + getattr(part, f.name))


class _Template:
    """A template rendered in Python from already-stringified values, exactly as concat_str would."""

    def __init__(self, template: str) -> None:
        self.parts = [(literal, name) for literal, name, _, _ in _parse(template)]

    def render(self, values: Mapping[str, str | None]) -> str | None:
        out: list[str] = []
        for literal, name in self.parts:
            out.append(literal)
            if name is not None:
                value = values[name]
                if value is None:
                    return None
                out.append(value)
        return "".join(out)


def _as_text(value: Any) -> str | None:
    """How an earlier step's value reads inside a later step's prompt."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)


def pipeline(
    df: pl.DataFrame,
    steps: Sequence[Step],
    *,
    settings: Settings | None = None,
    on_error: OnError | None = None,
    progress: Callable[[PipelineStats], None] | None = None,
    stats: PipelineStats | None = None,
) -> pl.DataFrame:
    """Run dependent steps row by row, each row starting its next step as soon as it can.

    Returns ``df`` with one column per step appended, and with ``on_error="null"`` a String
    column ``llm_error`` saying which step failed and why (null where the row succeeded).
    ``progress`` is called about five times a second with the running totals; without it, a
    progress bar shows on a terminal (``Settings.progress`` decides).

    Examples
    --------
    >>> import polars as pl
    >>> import polars_llm
    >>> from polars_llm import Step, pipeline
    >>> from polars_llm.testing import FakeServer
    >>> with FakeServer() as server:
    ...     out = pipeline(
    ...         pl.DataFrame({"topic": ["tea"]}),
    ...         [Step("outline", "Outline {topic}"), Step("intro", "Intro for {outline}")],
    ...         settings=polars_llm.Settings(base_url=server.base_url, api_key="x"),
    ...     )
    >>> out["intro"][0]
    'echo: Intro for echo: Outline tea'
    """
    base = settings if settings is not None else get_settings()
    if on_error is not None:
        base = base.replace(on_error=on_error)
    check_steps(steps, df.columns)
    stats = stats if stats is not None else PipelineStats()
    stats.rows += df.height
    batches = [Batch(step.spec(base)) for step in steps]
    if base.batch:
        from .batch import pipeline_in_rounds

        results_, errors_ = pipeline_in_rounds(df, steps, base, stats)
        return _assemble(df, steps, batches, results_, errors_, base)
    templates = [_Template(step.template) for step in steps]
    inputs = sorted({n for s in steps for n in placeholders(s.template)} & set(df.columns))
    strings = {c: df.get_column(c).cast(pl.String).to_list() for c in inputs}
    first = _prefetch_first_step(df, steps[0], batches[0])
    tallies = [stats.steps.setdefault(step.name, StepStats()) for step in steps]
    seen: list[set[str]] = [set() for _ in steps]  # keys whose tokens are counted
    results: list[list[Any]] = [[None] * df.height for _ in steps]
    errors: list[str | None] = [None] * df.height

    async def run_row(i: int) -> None:
        values: dict[str, str | None] = {c: strings[c][i] for c in inputs}
        for k, (step, batch, template) in enumerate(zip(steps, batches, templates, strict=True)):
            text = template.render(values)
            if text is None:
                values[step.name] = None
                continue
            key = batch.template.key(text)
            if k == 0:
                # The first step's cache was read upfront in one query: a hit is served, a miss
                # goes straight to the endpoint without another lookup on the loop.
                hit = first.get(text)
                if hit is not None:
                    batch.count(hit)
                    outcome = hit
                else:
                    outcome = await batch.complete_async(key, text)
            else:
                outcome = await batch.resolve_async(key, text)
            _tally(tallies[k], outcome, key, seen[k])
            if outcome.error is not None:
                errors[i] = f"{step.name}: {outcome.error.reason}: {outcome.error.message}"
                stats.rows_failed += 1
                reason = outcome.error.reason
                stats.failures_by_reason[reason] = stats.failures_by_reason.get(reason, 0) + 1
                return
            results[k][i] = outcome.value
            values[step.name] = _as_text(outcome.value)

    async def run_all() -> None:
        rows = iter(range(df.height))

        async def worker() -> None:
            for i in rows:
                await run_row(i)
                stats.rows_done += 1

        # Enough row chains in flight to keep every step's limiter busy at once. If one chain
        # fails unexpectedly the others are cancelled: no paid calls after the caller returned.
        width = sum(b.width() for b in batches)
        await gather_all(worker() for _ in range(min(df.height, width)))

    display = None
    if progress is None:
        display = Display(
            df.height,
            lambda: (stats.rows_done, stats.cached, stats.rows_failed),
            show=base.progress,
            unit="row",
        )

    def report() -> None:
        _fold(stats, batches, base_counts)
        _fold_steps(stats, batches, tallies, base_calls)
        if progress is not None:
            progress(stats)
        if display is not None:
            display.update()

    base_counts = Progress()
    base_counts.add(stats_progress(stats))
    base_calls = [t.calls for t in tallies]
    if any(first.get(t) is None for t in first) or len(steps) > 1:
        for batch in batches:
            batch.connect()
    for step, batch in zip(steps, batches, strict=True):
        stats.endpoints[step.name] = (batch.base_url, batch.model)
    try:
        engine_loop().run(run_all(), on_wait=report)
    finally:
        for batch in batches:
            if batch.cache is not None:
                batch.cache.flush(batch)
        if display is not None:
            display.close()
            display = None
    report()
    for tally, batch in zip(tallies, batches, strict=True):
        tally.endpoint = "embedded" if batch.target.local else batch.base_url
        tally.model = batch.model
    for batch in batches:
        if batch.aborted is not None:
            raise batch.aborted
    return _assemble(df, steps, batches, results, errors, base)


def _assemble(
    df: pl.DataFrame,
    steps: Sequence[Step],
    batches: Sequence[Batch],
    results: list[list[Any]],
    errors: list[str | None],
    base: Settings,
) -> pl.DataFrame:
    """``df`` with a column per step (and the error column), or raise as ``on_error`` says."""
    failed = sum(e is not None for e in errors)
    if failed and base.on_error == "raise":
        first_error = next(e for e in errors if e is not None)
        raise TooManyFailures(
            f"{failed} of {df.height} row(s) failed; first: {first_error}. The answers that "
            "succeeded are cached, so a rerun sends only the failed rows. Pass on_error='null' "
            f"to get nulls and an {ERROR_COLUMN} column instead.",
            failed=failed,
            total=df.height,
        )
    new = [
        pl.Series(step.name, results[k], dtype=batches[k].spec.post.dtype)
        for k, step in enumerate(steps)
    ]
    if base.on_error == "null":
        new.append(pl.Series(ERROR_COLUMN, errors, dtype=pl.String))
    return df.with_columns(new)


_FOLDED = (
    "calls",
    "retries",
    "hedges",
    "cached",
    "prompt_tokens",
    "completion_tokens",
    "cached_prompt_tokens",
    "cached_completion_tokens",
)


def stats_progress(stats: PipelineStats) -> Progress:
    """The request counters of ``stats``, as a Progress."""
    return Progress(**{name: getattr(stats, name) for name in _FOLDED})


def _fold(stats: PipelineStats, batches: Sequence[Batch], base: Progress) -> None:
    total = Progress()
    total.add(base)
    for b in batches:
        total.add(b.progress)
    for name in _FOLDED:
        setattr(stats, name, getattr(total, name))


def _tally(tally: StepStats, outcome: Outcome, key: str, seen: set[str]) -> None:
    """Count one row's answer of a step; a request's tokens once, as paid or as cached."""
    tally.answers += 1
    tally.cached += outcome.cached
    if key in seen:  # an identical prompt of this batch: answered once, counted once
        return
    seen.add(key)
    if outcome.cached:
        tally.cached_prompt_tokens += outcome.prompt_tokens
        tally.cached_completion_tokens += outcome.completion_tokens
    else:
        tally.requests += 1
        tally.prompt_tokens += outcome.prompt_tokens
        tally.completion_tokens += outcome.completion_tokens


def _fold_steps(
    stats: PipelineStats,
    batches: Sequence[Batch],
    tallies: Sequence[StepStats],
    base_calls: Sequence[int],
) -> None:
    """Per step: HTTP attempts and retries; in all: answers (rows x steps)."""
    for tally, batch, calls in zip(tallies, batches, base_calls, strict=True):
        tally.calls = calls + batch.progress.calls
        tally.retries = max(0, tally.calls - tally.requests)
    sum_steps(stats)


def sum_steps(stats: PipelineStats) -> None:
    """The run's answers and tokens: the sums of its steps' tallies."""
    every = stats.steps.values()
    stats.answers = sum(t.answers for t in every)
    # Tokens once per request (identical prompts of a batch are one request), paid or cached.
    stats.prompt_tokens = sum(t.prompt_tokens for t in every)
    stats.completion_tokens = sum(t.completion_tokens for t in every)
    stats.cached_prompt_tokens = sum(t.cached_prompt_tokens for t in every)
    stats.cached_completion_tokens = sum(t.cached_completion_tokens for t in every)


def _prefetch_first_step(df: pl.DataFrame, step: Step, batch: Batch) -> dict[str, Outcome | None]:
    """Cache hits of the first step's unique prompts, read in one transaction."""
    prompts = df.select(render(step.template).alias("p")).get_column("p")
    texts = prompts.drop_nulls().unique().to_list()
    _, found = batch.lookup(texts)
    return dict(zip(texts, found, strict=True))


@dataclass
class StepPlan:
    """What a dry run found for one step."""

    name: str
    model: str
    prompts: int = 0
    unique: int = 0
    cached: int = 0
    to_send: int = 0
    unknown: int = 0  # prompts that depend on answers not cached yet
    est_prompt_tokens: int = 0
    est_completion_tokens: int = 0
    est_cost_usd: float | None = None
    # Calls the unknown prompts would make: rows with the same inputs get the same earlier
    # answers (one answer per distinct prompt), so the same prompt, sent once.
    unknown_calls: int = 0


def plan(
    df: pl.DataFrame,
    steps: Sequence[Step],
    *,
    settings: Settings | None = None,
    prices: Mapping[str, tuple[float, float]] | None = None,
) -> list[StepPlan]:
    """What a run would send, from the cache alone: no call is made.

    Rows whose earlier steps are cached are followed into later steps; rows that wait on an
    answer not yet cached are counted as ``unknown`` and estimated from the template alone.
    Costs come from ``prices`` (default: :func:`polars_llm.prices.load_prices`).
    """
    base = settings if settings is not None else get_settings()
    check_steps(steps, df.columns)
    inputs = sorted({n for s in steps for n in placeholders(s.template)} & set(df.columns))
    strings = {c: df.get_column(c).cast(pl.String).to_list() for c in inputs}
    rows: list[dict[str, str | None]] = (
        [
            dict(zip(inputs, values, strict=True))
            for values in zip(*(strings[c] for c in inputs), strict=True)
        ]
        if inputs
        else [{} for _ in range(df.height)]
    )
    # Per row, the steps whose answer a run would still have to ask for: a later step is unknown
    # for a row only if its template reads one of them.
    pending: list[set[str]] = [set() for _ in range(df.height)]
    plans: list[StepPlan] = []
    answer_tokens: dict[str, int] = {}  # per step, the completion tokens expected per answer
    table = load_prices() if prices is None else prices
    # Per step, the input columns its prompt depends on, through the earlier steps it reads.
    sources: dict[str, list[str]] = {}
    for step in steps:
        deps = set(placeholders(step.template))
        sources[step.name] = sorted(
            {c for d in deps for c in (sources.get(d) or ([d] if d in inputs else []))}
        )
        batch = Batch(step.spec(base))
        template = _Template(step.template)
        literal = sum(len(lit) for lit, _ in template.parts)
        sp = StepPlan(step.name, batch.model)
        texts: dict[str, list[int]] = {}
        unknown_inputs: set[tuple[str | None, ...]] = set()
        for i, values in enumerate(rows):
            if deps & pending[i]:
                sp.unknown += 1
                unknown_inputs.add(tuple(strings[c][i] for c in sources[step.name]))
                pending[i].add(step.name)
                continue
            text = template.render(values)
            if text is None:
                values[step.name] = None
                continue
            texts.setdefault(text, []).append(i)
        sp.prompts = sum(len(v) for v in texts.values()) + sp.unknown
        sp.unique = len(texts)
        _, found = batch.lookup(list(texts))
        cached_answers: list[int] = []  # completion tokens of the answers already cached
        for (text, row_ids), outcome in zip(texts.items(), found, strict=True):
            if outcome is not None and outcome.error is None:
                sp.cached += 1
                cached_answers.append(outcome.completion_tokens)
                for i in row_ids:
                    rows[i][step.name] = _as_text(outcome.value)
                continue
            sp.to_send += 1
            sp.est_prompt_tokens += estimate_tokens(text) + batch.system_tokens
            for i in row_ids:
                pending[i].add(step.name)
        per_call = _completion_estimate(step, batch.params.get("max_tokens"), cached_answers)
        answer_tokens[step.name] = per_call
        # A prompt still unknown: the template's text plus the earlier answers it takes in.
        inserted = sum(answer_tokens.get(name, 0) for name in deps)
        sp.unknown_calls = len(unknown_inputs)
        sp.est_prompt_tokens += sp.unknown_calls * (literal // 4 + inserted + batch.system_tokens)
        sp.est_completion_tokens = (sp.to_send + sp.unknown_calls) * per_call
        sp.est_cost_usd = cost(batch.model, sp.est_prompt_tokens, sp.est_completion_tokens, table)
        plans.append(sp)
    return plans


def _completion_estimate(step: Step, max_tokens: Any, cached_answers: Sequence[int]) -> int:
    """Completion tokens to expect per call of ``step``.

    The mean of the step's answers already in the cache when there are some; else, for a
    classify step, the longest label's answer; else ``max_tokens``, else
    ASSUMED_COMPLETION_TOKENS. Never more than ``max_tokens``.
    """
    known = [n for n in cached_answers if n > 0]
    if known:
        guess = math.ceil(sum(known) / len(known))
    elif step.labels is not None:
        guess = max(estimate_tokens(json.dumps({"label": label})) for label in step.labels)
    else:
        guess = int(max_tokens or ASSUMED_COMPLETION_TOKENS)
    return min(guess, int(max_tokens)) if max_tokens else guess
