"""The example DAGs and EnrichOperator under a real Airflow 3, against the fake server.

Airflow lives in a virtualenv of its own (``.venv-airflow``, made by scripts/test.sh). The tests
drive its ``airflow`` command as a process: ``airflow db migrate`` once into a SQLite metadata
database in a temporary AIRFLOW_HOME, then ``airflow dags test`` per DAG, offline. The fake server
runs in this process on loopback; the Airflow connection ``openai_default`` points at it with the
only key it accepts, so a task that did not take its key from the connection fails.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from polars_llm.testing import FakeServer

# The examples retry after 5 minutes: a task that fails keeps `dags test` waiting, so it gets a
# bound of its own and the test shows its log instead of hanging.
DAGS_TEST_TIMEOUT = 420
pytestmark = pytest.mark.timeout(DAGS_TEST_TIMEOUT * 2)

ROOT = Path(__file__).resolve().parent.parent
AIRFLOW = ROOT / ".venv-airflow" / "bin" / "airflow"
EXAMPLES = sorted((ROOT / "docs" / "airflow").glob("*.py"))
KEY = "sk-airflow-test"
DAY = "2025-01-02"
MARKETS = ["us", "de", "fr"]
REVIEWS = ["great tea", "bad tea", "great tea", "cold soup"]

# A DAG of the outcomes a try can have: retried after too many failed rows, failed at once on a
# bad input, skipped on an empty one. The retry waits no time, so that `dags test` goes on.
OUTCOMES_DAG = """
from datetime import datetime, timedelta

from airflow.sdk import DAG

from polars_llm.airflow import EnrichOperator

DATA = "{{ var.value.reviews_data }}"

with DAG(dag_id="enrich_outcomes", start_date=datetime(2025, 1, 1), schedule=None) as dag:
    common = dict(steps=["echo=Echo {review}"], retries=1, retry_delay=timedelta(0))
    EnrichOperator(task_id="flaky", input=DATA + "/flaky.parquet",
                   output=DATA + "/flaky.out.parquet", **common)
    EnrichOperator(task_id="missing", input=DATA + "/missing.parquet",
                   output=DATA + "/missing.out.parquet", **common)
    EnrichOperator(task_id="empty", input=DATA + "/empty.parquet",
                   output=DATA + "/empty.out.parquet", **common)
"""


@dataclass
class Airflow:
    """An AIRFLOW_HOME with a migrated SQLite database and the DAGs to test."""

    home: Path
    env: dict[str, str]

    def task_env(self, server: FakeServer, data: Path, cache: Path) -> dict[str, str]:
        """The environment of a worker whose connection points at ``server``."""
        connection = {"conn_type": "openai", "password": KEY, "host": server.base_url}
        return {
            **self.env,
            "AIRFLOW_CONN_OPENAI_DEFAULT": json.dumps(connection),
            "AIRFLOW_VAR_REVIEWS_DATA": str(data),
            "POLARS_LLM_CACHE_DIR": str(cache),
        }

    def dags_test(
        self, dag_id: str, server: FakeServer, data: Path, cache: Path
    ) -> subprocess.CompletedProcess[str]:
        """``airflow dags test dag_id DAY``, the connection pointing at ``server``."""
        env = self.task_env(server, data, cache)
        try:
            return subprocess.run(
                [str(AIRFLOW), "dags", "test", dag_id, DAY],
                env=env,
                capture_output=True,
                text=True,
                timeout=DAGS_TEST_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired as e:
            out = e.stdout or ""
            log = (out.decode(errors="replace") if isinstance(out, bytes) else out)[-5000:]
            pytest.fail(f"airflow dags test {dag_id} still runs after {e.timeout} s:\n{log}")

    def query(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        with sqlite3.connect(self.home / "airflow.db") as db:
            return db.execute(sql, args).fetchall()

    def tries(self, dag_id: str) -> dict[tuple[str, int], tuple[str, int]]:
        """(task id, map index) -> (state, try number) of the DAG's task instances."""
        rows = self.query(
            "SELECT task_id, map_index, state, try_number FROM task_instance WHERE dag_id = ?",
            dag_id,
        )
        return {(t, m): (s, n) for t, m, s, n in rows}

    def xcom(self, dag_id: str, task_id: str) -> list[Any]:
        """The return values the task's instances pushed, by map index."""
        rows = self.query(
            "SELECT value FROM xcom WHERE dag_id = ? AND task_id = ? AND key = 'return_value' "
            "ORDER BY map_index",
            dag_id,
            task_id,
        )
        return [json.loads(v) for (v,) in rows]


@pytest.fixture(scope="module")
def airflow(tmp_path_factory: pytest.TempPathFactory) -> Airflow:
    """A fresh AIRFLOW_HOME whose DAGs folder holds the examples and the outcomes DAG."""
    if not AIRFLOW.exists():
        pytest.fail(f"{AIRFLOW} is missing: run scripts/test.sh, which creates .venv-airflow")
    home = tmp_path_factory.mktemp("airflow")
    dags = home / "dags"
    dags.mkdir()
    for example in EXAMPLES:
        shutil.copy(example, dags)
    (dags / "enrich_outcomes.py").write_text(OUTCOMES_DAG)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OPENAI_", "POLARS_LLM_", "AIRFLOW"))
    }
    env.update(
        AIRFLOW_HOME=str(home),
        AIRFLOW__CORE__DAGS_FOLDER=str(dags),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        # BashOperator's `polars-llm` is the one installed beside Airflow, as on a worker.
        PATH=f"{AIRFLOW.parent}{os.pathsep}{env.get('PATH', '')}",
    )
    migrate = subprocess.run(
        [str(AIRFLOW), "db", "migrate"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert migrate.returncode == 0, migrate.stdout + migrate.stderr
    return Airflow(home, env)


@pytest.fixture
def server() -> Iterator[FakeServer]:
    with FakeServer(api_key=KEY) as s:
        yield s


def write_markets(data: Path) -> None:
    """One day of reviews per market, and the empty folders for the output."""
    for market in MARKETS:
        (data / "raw" / market).mkdir(parents=True)
        (data / "enriched" / market).mkdir(parents=True)
        reviews = [f"{market}: {r}" for r in REVIEWS]
        pl.DataFrame({"id": range(len(reviews)), "review": reviews}).write_parquet(
            data / "raw" / market / f"{DAY}.parquet"
        )


def enriched(data: Path, market: str) -> pl.DataFrame:
    return pl.read_parquet(data / "enriched" / market / f"{DAY}.parquet")


def test_cli_example_enriches_every_market(
    airflow: Airflow, server: FakeServer, tmp_path: Path
) -> None:
    """The BashOperator example runs `polars-llm enrich` per market: every task succeeds."""
    write_markets(tmp_path)
    done = airflow.dags_test("enrich_reviews_cli", server, tmp_path, tmp_path / "cache")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert set(airflow.tries("enrich_reviews_cli").values()) == {("success", 1)}
    for market in MARKETS:
        out = enriched(tmp_path, market)
        assert out.columns == ["id", "review", "sentiment", "reply", "llm_error"]
        assert out["llm_error"].null_count() == len(REVIEWS)
        for review, sentiment, reply in out.select("review", "sentiment", "reply").rows():
            assert sentiment == f"echo: Sentiment of this review, one word: {review}"
            assert reply == f"echo: Write a short reply to a {sentiment} review: {review}"
    # Identical prompts are sent once: three distinct reviews per market, two steps.
    assert server.stats().chat_calls == len(MARKETS) * len(set(REVIEWS)) * 2


def test_operator_example_reports_to_xcom(
    airflow: Airflow, server: FakeServer, tmp_path: Path
) -> None:
    """The EnrichOperator example writes every market and pushes each run's report to XCom."""
    write_markets(tmp_path)
    done = airflow.dags_test("enrich_reviews", server, tmp_path, tmp_path / "cache")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert set(airflow.tries("enrich_reviews").values()) == {("success", 1)}
    for market in MARKETS:
        out = enriched(tmp_path, market)
        assert out["llm_error"].null_count() == len(REVIEWS)
        assert out["sentiment"].dtype == pl.Enum(["positive", "negative", "neutral"])
        for review, sentiment, reply in out.select("review", "sentiment", "reply").rows():
            assert reply == f"echo: Write a short reply to a {sentiment} review: {review}"
    reports = airflow.xcom("enrich_reviews", "enrich")
    assert [r["output"] for r in reports] == [
        str(tmp_path / "enriched" / m / f"{DAY}.parquet") for m in MARKETS
    ]
    calls = server.stats().chat_calls
    assert sum(r["calls"] for r in reports) == calls
    for report in reports:
        assert report["rows"] == len(REVIEWS) and report["failed_rows"] == 0
        assert report["prompt_tokens"] > 0 and report["est_cost_usd"] > 0
    (total,) = airflow.xcom("enrich_reviews", "summarize")
    assert total["rows"] == len(MARKETS) * len(REVIEWS) and total["calls"] == calls


def test_try_outcomes_follow_exit_codes(airflow: Airflow, tmp_path: Path) -> None:
    """Too many failed rows: retried, paying only for them; bad input: failed; no rows: skipped."""
    asked: dict[str, int] = {}

    def reply(body: dict[str, Any]) -> str:
        prompt = body["messages"][-1]["content"]
        asked[prompt] = asked.get(prompt, 0) + 1
        # A "bad" review gets an empty answer the first time it is asked: the row fails.
        return "" if "bad" in prompt and asked[prompt] == 1 else f"echo: {prompt}"

    pl.DataFrame({"review": REVIEWS}).write_parquet(tmp_path / "flaky.parquet")
    pl.DataFrame({"review": []}, schema={"review": pl.String}).write_parquet(
        tmp_path / "empty.parquet"
    )
    with FakeServer(api_key=KEY, reply=reply) as server:
        done = airflow.dags_test("enrich_outcomes", server, tmp_path, tmp_path / "cache")
    tries = airflow.tries("enrich_outcomes")
    assert tries[("flaky", -1)] == ("success", 2), done.stdout[-3000:]
    assert tries[("missing", -1)] == ("failed", 1)
    assert tries[("empty", -1)] == ("skipped", 1)
    log = done.stdout + done.stderr
    assert "polars-llm exit code 4: 1 row(s) failed" in log
    assert "polars-llm exit code 3: input file" in log
    # The retry asked again for the failed row's prompt only.
    assert asked == {f"Echo {r}": 2 if "bad" in r else 1 for r in set(REVIEWS)}
    out = pl.read_parquet(tmp_path / "flaky.out.parquet")
    assert out["echo"].to_list() == [f"echo: Echo {r}" for r in REVIEWS]
    (report,) = airflow.xcom("enrich_outcomes", "flaky")
    assert report["calls"] == 1
    assert report["cache_hits"] == len([r for r in REVIEWS if "bad" not in r])


HOUR = 3600.0


def write_all_markets(data: Path) -> None:
    """The day's reviews in one file, as the batch example reads them."""
    (data / "raw" / "all").mkdir(parents=True)
    (data / "enriched" / "all").mkdir(parents=True)
    pl.DataFrame({"id": range(len(REVIEWS)), "review": REVIEWS}).write_parquet(
        data / "raw" / "all" / f"{DAY}.parquet"
    )


def run_batch_example(
    airflow: Airflow, server: FakeServer, data: Path, *, crash: bool = False
) -> tuple[int, int, str]:
    """Run the batch example, moving the batches' clock on at each deferral (or, with ``crash``,
    killing the process there instead); returns its exit code, the deferrals and the log."""
    env = airflow.task_env(server, data, data / "cache")
    with subprocess.Popen(
        [str(AIRFLOW), "dags", "test", "enrich_reviews_batch", DAY],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as process:
        assert process.stdout is not None
        log: list[str] = []
        deferrals = 0
        for line in process.stdout:
            log.append(line)
            if "Pausing task as DEFERRED" not in line:
                continue
            deferrals += 1
            if crash:
                process.kill()  # the worker dies while its batches run
                break
            # Nothing ends while the task waits, until the batches' clock moves on.
            server.advance_batches(2 * HOUR)
        code = process.wait(timeout=60)
    return code, deferrals, "".join(log)


def test_batch_example_defers_until_the_batches_end(airflow: Airflow, tmp_path: Path) -> None:
    """The deferrable batch example submits, defers to its trigger, and resumes per round."""
    write_all_markets(tmp_path)
    with FakeServer(api_key=KEY, batch_seconds=HOUR) as server:
        code, deferrals, log = run_batch_example(airflow, server, tmp_path)
        stats = server.stats()
    assert code == 0, log[-20000:]
    # One round per step: sentiment, then the replies that read it.
    assert deferrals == 2 and log.count("running trigger in line") == 2
    assert airflow.tries("enrich_reviews_batch") == {("enrich", -1): ("success", 1)}
    assert stats.chat_calls == 0 and stats.batches_created == 2
    assert stats.batch_lines == 2 * len(set(REVIEWS))
    out = pl.read_parquet(tmp_path / "enriched" / "all" / f"{DAY}.parquet")
    assert out["llm_error"].null_count() == len(REVIEWS)
    for review, sentiment, reply in out.select("review", "sentiment", "reply").rows():
        assert sentiment in ("positive", "negative", "neutral")
        assert reply == f"echo: Write a short reply to a {sentiment} review: {review}"
    (report,) = airflow.xcom("enrich_reviews_batch", "enrich")
    assert report["rows"] == len(REVIEWS) and report["failed_rows"] == 0


def test_batch_rerun_after_a_crash_waits_on_the_same_batches(
    airflow: Airflow, tmp_path: Path
) -> None:
    """A worker killed while its batches run: the next try submits nothing twice."""
    write_all_markets(tmp_path)
    with FakeServer(api_key=KEY, batch_seconds=HOUR) as server:
        code, deferrals, log = run_batch_example(airflow, server, tmp_path, crash=True)
        assert deferrals == 1 and code != 0
        assert server.stats().batches_created == 1
        code, deferrals, log = run_batch_example(airflow, server, tmp_path)
        stats = server.stats()
    assert code == 0, log[-20000:]
    # The first round's batch is found in the ledger and waited on; only the second is new.
    assert stats.batches_created == 2 and stats.batch_lines == 2 * len(set(REVIEWS))
    out = pl.read_parquet(tmp_path / "enriched" / "all" / f"{DAY}.parquet")
    assert out["llm_error"].null_count() == len(REVIEWS)
