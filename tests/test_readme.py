"""The README's examples, run as written against the fake server.

The code is read out of README.md, not copied here, so an example that stops working fails a
test. Each example is found by a line it contains; a new example needs a test of its own (the
last test checks that every block has one).
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest

import polars_llm
from polars_llm.testing import FakeServer, schema_example

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```(\w*)\n(.*?)```", README.read_text(), flags=re.DOTALL)

# A line of each example this file runs, by test.
INTRO = 'df = pl.DataFrame({"review"'
CONFIGURE = "polars_llm.configure(base_url="
DETAILS = "details=True"
PIPELINE = "from polars_llm import Step, pipeline"
FAN_OUT = "class Outline(BaseModel):"
FAKE_SERVER = "with FakeServer(latency=0.05"
JUDGE = "def judge(body: dict) -> str:"
CLI = "polars-llm enrich reviews.parquet enriched.parquet"
RAY = "import polars_llm.ray"


def block(containing: str, lang: str = "python") -> str:
    """The one README code block of ``lang`` with the line ``containing``."""
    found = [code for kind, code in BLOCKS if kind == lang and containing in code]
    assert len(found) == 1, f"{len(found)} README {lang} blocks contain {containing!r}"
    return found[0]


def run_block(code: str, namespace: dict[str, Any]) -> Any:
    """Execute ``code`` in ``namespace``; the value of its last line if that is an expression."""
    tree = ast.parse(code)
    last = tree.body[-1] if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    if last is not None:
        tree.body.pop()
    exec(compile(tree, "README.md", "exec"), namespace)
    if last is None:
        return None
    return eval(compile(ast.Expression(last.value), "README.md", "eval"), namespace)


def _reply(body: dict) -> str:
    """The fake server's default answers, except an empty outline for cocoa."""
    prompt = body["messages"][-1]["content"]
    response_format = body.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") == "json_schema":
        schema = response_format["json_schema"]["schema"]
        if "cocoa" in prompt and "sections" in schema.get("properties", {}):
            return json.dumps({"sections": []})
        return json.dumps(schema_example(schema, prompt))
    return "echo: " + prompt


@pytest.fixture
def fake() -> Iterator[FakeServer]:
    """A fake server that the process-wide settings point at, as a configured endpoint would."""
    with FakeServer(reply=_reply) as server:
        polars_llm.configure(base_url=server.base_url, api_key="test-key")
        yield server


@pytest.fixture
def ns(fake: FakeServer) -> dict[str, Any]:
    """A namespace where the README's first example ran (it defines ``df``)."""
    namespace: dict[str, Any] = {}
    run_block(block(INTRO), namespace)
    return namespace


def test_intro_example_adds_a_label_and_a_summary(fake: FakeServer) -> None:
    """The opening example gives an Enum sentiment and a text summary per review."""
    namespace: dict[str, Any] = {}
    out = run_block(block(INTRO), namespace)
    assert out.columns == ["review", "sentiment", "summary"]
    assert out.schema["sentiment"] == pl.Enum(["positive", "negative", "neutral"])
    assert out["summary"].str.starts_with("echo: Summarize in one sentence: ").all()


def test_configure_example_sets_the_endpoint_and_limits() -> None:
    """The configure example sets the endpoint, key, concurrency and rpm for every call."""
    run_block(block(CONFIGURE), {})
    settings = polars_llm.get_settings()
    assert settings.base_url == "http://localhost:8000/v1"
    assert (settings.concurrency, settings.rpm) == (64, 3000)


def test_details_example_unnests_value_error_and_usage(ns: dict[str, Any]) -> None:
    """The per-row errors example gives value, error, cached and token columns."""
    run_block(block(DETAILS), ns)
    out = ns["out"]
    assert {"value", "error", "cached", "prompt_tokens", "completion_tokens"} <= set(out.columns)
    assert out["error"].null_count() == out.height
    assert (out["prompt_tokens"] > 0).all()


def test_pipeline_example_chains_a_label_into_a_reply(ns: dict[str, Any], fake: FakeServer) -> None:
    """The pipeline example answers a reply that reads the sentiment label of its row."""
    run_block(block(PIPELINE), ns)
    out = ns["out"]
    for row in out.iter_rows(named=True):
        assert row["reply"].startswith(f"echo: Write a short reply to a {row['sentiment']} review")
    assert {b["model"] for b in fake.history if "reply" in b["messages"][-1]["content"]} == {
        "gpt-4o-mini"
    }


def test_fan_out_example_keeps_a_topic_whose_outline_is_empty(ns: dict[str, Any]) -> None:
    """Fan-out/fan-in keeps every topic; one with an empty outline gets null body and intro."""
    run_block(block(FAN_OUT), ns)
    final = ns["final"]
    assert final["topic"].to_list() == ["tea", "coffee", "cocoa"]
    cocoa = final.row(2, named=True)
    assert cocoa["body"] is None and cocoa["intro"] is None
    tea = final.row(0, named=True)
    assert tea["body"] and tea["intro"].startswith("echo: Introduce: ")


def test_fake_server_example_leaves_the_users_cache_alone(ns: dict[str, Any]) -> None:
    """The FakeServer example answers every row and writes nothing to the user's cache."""
    user_cache = Path(os.environ["POLARS_LLM_CACHE_DIR"])
    before = sorted(p.name for p in user_cache.rglob("*")) if user_cache.exists() else []
    polars_llm.configure(polars_llm.Settings())  # the user's defaults: cache at the default dir
    run_block(block(FAKE_SERVER), ns)
    assert ns["out"]["a"].str.starts_with("echo: ").all()
    after = sorted(p.name for p in user_cache.rglob("*")) if user_cache.exists() else []
    assert after == before


def test_judge_example_answers_with_the_reply_function() -> None:
    """The reply= example's function decides the fake server's answer."""
    namespace: dict[str, Any] = {"FakeServer": FakeServer}  # imported by the example before it
    run_block(block(JUDGE), namespace)
    judge = namespace["judge"]
    assert judge({"messages": [{"content": "I love it"}]}) == "positive"
    with FakeServer(reply=judge) as server:
        out = pl.DataFrame({"q": ["love", "hate"]}).with_columns(
            a=pl.col("q").llm.complete(base_url=server.base_url, api_key="x", cache=False)
        )
    assert out["a"].to_list() == ["positive", "negative"]


def test_cli_example_runs_as_written(fake: FakeServer, tmp_path: Path) -> None:
    """The README's polars-llm enrich command, run in a folder with reviews.parquet, writes it."""
    pl.DataFrame({"review": ["Great lamp.", "Broken on arrival."]}).write_parquet(
        tmp_path / "reviews.parquet"
    )
    args = shlex.split(block(CLI, lang="").replace("\\\n", " "))
    assert args[:2] == ["polars-llm", "enrich"]
    env = {**os.environ, "OPENAI_BASE_URL": fake.base_url, "OPENAI_API_KEY": "test-key"}
    proc = subprocess.run(
        [sys.executable, "-m", "polars_llm.cli", *args[1:]],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out = pl.read_parquet(tmp_path / "enriched.parquet")
    assert out.columns == ["review", "sentiment", "reply", "llm_error"]
    assert out["reply"].str.contains("review: Great lamp.").any()


def test_ray_example_runs_on_a_local_ray(
    fake: FakeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Ray Data example, on a 2-CPU local Ray with local folders for its buckets."""
    import ray

    (tmp_path / "reviews").mkdir()
    pl.DataFrame({"review": [f"review {i}" for i in range(20)]}).write_parquet(
        tmp_path / "reviews" / "part-0.parquet"
    )
    # Ray's workers find the endpoint where an application's would: in the environment.
    monkeypatch.setenv("OPENAI_BASE_URL", fake.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    code = (
        block(RAY)
        .replace("ray.init()", "ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)")
        .replace("s3://bucket/", f"{tmp_path}/")
        .replace("workers=8", "workers=2")  # as many as the local Ray's CPUs
    )
    try:
        run_block(code, {})
    finally:
        ray.shutdown()
    out = pl.read_parquet(tmp_path / "enriched")
    assert sorted(out["sentiment"].to_list()) == sorted(
        f"echo: Sentiment of this review, one word: review {i}" for i in range(20)
    )


def test_every_python_example_has_a_test() -> None:
    """Each python block of the README is one of those run above."""
    markers = [INTRO, CONFIGURE, DETAILS, PIPELINE, FAN_OUT, FAKE_SERVER, JUDGE, RAY]
    # Not run here, and said so: the Airflow DAG needs Airflow's own virtualenv (.venv-airflow)
    # and a Redis; tests/test_airflow.py runs the DAGs of docs/airflow/ there instead.
    markers.append("from airflow.sdk import dag, task")
    python = [code for kind, code in BLOCKS if kind == "python"]
    untested = [code for code in python if not any(m in code for m in markers)]
    assert not untested, untested
