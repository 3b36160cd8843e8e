"""Example DAG (Airflow 3): enrich each day's reviews through the OpenAI Batch API, deferred.

The Batch API costs half the price of synchronous calls and answers within 24 hours. With
``batch=True, deferrable=True`` the task renders the prompts, sends what the cache does not hold
as Batch API jobs, and defers: no worker slot is held while OpenAI works, a trigger on the
triggerer (``airflow triggerer``) polls the jobs. When they have ended the task resumes on a
worker, downloads the answers into the cache and writes the output atomically. A step that reads
an earlier one (``reply`` reads ``sentiment``) is a second round: submit, defer, resume again.

A worker that dies mid-task loses nothing: the retry finds the batches already submitted (in the
cache folder's ledger, or through the Batch API's own list from another machine) and waits for
them instead of paying twice.

Needs ``pip install -e '.[airflow]'`` (in a clone of polars-llm), the connection ``openai_default`` (password = the
API key, host = the base URL) and the Variable ``reviews_data`` (``raw/all/<day>.parquet``, a
folder ``enriched/all/``).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DAG

from polars_llm import Step
from polars_llm.airflow import EnrichOperator

DATA = "{{ var.value.reviews_data }}"
DAY = "{{ ds }}"

with DAG(
    dag_id="enrich_reviews_batch",
    start_date=datetime(2025, 1, 1),
    schedule="@daily",
    catchup=False,
    default_args={"retries": 3, "retry_delay": timedelta(minutes=5)},
    tags=["llm"],
) as dag:
    EnrichOperator(
        task_id="enrich",
        input=f"{DATA}/raw/all/{DAY}.parquet",
        output=f"{DATA}/enriched/all/{DAY}.parquet",
        steps=[
            Step(
                "sentiment",
                "Sentiment of this review, one word: {review}",
                labels=["positive", "negative", "neutral"],
            ),
            "reply=Write a short reply to a {sentiment} review: {review}",
        ],
        conn_id="openai_default",
        model="gpt-4o-mini",
        batch=True,
        deferrable=True,
        max_failed_rate=0.005,
    )
