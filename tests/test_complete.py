"""The .llm.complete expression through the public API, against the fake server."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

import polars_llm
from polars_llm.testing import FakeServer


def test_identical_prompts_are_sent_once(server: FakeServer, use: object) -> None:
    """1,000 rows with 100 unique prompts make exactly 100 calls."""
    df = pl.DataFrame({"q": [f"question {i % 100}" for i in range(1000)]})
    out = df.with_columns(a=pl.col("q").llm.complete("Answer: {q}"))
    assert server.stats().chat_calls == 100
    assert out["a"].to_list() == [f"echo: Answer: question {i % 100}" for i in range(1000)]


def test_rerun_is_served_from_the_cache(server: FakeServer, use: object) -> None:
    """A second run of the same frame makes zero calls and gives the same frame."""
    df = pl.DataFrame({"q": [f"q{i}" for i in range(300)]})
    first = df.with_columns(a=pl.col("q").llm.complete("Say {q}"))
    calls = server.stats().calls
    second = df.with_columns(a=pl.col("q").llm.complete("Say {q}"))
    assert calls == 300
    assert server.stats().calls == calls
    assert_frame_equal(first, second)


def test_cache_off_sends_again(
    server: FakeServer, use: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With POLARS_LLM_CACHE=0 a rerun calls the endpoint again."""
    monkeypatch.setenv("POLARS_LLM_CACHE", "0")
    df = pl.DataFrame({"q": ["a", "b"]})
    df.with_columns(a=pl.col("q").llm.complete())
    df.with_columns(a=pl.col("q").llm.complete())
    assert server.stats().calls == 4


def test_cache_dir_argument_and_env(server: FakeServer, tmp_path: Path) -> None:
    """Answers land in the folder named by settings, not elsewhere."""
    folder = tmp_path / "mine"
    polars_llm.configure(base_url=server.base_url, api_key="k", cache_dir=folder)
    pl.DataFrame({"q": ["x"]}).with_columns(a=pl.col("q").llm.complete())
    assert (folder / "cache.db").exists()
    assert not (tmp_path / "cache").exists()


def test_rows_stay_aligned_under_random_latency() -> None:
    """Each answer matches its own row's prompt when replies come back out of order."""
    with FakeServer(latency=0.03, jitter=0.03) as server:
        polars_llm.configure(base_url=server.base_url, api_key="k", concurrency=64)
        words = [f"w{random.randrange(400)}" for _ in range(2000)]
        df = pl.DataFrame({"w": words})
        out = df.with_columns(a=pl.col("w").llm.complete("Echo {w}"))
    assert out["a"].to_list() == [f"echo: Echo {w}" for w in words]
    assert server.stats().max_in_flight > 8


def test_nulls_give_nulls_and_are_not_sent(server: FakeServer, use: object) -> None:
    """Null inputs give null outputs and never reach the endpoint."""
    df = pl.DataFrame({"q": ["a", None, "b", None]})
    out = df.with_columns(a=pl.col("q").llm.complete("Say {q}"))
    assert out["a"].to_list() == ["echo: Say a", None, "echo: Say b", None]
    assert sorted(server.stats().prompts) == ["Say a", "Say b"]


def test_all_null_column_makes_no_call(server: FakeServer, use: object) -> None:
    """A column with only nulls gives nulls of the declared dtype without calling."""
    df = pl.DataFrame({"q": [None, None]}, schema={"q": pl.String})
    out = df.with_columns(a=pl.col("q").llm.complete("Say {q}"))
    assert out.schema["a"] == pl.String
    assert out["a"].null_count() == 2
    assert server.stats().calls == 0


def test_concurrency_cap_holds_across_two_expressions() -> None:
    """Two LLM expressions in one with_columns never exceed the process-wide cap together."""
    with FakeServer(latency=0.05, jitter=0.02) as server:
        polars_llm.configure(base_url=server.base_url, api_key="k", concurrency=6)
        df = pl.DataFrame({"q": [f"q{i}" for i in range(150)]})
        out = df.with_columns(
            a=pl.col("q").llm.complete("A {q}"),
            b=pl.col("q").llm.complete("B {q}"),
        )
    assert out["b"][7] == "echo: B q7"
    assert server.stats().chat_calls == 300
    assert server.stats().max_in_flight == 6


def test_concurrency_cap_holds_in_the_streaming_engine() -> None:
    """The streaming engine, calling from several threads, stays under the cap too."""
    with FakeServer(latency=0.02) as server:
        polars_llm.configure(base_url=server.base_url, api_key="k", concurrency=4)
        lf = pl.LazyFrame({"q": [f"q{i}" for i in range(400)]}).with_columns(
            a=pl.col("q").llm.complete("A {q}"), b=pl.col("q").llm.complete("B {q}")
        )
        out = lf.collect(engine="streaming")
    assert out["a"].to_list() == [f"echo: A q{i}" for i in range(400)]
    assert server.stats().max_in_flight <= 4
    assert server.stats().chat_calls == 800


def test_lazy_and_eager_give_the_same_frame(server: FakeServer, use: object) -> None:
    """Eager, lazy and streaming runs give the same frame and schema."""
    df = pl.DataFrame({"q": ["x", "y", None, "x"], "n": [1, 2, 3, 4]})
    expr = pl.col("q").llm.complete("Say {q} {n}")
    eager = df.with_columns(a=expr)
    lazy = df.lazy().with_columns(a=expr)
    assert lazy.collect_schema() == eager.schema
    assert_frame_equal(lazy.collect(), eager)
    assert_frame_equal(lazy.collect(engine="streaming"), eager)


def test_schema_resolves_without_calls(server: FakeServer, use: object) -> None:
    """A LazyFrame's schema is known without calling the endpoint (return_dtype is given)."""
    lf = pl.LazyFrame({"q": ["x"]}).with_columns(
        a=pl.col("q").llm.complete(), b=pl.col("q").llm.complete(details=True)
    )
    schema = lf.collect_schema()
    assert schema["a"] == pl.String
    assert schema["b"] == pl.Struct(
        {
            "value": pl.String,
            "error": pl.String,
            "cached": pl.Boolean,
            "prompt_tokens": pl.Int64,
            "completion_tokens": pl.Int64,
            "finish_reason": pl.String,
        }
    )
    assert server.stats().calls == 0


def test_works_inside_a_running_event_loop(server: FakeServer, use: object) -> None:
    """Called from a coroutine (as in a Jupyter cell), it runs without asyncio.run errors."""
    df = pl.DataFrame({"q": ["a", "b"]})

    async def cell() -> pl.DataFrame:
        return df.with_columns(a=pl.col("q").llm.complete("Say {q}"))

    out = asyncio.run(cell())
    assert out["a"].to_list() == ["echo: Say a", "echo: Say b"]


def test_several_columns_in_one_template(server: FakeServer, use: object) -> None:
    """polars_llm.prompt renders placeholders over several columns, casting non-strings."""
    df = pl.DataFrame({"title": ["Dune", "Emma"], "year": [1965, 1815]})
    out = df.with_columns(t=polars_llm.prompt("Tagline for '{title}' ({year})").llm.complete())
    assert out["t"].to_list() == [
        "echo: Tagline for 'Dune' (1965)",
        "echo: Tagline for 'Emma' (1815)",
    ]


def test_template_uses_the_expression_itself(server: FakeServer, use: object) -> None:
    """The namespace's own expression fills its placeholder, transformations included."""
    df = pl.DataFrame({"q": ["  Hello  "]})
    out = df.with_columns(a=pl.col("q").str.strip_chars().llm.complete("Say {q}"))
    assert out["a"][0] == "echo: Say Hello"


def test_parameters_reach_the_endpoint(server: FakeServer, use: object) -> None:
    """system, temperature, max_tokens and extra parameters are sent in the body."""
    df = pl.DataFrame({"q": ["hi"]})
    df.with_columns(
        a=pl.col("q").llm.complete(
            "Say {q}", model="m1", system="Be brief.", temperature=0.2, max_tokens=50, seed=7
        )
    )
    body = server.history[-1]
    assert body["model"] == "m1"
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Say hi"},
    ]
    assert (body["temperature"], body["max_tokens"], body["seed"]) == (0.2, 50, 7)


def test_changed_parameters_are_not_served_from_cache(server: FakeServer, use: object) -> None:
    """Changing the model, system prompt or a parameter makes a new request, not a stale hit."""
    df = pl.DataFrame({"q": ["hi"]})
    for expr in (
        pl.col("q").llm.complete(),
        pl.col("q").llm.complete(model="other"),
        pl.col("q").llm.complete(system="s"),
        pl.col("q").llm.complete(temperature=0.5),
        pl.col("q").llm.complete(temperature=0.5),
    ):
        df.with_columns(a=expr)
    assert server.stats().calls == 4


def test_endpoint_from_the_environment(server: FakeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """OPENAI_BASE_URL and OPENAI_API_KEY are read at call time."""
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", "env-key")
    out = pl.DataFrame({"q": ["x"]}).with_columns(a=pl.col("q").llm.complete())
    assert out["a"][0] == "echo: x"


def test_endpoint_as_arguments(server: FakeServer) -> None:
    """base_url and api_key given to the method win over everything else."""
    out = pl.DataFrame({"q": ["x"]}).with_columns(
        a=pl.col("q").llm.complete(base_url=server.base_url, api_key="k")
    )
    assert out["a"][0] == "echo: x"


@pytest.mark.parametrize(
    ("template", "fragment"),
    [
        ("Say {q", "malformed prompt template"),
        ("Say {q:>10}", "format specs and conversions are not supported"),
        ("Say {q!r}", "format specs and conversions are not supported"),
    ],
)
def test_bad_templates_say_what_to_fix(template: str, fragment: str) -> None:
    """A malformed template raises TemplateError with a hint, before any data is seen."""
    with pytest.raises(polars_llm.TemplateError, match=fragment):
        pl.col("q").llm.complete(template)


def test_malformed_endpoint_is_a_config_error() -> None:
    """A base_url that is not an http(s) URL is refused with a message, not retried."""
    with pytest.raises(polars_llm.ConfigError, match="not an http"):
        pl.DataFrame({"q": ["x"]}).with_columns(
            a=pl.col("q").llm.complete(base_url="localhost:8000")
        )


def test_a_new_endpoint_opens_up_once_the_first_answer_is_in() -> None:
    """With no limit configured, one request goes first so that its rate-limit headers can
    space the rest; once it answers, the batch fills the whole concurrency."""
    with FakeServer(latency=0.5) as server:
        polars_llm.configure(base_url=server.base_url, api_key="k", concurrency=32)
        pl.DataFrame({"q": [f"q{i}" for i in range(40)]}).with_columns(a=pl.col("q").llm.complete())
    assert server.stats().max_in_flight >= 24


def test_numbers_are_sent_as_text_without_a_template(server: FakeServer, use: object) -> None:
    """A numeric column used as the prompt itself is sent as text."""
    out = pl.DataFrame({"n": [7, 42]}).with_columns(a=pl.col("n").llm.complete())
    assert out["a"].to_list() == ["echo: 7", "echo: 42"]


def test_embeddings_on_the_embedded_model_are_refused_upfront() -> None:
    """The embedded model serves no embeddings: embed says so instead of failing row by row."""
    with pytest.raises(polars_llm.ConfigError, match="not embeddings"):
        pl.DataFrame({"t": ["x"]}).with_columns(
            v=pl.col("t").llm.embed(model="local", dimensions=4)
        )


CHILD_AFTER_FORK = """
import asyncio, multiprocessing as mp, sys
from polars_llm.cache import open_cache
from polars_llm.engine import engine_loop

async def answer():
    await asyncio.sleep(0)
    return 42

def child(folder, queue):
    # Polars itself is not fork-safe once its thread pool has run a query (it advises the
    # spawn start method), so the child exercises polars-llm's own process-wide parts.
    cache = open_cache(folder)
    cache.put("k", {"text": "child"})
    cache.flush()
    queue.put((engine_loop().run(answer()), cache.get("k")["text"]))

if __name__ == "__main__":
    folder = sys.argv[1]
    assert engine_loop().run(answer()) == 42
    cache = open_cache(folder)
    cache.put("p", {"text": "parent"})
    cache.flush()
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=child, args=(folder, queue))
    proc.start()
    print(*queue.get(timeout=60))
    proc.join(timeout=60)
    print(proc.exitcode)
"""


def test_a_forked_child_process_works(tmp_path: Path) -> None:
    """After a fork, the child starts its own engine loop and cache writer instead of hanging."""
    import subprocess
    import sys

    script = tmp_path / "fork_child.py"
    script.write_text(CHILD_AFTER_FORK)
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "cache")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["42", "child", "0"]
