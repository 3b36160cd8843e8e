"""Example DAG (Airflow 3): enrich each day's reviews with ``EnrichOperator``, per market.

The same job as ``enrich_reviews_cli.py``, with the operator instead of a shell command: it runs
the enrich path in the task's process, logs its progress, and returns the run's report, which
Airflow pushes to XCom for the tasks downstream. Needs ``pip install -e '.[airflow]'`` (in a clone of polars-llm) on
the workers, and the same connection and Variables:

- connection ``openai_default`` (type ``openai``): password = the API key, host = the base URL;
- Variable ``reviews_data``: the data's root (``raw/<market>/<day>.parquet``, folders
  ``enriched/<market>/``), a bucket or a local folder;
- optionally Variable ``polars_llm_shared_url`` (``redis://host:6379/0``).

The mapped tasks of a run, and the runs of a backfill, share one ``rpm``/``tpm`` budget: through a
file beside each worker's local cache folder on one machine, through Redis across machines.

How a try ends: the output is written (success); more failed rows than allowed, or the endpoint
unreachable: the task fails and Airflow retries it, and the retry pays only for what is missing;
a bad input, a bad template, a bad key or an unknown model: the task fails without retrying; an
input without rows: the task is skipped.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from airflow.sdk import DAG, task

from polars_llm import Step
from polars_llm.airflow import EnrichOperator

MARKETS = ["us", "de", "fr"]
DATA = "{{ var.value.reviews_data }}"
DAY = "{{ ds }}"

STEPS = [
    Step(
        "sentiment",
        "Sentiment of this review, one word: {review}",
        labels=["positive", "negative", "neutral"],
    ),
    "reply=Write a short reply to a {sentiment} review: {review}",
]

with DAG(
    dag_id="enrich_reviews",
    start_date=datetime(2025, 1, 1),
    schedule="@daily",
    catchup=False,
    max_active_runs=4,
    default_args={
        "retries": 3,
        "retry_delay": timedelta(minutes=5),
        "retry_exponential_backoff": True,
    },
    tags=["llm"],
) as dag:
    enrich = EnrichOperator.partial(
        task_id="enrich",
        steps=STEPS,
        conn_id="openai_default",
        model="gpt-4o-mini",
        concurrency=32,
        rpm=500,
        tpm=200_000,
        # Empty (no Variable): the tasks of one machine share the budget beside the cache.
        shared_url="{{ var.value.get('polars_llm_shared_url', '') }}",
        max_failed_rate=0.005,
        execution_timeout=timedelta(hours=6),
    ).expand_kwargs(
        [
            {
                "input": f"{DATA}/raw/{market}/{DAY}.parquet",
                "output": f"{DATA}/enriched/{market}/{DAY}.parquet",
            }
            for market in MARKETS
        ]
    )

    @task
    def summarize(reports: list[dict[str, Any]]) -> dict[str, Any]:
        """Add up the reports of the markets (XCom) into one line of the log."""
        reports = reports[:]  # every market's report in one request
        total = {
            name: sum(r[name] for r in reports)
            for name in ("rows", "calls", "cache_hits", "failed_rows")
        }
        costs = [r["est_cost_usd"] for r in reports]
        total["est_cost_usd"] = None if None in costs else round(sum(costs), 6)
        print(f"enriched {len(reports)} markets: {total}")
        return total

    summarize(enrich.output)
