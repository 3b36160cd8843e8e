"""Example DAG (Airflow 3): enrich each day's reviews with the ``polars-llm`` command, per market.

Copy it into your ``dags/`` folder. What it needs:

- ``polars-llm`` installed on the workers (the command on their PATH);
- an Airflow connection ``openai_default`` (type ``openai``): password = the API key, host = the
  base URL (empty for OpenAI). The key never appears in the DAG file nor on a command line;
- an Airflow Variable ``reviews_data``: the data's root, with ``raw/<market>/<day>.parquet`` in
  it and folders ``enriched/<market>/`` for the output. A bucket (``s3://...``) needs no disk
  shared between workers;
- optionally a Variable ``polars_llm_shared_url`` (``redis://host:6379/0``), when the tasks may
  run on several machines (see below).

**One budget for parallel tasks.** The markets are enriched by parallel mapped tasks, and several
days may run at once. Their ``--rpm``/``--tpm`` is one budget for the API key, not one each:
processes on one machine share it through a file beside their cache folder (each worker's local
disk: never put the cache on NFS, whose SQLite locking is unsafe), and workers on several machines
share it through Redis (``POLARS_LLM_SHARED_URL``), which also lets a retry that lands on
another worker reuse the answers the first try paid for.

**Why retrying is safe.** The output is replaced atomically (a failed try leaves the previous
file or none), and every answer is cached as it arrives, so a retry, a rerun or a backfill of the
same day pays only for the prompts not answered yet.

Exit codes: 0 success, 2 bad usage or configuration, 3 bad input, 4 more failed rows than
allowed, 5 aborted (bad key, unknown model, endpoint down), 143 terminated. Retrying helps with 4
and 5 when the cause was passing (an outage); with 2 and 3 fix the DAG or the input.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.providers.standard.operators.bash import BashOperator
from airflow.sdk import DAG

MARKETS = ["us", "de", "fr"]

# Airflow renders these when a task runs: {{ ds }} is the run's date (YYYY-MM-DD).
DATA = "{{ var.value.reviews_data }}"
DAY = "{{ ds }}"

STEPS = (
    "--step sentiment='Sentiment of this review, one word: {review}' "
    "--step reply='Write a short reply to a {sentiment} review: {review}'"
)
# Every task of every run shares these limits (see above).
LIMITS = "--model gpt-4o-mini --concurrency 32 --rpm 500 --tpm 200000"

ENV = {
    # BashOperator's env is templated: the key is read from the connection when the task runs.
    "OPENAI_API_KEY": "{{ conn.openai_default.password }}",
    "OPENAI_BASE_URL": "{{ conn.openai_default.host or '' }}",
    # Empty: the tasks of one machine share the budget beside the local cache folder.
    "POLARS_LLM_SHARED_URL": "{{ var.value.get('polars_llm_shared_url', '') }}",
}


def command(market: str, *options: str) -> str:
    """The enrich command for one market's file of the day."""
    source = f"{DATA}/raw/{market}/{DAY}.parquet"
    target = f"{DATA}/enriched/{market}/{DAY}.parquet"
    return f"polars-llm enrich {source} {target} {STEPS} {LIMITS} " + " ".join(options)


with DAG(
    dag_id="enrich_reviews_cli",
    start_date=datetime(2025, 1, 1),
    schedule="@daily",
    catchup=False,
    max_active_runs=4,  # backfills run side by side: they share the budget too
    default_args={
        "retries": 3,
        "retry_delay": timedelta(minutes=5),
        "retry_exponential_backoff": True,
    },
    tags=["llm"],
) as dag:
    # The runs, one task per market in parallel. Up to 0.5% of rows may fail (their reason is
    # kept in llm_error); more fails the task with exit code 4 and writes nothing, and a retry
    # asks again for those rows only. No terminal: a progress line in the log every 10 s.
    enrich = BashOperator.partial(
        task_id="enrich",
        env=ENV,
        append_env=True,
        execution_timeout=timedelta(hours=6),
    ).expand(bash_command=[command(m, "--max-failed-rate 0.005") for m in MARKETS])
