"""Airflow 3: ``EnrichOperator`` runs ``polars-llm enrich`` inside an Airflow task.

The operator runs the same enrich path as the command line (:class:`polars_llm.enrich.EnrichRun`)
in the task's own process: the input is read in batches, every answer is cached as it arrives, and
the output replaces the previous file atomically once every row is done. So a retry (or a rerun,
or a backfill of the same day) pays only for the prompts not answered yet.

- ``input``, ``output`` and ``pipeline`` are templated (``{{ ds }}``); so are the settings.
- The API key and the endpoint come from an Airflow connection (``conn_id``, default
  ``openai_default``): its password is the key, its host the base URL (OpenAI's when empty).
- Progress lines and the closing summary go to the task log; the run's report (the ``--report``
  JSON, plus ``est_cost_usd``) is the task's return value, so it is pushed to XCom.
- What goes wrong becomes a task outcome by the command's exit code: bad input or configuration
  (3, 2) and a refusal by the endpoint (bad key, unknown model) fail the task without retrying;
  too many failed rows (4), an unreachable endpoint (5) and unexpected errors (1) let Airflow retry;
  an input without rows skips the task.
- ``batch=True, deferrable=True`` sends the calls as Batch API jobs and defers to
  :class:`BatchTrigger`, which polls them on the triggerer; the task resumes to collect the answers
  and write the output (or to submit the next round and defer again).

Requires ``pip install -e '.[airflow]'`` in a clone of polars-llm (Airflow 3.1 or newer).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from airflow.sdk import BaseHook, BaseOperator, Context
from airflow.sdk.exceptions import (
    AirflowException,
    AirflowFailException,
    AirflowNotFoundException,
    AirflowSkipException,
)
from airflow.triggers.base import BaseTrigger, TriggerEvent

from .batch import POLL_MAX, BatchPending, BatchProgress, wait_for_batches
from .cli import DEFAULT_BATCH_SIZE, EXIT_ABORTED, EXIT_INPUT, EXIT_USAGE, failure
from .enrich import EnrichRun
from .errors import BatchAborted, ConfigError, EmptyInput, FatalError
from .pipeline import Step, load_pipeline
from .prices import PRICES
from .settings import OPENAI_URL, Settings, get_settings

__all__ = ["BatchTrigger", "EnrichOperator"]

# Settings the operator takes as keywords. The key and the endpoint are not among them: they come
# from the connection, so that no key sits in a DAG file. The run itself decides the others.
SETTINGS = frozenset(
    {f.name for f in dataclasses.fields(Settings)}
    - {"api_key", "base_url", "progress", "batch", "on_error"}
)
# The Batch API's discount on list prices.
BATCH_PRICE_FACTOR = 0.5


class EnrichOperator(BaseOperator):
    """Add LLM-written columns to a Parquet file, as ``polars-llm enrich`` does, in a task.

    Parameters
    ----------
    input, output
        Parquet files (templated). The output's folder must exist.
    steps
        :class:`~polars_llm.Step` objects or ``"name=template"`` strings, run after the
        ``pipeline`` file's steps.
    pipeline
        A TOML pipeline file (templated): its steps, and its ``[settings]`` under the keywords.
    conn_id
        The Airflow connection with the API key (password) and base URL (host). ``None`` leaves
        both to the worker's environment (``$OPENAI_API_KEY``, ``$OPENAI_BASE_URL``).
    max_failed_rows, max_failed_rate, batch_size
        As ``--max-failed-rows``, ``--max-failed-rate`` and ``--batch-size``.
    batch
        Send the calls as OpenAI Batch API jobs (half the price) and wait for them.
    deferrable
        With ``batch=True``: submit the jobs, then free the worker while a :class:`BatchTrigger`
        polls them (every ``poll_interval`` seconds at first, at most every minute later). When
        they have ended the task resumes on a worker: it downloads the answers into the cache
        and writes the output, or submits the next round (a dependent step, lines to retry) and
        defers again. A retry after a crash resumes the same batches from the cache folder's
        ledger, or from the Batch API's own list on another machine.
    model, concurrency, rpm, tpm, timeout, max_attempts, retry_budget, backoff_base, backoff_max, cache, cache_dir, truncated_is_error, shared_url, transport
        :class:`~polars_llm.Settings` fields (templated; one that renders empty is left unset).
    **kwargs
        ``BaseOperator``'s arguments (``task_id``, ``retries``, ...).
    """

    # ``output`` is BaseOperator's XComArg property: the paths live in *_path attributes.
    template_fields: Sequence[str] = ("input_path", "output_path", "pipeline", "settings")
    ui_color = "#d8e8f8"

    def __init__(
        self,
        *,
        input: str,
        output: str,
        steps: Sequence[Step | str] = (),
        pipeline: str | None = None,
        conn_id: str | None = "openai_default",
        max_failed_rows: int = 0,
        max_failed_rate: float = 0.0,
        batch_size: int = DEFAULT_BATCH_SIZE,
        batch: bool = False,
        deferrable: bool = False,
        poll_interval: float = 10.0,
        # The Settings fields in SETTINGS, spelt out: Airflow's partial() checks the names.
        model: str | None = None,
        concurrency: int | None = None,
        rpm: int | None = None,
        tpm: int | None = None,
        timeout: float | None = None,
        max_attempts: int | None = None,
        retry_budget: float | None = None,
        backoff_base: float | None = None,
        backoff_max: float | None = None,
        cache: bool | None = None,
        cache_dir: str | None = None,
        truncated_is_error: bool | None = None,
        shared_url: str | None = None,
        transport: str | None = None,
        **kwargs: Any,
    ) -> None:
        if "api_key" in kwargs or "base_url" in kwargs:
            raise ConfigError(
                "EnrichOperator takes no api_key or base_url: put them in an Airflow connection "
                "(password = key, host = base URL) and pass its conn_id"
            )
        given = locals()
        settings = {name: given[name] for name in SETTINGS if given[name] is not None}
        super().__init__(**kwargs)
        if not steps and pipeline is None:
            raise ConfigError(f"task {self.task_id!r}: give steps=[...] or pipeline=PATH")
        if deferrable and not batch:
            raise ConfigError(
                f"task {self.task_id!r}: deferrable=True needs batch=True (synchronous calls are "
                "made by the worker itself; only Batch API jobs can be waited for elsewhere)"
            )
        self.input_path = input
        self.output_path = output
        self.steps = [_step(s) for s in steps]
        self.pipeline = pipeline
        self.conn_id = conn_id
        self.max_failed_rows = max_failed_rows
        self.max_failed_rate = max_failed_rate
        self.batch_size = batch_size
        self.batch = batch
        self.deferrable = deferrable
        self.poll_interval = poll_interval
        self.settings = settings

    def execute(self, context: Context) -> dict[str, Any]:
        """Enrich ``input`` into ``output``; return the run's report (pushed to XCom)."""
        return self._run()

    def execute_complete(self, context: Context, event: dict[str, Any]) -> dict[str, Any]:
        """Resume once the trigger says the batches have ended: collect, then write or defer."""
        if event.get("error"):
            raise AirflowException(f"polling the batches failed: {event['error']}")
        self.log.info("batches ended: %s", event.get("statuses"))
        return self._run()

    def _run(self) -> dict[str, Any]:
        steps, settings = self._steps_and_settings()
        run = EnrichRun(
            input=Path(self.input_path),
            output=Path(self.output_path),
            batch_size=self.batch_size,
            max_failed_rows=self.max_failed_rows,
            max_failed_rate=self.max_failed_rate,
            dry_run=False,
            report=None,
            progress=None,
            wait=not self.deferrable,
            log=self.log.info,
        )
        try:
            run.run(steps, settings)
        except BatchPending as e:
            self.log.info("%s: deferring to a trigger (%s)", e, ", ".join(e.batch_ids))
            self.defer(
                trigger=BatchTrigger(
                    batch_ids=e.batch_ids,
                    base_url=e.base_url,
                    conn_id=self.conn_id,
                    poll_interval=self.poll_interval,
                ),
                method_name="execute_complete",
                # The Batch API's completion window, and a day more for the last round.
                timeout=timedelta(hours=48),
            )
        except Exception as e:
            raise _task_error(e, run.output) from e
        report = run.summary(0, None)
        report["est_cost_usd"] = _cost(report, steps, settings)
        self.log.info(
            "%s rows, %s calls, %s cached, %s failed, %s tokens, about $%s",
            report["rows"],
            report["calls"],
            report["cache_hits"],
            report["failed_rows"],
            report["prompt_tokens"] + report["completion_tokens"],
            "?" if report["est_cost_usd"] is None else f"{report['est_cost_usd']:.4f}",
        )
        return report

    def _steps_and_settings(self) -> tuple[list[Step], Settings]:
        """The pipeline file's steps then ``steps``; settings: file, keywords, connection."""
        steps: list[Step] = []
        file_settings: dict[str, Any] = {}
        try:
            if self.pipeline is not None:
                steps, file_settings = load_pipeline(self.pipeline)
            steps += self.steps
            names = [s.name for s in steps]
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ConfigError(f"more than one step is named {', '.join(dupes)}; rename one")
            # A template that renders empty (an unset Variable) leaves the setting as it was.
            given = {k: v for k, v in self.settings.items() if v != ""}
            if self.batch:
                given["batch"] = True
            settings = get_settings().replace(**file_settings).replace(**given)
            settings = settings.replace(**self._connection())
        except (ConfigError, TypeError) as e:
            raise AirflowFailException(f"task {self.task_id!r}: {e}") from e
        return steps, settings

    def _connection(self) -> dict[str, str]:
        if self.conn_id is None:
            return {}
        try:
            conn = BaseHook.get_connection(self.conn_id)
        except AirflowNotFoundException as e:
            raise AirflowFailException(
                f"no Airflow connection {self.conn_id!r}: create it (e.g. the variable "
                f'AIRFLOW_CONN_{self.conn_id.upper()}=\'{{"conn_type": "openai", '
                '"password": "<API key>", "host": "<base URL>"}\'), or pass conn_id=None to use '
                "the worker's $OPENAI_API_KEY"
            ) from e
        if not conn.password:
            raise AirflowFailException(
                f"the Airflow connection {self.conn_id!r} has no password: put the API key there"
            )
        return {"api_key": conn.password, "base_url": conn.host or OPENAI_URL}


def _step(step: Step | str) -> Step:
    """A ``Step`` from a Step or a ``"name=template"`` string."""
    if isinstance(step, Step):
        return step
    name, sep, template = str(step).partition("=")
    if not sep or not name.strip() or not template:
        raise ConfigError(
            f"{step!r} is not NAME=TEMPLATE; write e.g. "
            "'sentiment=Sentiment of this review: {review}', or pass a polars_llm.Step"
        )
    return Step(name=name.strip(), template=template)


def _task_error(e: Exception, output: str | os.PathLike[str]) -> BaseException:
    """The Airflow exception for what ``EnrichRun.run`` raised: skip, fail, or retry."""
    if isinstance(e, AirflowException):
        return e
    code, reason = failure(e, output)
    message = f"polars-llm exit code {code}: {reason}"
    if isinstance(e, EmptyInput):
        return AirflowSkipException(reason)
    if code in (EXIT_USAGE, EXIT_INPUT):
        return AirflowFailException(message)  # fix the DAG or the input first
    if code == EXIT_ABORTED and isinstance(e, BatchAborted) and isinstance(e.cause, FatalError):
        return AirflowFailException(message)  # a bad key or model: a retry is refused again
    return AirflowException(message)  # too many failed rows, an outage: worth a retry


def _cost(report: Mapping[str, Any], steps: Sequence[Step], settings: Settings) -> float | None:
    """List price of the report's tokens (cached answers included) if every step uses one model."""
    models = {s.model or settings.default_model(settings.endpoint(s.model)) for s in steps}
    price = PRICES.get(models.pop()) if len(models) == 1 else None
    if price is None:
        return None
    cost = (report["prompt_tokens"] * price[0] + report["completion_tokens"] * price[1]) / 1e6
    return round(cost * (BATCH_PRICE_FACTOR if settings.batch else 1.0), 6)


class BatchTrigger(BaseTrigger):
    """Poll Batch API jobs on the triggerer until every one has ended; fire once.

    Holds no key: it reads it from the connection ``conn_id`` when it runs (the worker's
    ``$OPENAI_API_KEY`` when ``None``), so none is stored with the trigger.
    """

    def __init__(
        self, *, batch_ids: Sequence[str], base_url: str, conn_id: str | None, poll_interval: float
    ) -> None:
        super().__init__()
        self.batch_ids = list(batch_ids)
        self.base_url = base_url
        self.conn_id = conn_id
        self.poll_interval = poll_interval

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "batch_ids": self.batch_ids,
                "base_url": self.base_url,
                "conn_id": self.conn_id,
                "poll_interval": self.poll_interval,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        try:
            if self.conn_id is None:
                api_key = os.environ.get("OPENAI_API_KEY", "")
            else:
                api_key = (await BaseHook.aget_connection(self.conn_id)).password or ""
            statuses = await wait_for_batches(
                self.batch_ids,
                base_url=self.base_url,
                api_key=api_key,
                on_progress=self._log_progress,
                poll_min=self.poll_interval,
                poll_max=max(self.poll_interval, POLL_MAX),
            )
        except (BatchAborted, AirflowNotFoundException) as e:
            yield TriggerEvent({"error": str(e)})
            return
        yield TriggerEvent({"statuses": {s.id: s.status for s in statuses}})

    def _log_progress(self, p: BatchProgress) -> None:
        self.log.info(
            "batches: %d/%d ended, %d/%d lines done, %d failed",
            p.ended,
            p.batches,
            p.completed + p.failed,
            p.lines,
            p.failed,
        )
