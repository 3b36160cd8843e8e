"""An example Airflow DAG: enrich each day's reviews with polars-llm, one BashOperator per step.

Copy it into your ``dags/`` folder and adapt the paths. The workers need ``pip install
polars-llm`` (the ``polars-llm`` command on their PATH) and an Airflow Variable
``openai_api_key``. Written for Airflow 2.4+; on Airflow 3 import ``DAG`` from ``airflow.sdk``
and ``BashOperator`` from ``airflow.providers.standard.operators.bash``.

Why it is safe to let Airflow retry the task:

- the output is replaced atomically: a killed or failed attempt leaves no partial file behind,
  and the downstream task either sees yesterday's complete file or today's complete file;
- every answer is cached as it arrives, so a retry (or a manual rerun, or a backfill of the same
  day) sends only the prompts not answered yet and pays for nothing twice. Keep the cache on a
  disk the workers share (``POLARS_LLM_CACHE_DIR``), or pin the task to one worker's queue.

Exit codes tell Airflow's logs what happened: 0 success, 2 bad usage or configuration, 3 bad
input, 4 more failed rows than allowed, 5 aborted (bad key, unknown model, endpoint down),
130/143 interrupted. Retrying helps with 4 and 5 when the cause was transient (an outage); with
2 and 3 fix the DAG or the input.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow import DAG
from airflow.operators.bash import BashOperator

DATA = "/data/reviews"
CACHE = "/data/llm-cache"  # shared by the workers: the checkpoint of every run

# Airflow renders {{ ds }} (the run's date, YYYY-MM-DD) when the task runs.
INPUT = DATA + "/raw/{{ ds }}.parquet"
OUTPUT = DATA + "/enriched/{{ ds }}.parquet"
REPORTS = DATA + "/reports/{{ ds }}"

STEPS = (
    "--step sentiment='Sentiment of this review, one word: {review}' "
    "--step reply='Write a short reply to a {sentiment} review: {review}'"
)

ENV = {
    # BashOperator's env is templated: the key never appears in the DAG file or the command line.
    "OPENAI_API_KEY": "{{ var.value.openai_api_key }}",
    "POLARS_LLM_CACHE_DIR": CACHE,
}

with DAG(
    dag_id="enrich_reviews",
    start_date=datetime(2025, 1, 1),
    schedule="@daily",
    catchup=False,
    # One run at a time: --rpm/--tpm are budgets of one process, so parallel runs against the
    # same key would add up. Use a pool for the same effect across several DAGs.
    max_active_runs=1,
    default_args={
        "retries": 3,
        "retry_delay": timedelta(minutes=5),
        "retry_exponential_backoff": True,
    },
    tags=["llm"],
) as dag:
    # What today's run would send and cost, from the cache alone: no call is made.
    estimate = BashOperator(
        task_id="estimate",
        bash_command=(
            f"mkdir -p {REPORTS} && polars-llm enrich {INPUT} {OUTPUT} {STEPS} "
            f"--model gpt-4o-mini --dry-run --report {REPORTS}/plan.json"
        ),
        env=ENV,
        append_env=True,
    )

    # The run itself. Up to 0.5% of rows may fail (their reason is kept in llm_error); more than
    # that fails the task with exit code 4 and writes nothing, so a retry can try again.
    enrich = BashOperator(
        task_id="enrich",
        bash_command=(
            f"mkdir -p {DATA}/enriched {REPORTS} && polars-llm enrich {INPUT} {OUTPUT} {STEPS} "
            "--model gpt-4o-mini --concurrency 32 --rpm 500 --tpm 200000 "
            "--max-failed-rate 0.005 "  # no terminal: a progress line in the log every 10 s
            f"--report {REPORTS}/run.json"
        ),
        env=ENV,
        append_env=True,
        execution_timeout=timedelta(hours=6),
    )

    estimate >> enrich
