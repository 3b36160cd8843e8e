"""Engine v2: keywords, hung requests, bounded waits, Ctrl-C, single-flight, endpoint health."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import diskcache
import polars as pl
import pytest

import polars_llm
from polars_llm.cache import CacheWarning
from polars_llm.engine import START_STEP, Batch, CallSpec, engine_loop, gather_all
from polars_llm.options import CHAT_PARAMS
from polars_llm.testing import FakeServer, spawn_server

ROOT = Path(__file__).resolve().parent.parent


def frame(n: int, prefix: str = "q") -> pl.DataFrame:
    return pl.DataFrame({"q": [f"{prefix}{i}" for i in range(n)]})


# -- keywords --------------------------------------------------------------------------------
def test_setting_keywords_never_reach_the_request_body(server: FakeServer) -> None:
    """rpm=, timeout= and the other settings change behaviour and never go into the body."""
    out = frame(5).with_columns(
        a=pl.col("q").llm.complete(
            "{q}",
            base_url=server.base_url,
            api_key="k",
            rpm=1200,
            timeout=20,
            max_attempts=3,
            retry_budget=60,
            concurrency=4,
            temperature=0.1,
            seed=7,
        )
    )
    assert out["a"].to_list() == [f"echo: q{i}" for i in range(5)]
    for body in server.history:
        assert set(body) == {"model", "messages", "temperature", "seed"}


def test_an_unknown_keyword_is_refused_by_name(server: FakeServer) -> None:
    """A keyword that is neither a setting nor a request parameter names itself in the error."""
    with pytest.raises(polars_llm.ConfigError, match=r"'tempreature'.*did you mean 'temperature'"):
        pl.col("q").llm.complete(base_url=server.base_url, tempreature=0.2)
    with pytest.raises(polars_llm.ConfigError, match="'rpn'"):
        polars_llm.Step("s", "{q}", rpn=10)
    assert server.history == []


def test_provider_parameters_go_through_extra_body() -> None:
    """extra_body= puts provider-specific fields into the body as they are."""
    lenient = FakeServer(strict_params=False).start()
    try:
        frame(1).with_columns(
            a=pl.col("q").llm.complete(
                base_url=lenient.base_url, api_key="k", extra_body={"top_k": 5}
            )
        )
        assert lenient.history[0]["top_k"] == 5
    finally:
        lenient.stop()


def test_a_step_takes_settings_and_parameters_as_keywords(server: FakeServer) -> None:
    """Step(..., rpm=, timeout=, temperature=) splits them the same way as the methods."""
    step = polars_llm.Step("a", "{q}", rpm=600, timeout=30, temperature=0.3)
    assert dict(step.settings) == {"rpm": 600, "timeout": 30}
    assert dict(step.params) == {"temperature": 0.3}
    out = polars_llm.pipeline(
        frame(3),
        [step],
        settings=polars_llm.Settings(base_url=server.base_url, api_key="k"),
    )
    assert out["a"].to_list() == ["echo: q0", "echo: q1", "echo: q2"]
    assert {k for body in server.history for k in body} <= {"model", "messages"} | CHAT_PARAMS
    assert all("rpm" not in body and "timeout" not in body for body in server.history)


def test_configure_none_unsets_a_limit() -> None:
    """configure(rpm=None) removes the limit instead of being ignored."""
    polars_llm.configure(rpm=100)
    assert polars_llm.configure(rpm=None).rpm is None


def test_the_api_key_never_shows_in_repr() -> None:
    """repr(Settings) hides the key."""
    assert "sk-secret" not in repr(polars_llm.Settings(api_key="sk-secret"))


def test_a_wrongly_typed_setting_is_one_clear_error() -> None:
    """A setting of the wrong type (e.g. from a TOML file) names the setting and the type."""
    with pytest.raises(polars_llm.ConfigError, match="setting concurrency must be a whole number"):
        polars_llm.Settings(concurrency="8")  # type: ignore[arg-type]


def test_labels_given_as_one_string_are_refused() -> None:
    """labels="pos" is a mistake, not the labels p, o and s."""
    with pytest.raises(polars_llm.ConfigError, match="list of labels"):
        pl.col("q").llm.classify("pos")  # type: ignore[arg-type]


def test_a_named_remote_model_needs_an_endpoint() -> None:
    """With no endpoint configured, model="gpt-4o-mini" is an error, not the embedded model."""
    with pytest.raises(polars_llm.ConfigError, match=r"needs an endpoint.*model='local'"):
        frame(1).with_columns(a=pl.col("q").llm.complete(model="gpt-4o-mini"))


# -- hung requests and bounded waits ---------------------------------------------------------
@pytest.mark.timeout(150)
def test_hung_requests_never_freeze_a_batch() -> None:
    """With 5% of requests hanging for an hour and the default timeout, a 300-row job at
    concurrency 8 finishes: hung requests give back their slot and are hedged."""
    with FakeServer(latency=0.02, hang_rate=0.05, hang_seconds=3600, seed=3) as server:
        out = frame(300).with_columns(
            a=pl.col("q").llm.complete(
                base_url=server.base_url, api_key="k", concurrency=8, details=True
            )
        )
        stats = server.stats()
    values = out["a"].struct.field("value")
    assert values.null_count() == 0
    assert values.to_list() == [f"echo: q{i}" for i in range(300)]
    hung = stats.calls - stats.status_counts.get(200, 0)
    assert hung > 0  # the fault really happened
    assert stats.status_counts.get(200, 0) >= 300


@pytest.mark.timeout(120)
def test_a_huge_retry_after_is_capped() -> None:
    """A 429 asking to wait 100,000 s is capped: the batch finishes instead of sleeping a day."""
    with spawn_server(
        rpm=600, burst_seconds=0.2, retry_after="100000", rate_headers=False
    ) as server:
        out = frame(30).with_columns(
            a=pl.col("q").llm.complete(base_url=server.base_url, api_key="k", on_error="null")
        )
        counts = server.stats().status_counts
    assert counts.get(429, 0) > 0  # the server really asked for the long wait
    assert out["a"].null_count() == 0


def test_retry_after_never_outlives_the_retry_budget() -> None:
    """A row whose budget is shorter than the (capped) retry-after fails with its 429 at once."""
    with spawn_server(
        rpm=60, burst_seconds=0.02, retry_after="100000", rate_headers=False
    ) as server:
        out = frame(5).with_columns(
            a=pl.col("q").llm.complete(
                base_url=server.base_url,
                api_key="k",
                retry_budget=5,
                on_error="null",
                details=True,
            )
        )
    errors = out["a"].struct.field("error").drop_nulls().to_list()
    assert errors and all(e.startswith("RateLimited") for e in errors)


# -- one call per prompt, whatever the engine ------------------------------------------------
def test_streaming_engine_pays_once_per_unique_prompt() -> None:
    """The streaming engine runs the expression per morsel on several threads; a prompt
    repeated across morsels is still paid once."""
    unique = 400
    rows = 240_000  # several morsels
    with FakeServer(latency=0.01) as server:
        lf = pl.LazyFrame({"q": [f"p{i % unique}" for i in range(rows)]}).with_columns(
            a=pl.col("q").llm.complete(base_url=server.base_url, api_key="k")
        )
        out = lf.collect(engine="streaming")
        calls = server.stats().calls
    assert out.height == rows
    assert out["a"].null_count() == 0
    assert calls == unique


def test_a_request_in_flight_is_joined_not_sent_again(server: FakeServer) -> None:
    """Two expressions of one with_columns asking the same prompts share each call."""
    slow = FakeServer(latency=0.3).start()
    try:
        kw = {"base_url": slow.base_url, "api_key": "k", "cache": False}
        frame(20).with_columns(
            a=pl.col("q").llm.complete("{q}", **kw), b=pl.col("q").llm.complete("{q}", **kw)
        )
        assert slow.stats().calls == 20
    finally:
        slow.stop()


# -- endpoint health -------------------------------------------------------------------------
def test_a_bad_key_stops_every_batch_on_the_endpoint() -> None:
    """Two expressions on one endpoint with a revoked key both stop at the first answers: the
    calls stay within one round of the concurrency, not one per row."""
    with FakeServer(api_key="right") as server:
        kw = {"base_url": server.base_url, "api_key": "revoked", "concurrency": 8}
        with pytest.raises(polars_llm.BatchAborted, match="API key") as info:
            frame(1000).with_columns(
                a=pl.col("q").llm.complete("A {q}", **kw), b=pl.col("q").llm.complete("B {q}", **kw)
            )
        assert server.stats().calls <= 2 * 8
    assert isinstance(info.value.cause, polars_llm.errors.AuthError)


def test_idle_endpoint_clients_are_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The map of endpoint clients does not grow for the life of the process."""
    import polars_llm.engine as engine

    monkeypatch.setattr(engine, "IDLE_CLOSE", 0.0)
    with FakeServer() as server:
        for key in ("k1", "k2", "k3", "k4"):
            frame(2).with_columns(
                a=pl.col("q").llm.complete(base_url=server.base_url, api_key=key, cache=False)
            )
    assert len(engine_loop().endpoints) <= 2


def test_pipeline_stops_paying_once_it_has_failed(server: FakeServer) -> None:
    """When a pipeline fails mid-run, its remaining rows stop: no calls after it returned."""
    slow = FakeServer(latency=0.2).start()
    try:

        def fail(stats: object) -> None:
            raise RuntimeError("the caller gave up")

        with pytest.raises(RuntimeError, match="gave up"):
            polars_llm.pipeline(
                frame(400),
                [polars_llm.Step("a", "{q}")],
                settings=polars_llm.Settings(base_url=slow.base_url, api_key="k", concurrency=8),
                progress=fail,
            )
        time.sleep(0.5)
        calls = slow.stats().calls
        time.sleep(1.0)
        assert slow.stats().calls == calls < 400
    finally:
        slow.stop()


# -- Ctrl-C ----------------------------------------------------------------------------------
SIGINT_SCRIPT = textwrap.dedent(
    """
    import sys, threading, time
    import polars as pl
    import polars_llm

    base_url = sys.argv[1]
    df = pl.DataFrame({"q": [f"p{i}" for i in range(600)]})
    kw = dict(base_url=base_url, api_key="k", concurrency=4, cache=False)
    other = {}

    def second_thread():
        # Run on its own thread: Ctrl-C on the main thread leaves it alone. (A Polars query
        # that runs while the signal lands is cancelled by Polars itself, so this thread waits
        # in polars_llm.pipeline, which runs its steps outside any Polars query.)
        settings = polars_llm.Settings(**kw)
        other["out"] = polars_llm.pipeline(
            df.head(40), [polars_llm.Step("a", "{q}")], settings=settings
        )

    t = threading.Thread(target=second_thread)
    t.start()
    print("ready", flush=True)
    try:
        df.with_columns(a=pl.col("q").llm.complete("{q}", **kw))
    except KeyboardInterrupt:
        print("interrupted", time.monotonic(), flush=True)
    else:
        print("finished", flush=True)
    t.join()
    print("other", other["out"]["a"].null_count(), other["out"].height, flush=True)
    """
)


@pytest.mark.timeout(200)
def test_ctrl_c_stops_a_library_batch_and_spares_another_thread(tmp_path: Path) -> None:
    """SIGINT during with_columns in a script (no terminal) raises KeyboardInterrupt soon,
    long before the batch would end, while a second thread's batch over the same prompts
    completes."""
    script = tmp_path / "interrupt_me.py"
    script.write_text(SIGINT_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "POLARS_LLM_CACHE": "0"}
    with spawn_server(latency=0.2) as server:
        proc = subprocess.Popen(
            [sys.executable, str(script), server.base_url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(3.0)
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=150)
        calls = server.stats().calls
    lines = out.split("\n")
    assert lines[0].startswith("interrupted"), (out, err)
    took = float(lines[0].split()[1]) - sent
    # The batch alone would need 600 x 0.2 s / 4 = 30 s: it stopped well before, and sent far
    # fewer than its 600 prompts.
    assert calls < 600
    assert lines[1] == "other 0 40"
    print(f"KeyboardInterrupt {took:.2f} s after SIGINT; {calls} calls")


# -- the cache split -------------------------------------------------------------------------
@pytest.mark.parametrize("broken", [False, True], ids=["columns", "entry by entry"])
def test_cached_answers_come_back_in_row_order_and_odd_entries_are_asked_again(
    server: FakeServer, tmp_path: Path, broken: bool
) -> None:
    """Cached answers come back with their stored token counts and finish reasons, in row order
    with repeats and nulls; an entry of another shape is still read; damaged entries and cut-off
    answers (with truncated_is_error) are paid again. An entry that breaks the bulk decoding
    (``broken``) sends every entry the entry-by-entry way, to the same result."""
    settings = polars_llm.Settings(
        base_url=server.base_url,
        api_key="k",
        model="m",
        cache_dir=tmp_path,
        progress=False,
        truncated_is_error=True,
    )
    prompts = [f"p{i}" for i in range(7)]
    keys = Batch(CallSpec(settings=settings)).template.keys(prompts)
    entries = {
        0: '{"text":"zero","usage":[3,4],"finish":"stop"}',
        1: '{"text": "spaced", "usage": [5, 6], "finish": "stop"}',  # another writer's spacing
        2: "{not json",
        3: '{"text":"cut","usage":[1,2],"finish":"length"}',
        4: '{"text":null,"usage":[1,1]}',
    }
    if broken:
        entries[6] = '{"text":"never closed'
    with diskcache.Cache(str(tmp_path)) as raw:
        for i, text in entries.items():
            raw.set(keys[i], text)
    rows = ["p0", "p1", None, "p2", "p0", "p3", "p4", "p5", "p1", "p6"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CacheWarning)
        out = pl.DataFrame({"q": rows}).select(
            pl.col("q").llm.complete("{q}", settings=settings, details=True).struct.unnest()
        )
    assert out["value"].to_list() == [
        "zero",
        "spaced",
        None,
        "echo: p2",
        "zero",
        "echo: p3",
        "echo: p4",
        "echo: p5",
        "spaced",
        "echo: p6",
    ]
    assert out["cached"].to_list() == [True, True, None, False, True] + [False] * 3 + [True, False]
    assert out["prompt_tokens"].to_list()[:2] == [3, 5]
    assert out["completion_tokens"].to_list()[:2] == [4, 6]
    assert out["finish_reason"].to_list()[:2] == ["stop", "stop"]
    assert out["error"].null_count() == len(rows)
    assert sorted(b["messages"][-1]["content"] for b in server.history) == [
        "p2",
        "p3",
        "p4",
        "p5",
        "p6",
    ]


def test_a_finished_batch_keeps_nothing_alive(server: FakeServer, tmp_path: Path) -> None:
    """Once a cached run has returned, nothing of its batch stays in memory: the cache writer,
    waiting for the next answers, held its last group of answers and, through their owner, the
    whole batch with one outcome per prompt."""
    import gc

    from polars_llm.engine import Outcome

    def outcomes() -> int:
        gc.collect()
        return sum(type(o) is Outcome for o in gc.get_objects())

    before = outcomes()
    out = frame(500).with_columns(
        a=pl.col("q").llm.complete(
            "{q}", base_url=server.base_url, api_key="k", cache_dir=tmp_path / "cache"
        )
    )
    assert out["a"].null_count() == 0
    assert outcomes() - before < 50


# -- the engine's event loop -------------------------------------------------------------------
LOOP_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    import polars as pl
    import polars_llm
    from polars_llm.engine import engine_loop

    df = pl.DataFrame({"q": ["a", "b"]})
    out = df.with_columns(a=pl.col("q").llm.complete(base_url=sys.argv[1], api_key="k", cache=False))
    assert out["a"].null_count() == 0
    print(type(engine_loop().loop).__module__)
    # The program's own loops stay asyncio's.
    print(type(asyncio.new_event_loop()).__module__)
    """
)


def run_with_event_loop(choice: str, server: FakeServer) -> subprocess.CompletedProcess[str]:
    """LOOP_SCRIPT in a fresh process with ``$POLARS_LLM_EVENT_LOOP`` set to ``choice``."""
    return subprocess.run(
        [sys.executable, "-c", LOOP_SCRIPT, server.base_url],
        env={**os.environ, "POLARS_LLM_EVENT_LOOP": choice},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(("choice", "module"), [("", "uvloop"), ("asyncio", "asyncio.unix_events")])
def test_the_engine_loop_is_uvloops_unless_asked_for_asyncios(
    server: FakeServer, choice: str, module: str
) -> None:
    proc = run_with_event_loop(choice, server)
    assert proc.returncode == 0, proc.stderr
    engine, program = proc.stdout.split()
    assert engine.startswith(module)
    assert program == "asyncio.unix_events"


def test_an_unknown_event_loop_choice_is_a_clear_error(server: FakeServer) -> None:
    proc = run_with_event_loop("tokio", server)
    assert proc.returncode != 0
    assert "POLARS_LLM_EVENT_LOOP='tokio' is not a known event loop" in proc.stderr


def test_workers_start_a_step_at_a_time_and_a_failure_starts_no_more() -> None:
    """gather_all starts START_STEP workers per turn of the loop: the first ones run (and reach
    their connections) before the last are made. A worker that fails stops the starting."""
    made: list[int] = []

    async def worker(i: int, fail: bool) -> None:
        seen_at_start.append(len(made))
        if fail and i == 0:
            raise ValueError("the first worker failed")
        await asyncio.sleep(0.01)

    def workers(n: int, fail: bool) -> Iterator[Coroutine[Any, Any, None]]:
        for i in range(n):
            made.append(i)
            yield worker(i, fail)

    n = 8 * START_STEP
    seen_at_start: list[int] = []
    asyncio.run(gather_all(workers(n, fail=False)))
    assert len(seen_at_start) == n
    assert seen_at_start[0] <= START_STEP < n  # the first ran when a step of them was made
    made.clear()
    seen_at_start.clear()
    with pytest.raises(ValueError, match="first worker failed"):
        asyncio.run(gather_all(workers(n, fail=True)))
    assert len(made) <= 2 * START_STEP < n
