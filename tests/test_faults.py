"""Faults and limits end to end: real HTTP to the fake server, rate limits, 5xx, hangs, resets,
bad keys and models, unreachable endpoints, per-row errors and reruns after failure."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import polars as pl
import pytest

import polars_llm
from polars_llm.endpoint import NEVER_REACHED_ATTEMPTS, REFUSALS_BEFORE_STOP
from polars_llm.errors import TooManyFailures
from polars_llm.settings import Settings
from polars_llm.testing import FakeServer
from polars_llm.transport import AiohttpTransport, OpenAITransport

# Faults that the transport sees, run through each of them.
TRANSPORTS = pytest.mark.parametrize("transport", ["aiohttp", "openai"])


def point(server: FakeServer, **changes: object) -> Settings:
    """Aim the process-wide settings at ``server``, with fast retries unless told otherwise."""
    return polars_llm.configure(
        **{"base_url": server.base_url, "api_key": "test-key", "backoff_base": 0.01, **changes}
    )


def frame(n: int, prefix: str = "q") -> pl.DataFrame:
    return pl.DataFrame({"q": [f"{prefix}{i}" for i in range(n)]})


def non_200(counts: dict[int, int]) -> int:
    return sum(n for status, n in counts.items() if status != 200)


# --------------------------------------------------------------------------------------------
# Rate limits
# --------------------------------------------------------------------------------------------
def test_client_told_the_rpm_draws_fewer_than_one_percent_429s() -> None:
    """With the server's RPM limit given to the client, under 1% of 300 requests get a 429."""
    with FakeServer(rpm=6000) as server:
        point(server, rpm=6000)
        out = frame(300).with_columns(a=pl.col("q").llm.complete("Say {q}"))
        counts = server.stats().status_counts
    assert out["a"].null_count() == 0
    assert counts.get(200) == 300  # 3x the server's burst: the limit was really in play
    assert counts.get(429, 0) < 3


def test_client_told_the_tpm_stays_under_the_servers_token_limit() -> None:
    """With the server's TPM limit given to the client, under 1% of the requests get a 429."""
    tpm = 360_000  # 6,000 tokens a second: about 60 requests of 100 tokens
    with FakeServer(tpm=tpm) as server:
        point(server, tpm=tpm)
        texts = [f"{i:04d} " + "x" * 395 for i in range(200)]
        out = pl.DataFrame({"q": texts}).with_columns(a=pl.col("q").llm.complete())
        stats = server.stats()
    assert out["a"].null_count() == 0
    assert stats.tokens > 3 * tpm / 60  # more than three times the server's burst was sent
    assert stats.status_counts.get(429, 0) < 2


@TRANSPORTS
def test_retry_after_is_honoured(transport: str) -> None:
    """After a 429 with retry-after-ms the next attempt waits that long and then succeeds."""
    # One request every 2 s, a bucket of one; no x-ratelimit-* headers, or the client would
    # learn the limit and never draw the 429 this test is about.
    with FakeServer(rpm=30, rate_headers=False) as server:
        point(server, transport=transport)
        start = time.monotonic()
        frame(1, "first").with_columns(a=pl.col("q").llm.complete())  # takes the only token
        before = time.monotonic()
        out = frame(1, "second").with_columns(a=pl.col("q").llm.complete())
        elapsed = time.monotonic() - before
        counts = server.stats().status_counts
    assert out["a"].to_list() == ["echo: second0"]
    # The server advertised the time until its bucket refills: 2 s after the first request was
    # admitted, which happened after `start`.
    advertised = 2.0 - (before - start)
    assert elapsed >= advertised - 0.05
    # Had the retry not waited that long (backoff is 0.01 s here, and a 429 that names no wait
    # pauses 1 s), it would have drawn more 429s.
    assert counts == {200: 2, 429: 1}


# --------------------------------------------------------------------------------------------
# Transient faults
# --------------------------------------------------------------------------------------------
@TRANSPORTS
def test_5xx_and_hangs_every_row_gets_a_value_without_extra_calls(transport: str) -> None:
    """With 10% 5xx and 2% hangs, 2,000 rows all get a value; calls = prompts + failed attempts."""
    rows = 2000
    with FakeServer(error_rate=0.1, hang_rate=0.02, seed=7) as server:
        # timeout bounds the whole request: 2 s leaves a loaded machine room to answer in time.
        point(server, timeout=2.0, transport=transport)
        out = frame(rows).with_columns(a=pl.col("q").llm.complete("Say {q}"))
        stats = server.stats()
    assert out["a"].to_list() == [f"echo: Say q{i}" for i in range(rows)]
    counts = stats.status_counts
    hangs = stats.chat_calls - sum(counts.values())  # hung requests end without a status
    server_errors = counts.get(500, 0) + counts.get(503, 0)
    assert counts.get(200) == rows  # no prompt was answered twice
    assert server_errors > 0
    assert hangs > 0
    assert stats.chat_calls == rows + non_200(counts) + hangs
    assert len(stats.prompts) == rows
    # The extra calls are the injected faults (12% of calls), not more.
    assert (stats.chat_calls - rows) / stats.chat_calls < 0.16


@TRANSPORTS
def test_connection_resets_are_retried_to_success(transport: str) -> None:
    """Connections reset by the server are retried until every row has its value."""
    with FakeServer(reset_rate=0.2, seed=3) as server:
        point(server, transport=transport)
        out = frame(300).with_columns(a=pl.col("q").llm.complete("Say {q}"))
        counts = server.stats().status_counts
    assert out["a"].to_list() == [f"echo: Say q{i}" for i in range(300)]
    assert counts.get(0, 0) > 0  # resets really happened
    assert counts.get(200) == 300


# --------------------------------------------------------------------------------------------
# Fatal errors stop the batch
# --------------------------------------------------------------------------------------------
@TRANSPORTS
def test_bad_key_aborts_after_a_handful_of_calls(transport: str) -> None:
    """A wrong API key stops a 1,000-row job within the first round of the concurrency (a 401
    is not billed), with a message about the key."""
    with FakeServer(api_key="right-key") as server:
        point(server, api_key="wrong-key", transport=transport)
        with pytest.raises(polars_llm.BatchAborted, match="API key"):
            frame(1000).with_columns(a=pl.col("q").llm.complete("Say {q}"))
        assert server.stats().calls <= polars_llm.get_settings().concurrency


def test_bad_key_aborts_even_with_on_error_null() -> None:
    """on_error='null' does not turn a wrong key into 1,000 null rows: the batch still stops."""
    with FakeServer(api_key="right-key") as server:
        point(server, api_key="wrong-key", on_error="null")
        with pytest.raises(polars_llm.BatchAborted, match="API key"):
            frame(1000).with_columns(a=pl.col("q").llm.complete("Say {q}", details=True))
        assert server.stats().calls <= polars_llm.get_settings().concurrency


@TRANSPORTS
def test_unknown_model_aborts_after_a_handful_of_calls(transport: str) -> None:
    """An unknown model (404) stops a 1,000-row job within the first round of the
    concurrency, naming the model."""
    with FakeServer(models=["real-model"]) as server:
        point(server, transport=transport)
        with pytest.raises(polars_llm.BatchAborted, match="model") as info:
            frame(1000).with_columns(a=pl.col("q").llm.complete("Say {q}", model="no-such-model"))
        assert "no-such-model" in str(info.value)
        assert server.stats().calls <= polars_llm.get_settings().concurrency


# --------------------------------------------------------------------------------------------
# Per-row errors: on_error and details
# --------------------------------------------------------------------------------------------
def empty_for_odd(body: dict) -> str:
    """A reply that is empty for prompts ending in an odd digit."""
    prompt = body["messages"][-1]["content"]
    return "" if int(prompt[-1]) % 2 else f"echo: {prompt}"


def test_details_keep_each_failed_rows_error() -> None:
    """With on_error='null' and details=True a failed row has a null value and its error text."""
    with FakeServer(reply=empty_for_odd) as server:
        point(server, on_error="null")
        out = frame(10).with_columns(a=pl.col("q").llm.complete("Say {q}", details=True))
    a = out["a"].struct.unnest()
    assert a["value"].to_list() == [None if i % 2 else f"echo: Say q{i}" for i in range(10)]
    errors = a["error"].to_list()
    assert all(e is None for e in errors[0::2])
    assert all(e is not None and e.startswith("EmptyCompletion:") for e in errors[1::2])


def test_exhausted_retries_are_each_rows_error() -> None:
    """With max_attempts=1 and every call failing, each row's error names the 5xx; no retries."""
    with FakeServer(error_rate=1.0) as server:
        point(server, on_error="null", max_attempts=1)
        out = frame(20).with_columns(a=pl.col("q").llm.complete("Say {q}", details=True))
        calls = server.stats().chat_calls
    a = out["a"].struct.unnest()
    assert a["value"].null_count() == 20
    assert all("ServerError" in e and "gave up after 1 attempt" in e for e in a["error"])
    assert calls == 20


def test_error_field_is_a_null_string_when_nothing_fails(server: FakeServer, use: object) -> None:
    """details=True gives an error field of dtype String, null on every row, when all succeed."""
    out = frame(3).with_columns(a=pl.col("q").llm.complete("Say {q}", details=True))
    a = out["a"].struct.unnest()
    assert a.schema["error"] == pl.String
    assert a["error"].null_count() == 3
    assert a["value"].to_list() == ["echo: Say q0", "echo: Say q1", "echo: Say q2"]


def test_null_without_details_warns_and_gives_null_rows() -> None:
    """on_error='null' without details warns once and leaves the failed rows null."""
    with FakeServer(reply=empty_for_odd) as server:
        point(server, on_error="null")
        with pytest.warns(UserWarning, match="5 of 10 unique prompt"):
            out = frame(10).with_columns(a=pl.col("q").llm.complete("Say {q}"))
    assert out["a"].to_list() == [None if i % 2 else f"echo: Say q{i}" for i in range(10)]


def test_raise_says_how_many_failed() -> None:
    """on_error='raise' raises TooManyFailures whose message and fields give the count."""
    with FakeServer(reply=empty_for_odd) as server:
        point(server)
        with pytest.raises(TooManyFailures, match="5 of 10 unique prompt") as info:
            frame(10).with_columns(a=pl.col("q").llm.complete("Say {q}"))
    assert "EmptyCompletion" in str(info.value)


def test_rerun_after_partial_failure_sends_only_the_failed_rows() -> None:
    """A rerun on a healed server calls only for the rows that failed the first time."""
    with FakeServer(error_rate=0.3, seed=11) as server:
        point(server, on_error="null", max_attempts=1)
        df = frame(200)
        first = df.with_columns(a=pl.col("q").llm.complete("Say {q}", details=True))
        failed = first["a"].struct.field("value").null_count()
        assert 0 < failed < 200
        server.error_rate = 0.0  # the server heals
        server.reset_stats()
        second = df.with_columns(a=pl.col("q").llm.complete("Say {q}", details=True))
        stats = server.stats()
    assert stats.chat_calls == failed
    failed_prompts = {
        f"Say {q}"
        for q, v in zip(df["q"], first["a"].struct.field("value"), strict=True)
        if v is None
    }
    assert set(stats.prompts) == failed_prompts
    assert second["a"].struct.field("value").to_list() == [f"echo: Say q{i}" for i in range(200)]


# --------------------------------------------------------------------------------------------
# Content problems
# --------------------------------------------------------------------------------------------
def test_empty_completion_is_the_rows_error() -> None:
    """An empty answer is an EmptyCompletion error for that row, not an empty string."""
    with FakeServer(reply=lambda body: "") as server:
        point(server, on_error="null")
        out = frame(2).with_columns(a=pl.col("q").llm.complete(details=True))
    a = out["a"].struct.unnest()
    assert a["value"].to_list() == [None, None]
    assert all(e.startswith("EmptyCompletion:") for e in a["error"])


def test_truncated_answer_is_an_error_when_asked() -> None:
    """finish_reason 'length' is a Truncated error with truncated_is_error=True."""
    with FakeServer() as server:
        point(server, on_error="null", truncated_is_error=True)
        out = frame(1, "a long question " * 10).with_columns(
            a=pl.col("q").llm.complete(max_tokens=3, details=True)
        )
    a = out["a"].struct.unnest()
    assert a["value"].to_list() == [None]
    assert a["error"][0].startswith("Truncated:")


def test_truncated_answer_is_a_value_by_default() -> None:
    """By default an answer cut at max_tokens is still the row's value."""
    with FakeServer() as server:
        point(server)
        out = frame(1, "a long question " * 10).with_columns(
            a=pl.col("q").llm.complete(max_tokens=3, details=True)
        )
    a = out["a"].struct.unnest()
    assert a["error"].to_list() == [None]
    assert a["value"][0] == "echo: a long"  # the fake server keeps max_tokens * 4 characters


@pytest.fixture
def attempts(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Counts requests handed to either transport (a pass-through spy; HTTP runs unchanged)."""
    count = [0]
    for cls in (AiohttpTransport, OpenAITransport):
        real_chat = cls.chat

        async def counting_chat(self: object, body: dict, real_chat: Any = real_chat) -> object:
            count[0] += 1
            return await real_chat(self, body)

        monkeypatch.setattr(cls, "chat", counting_chat)
    yield count


def test_429_storm_finishes_every_row_and_the_client_pauses() -> None:
    """A server far slower than the client believes still gives every row a value, and the
    shared cooldown keeps the 429s far below rows x max_attempts."""
    rows = 200
    # 50 a second; the client is told nothing, not even in x-ratelimit-* headers.
    with FakeServer(rpm=3000, rate_headers=False) as server:
        point(server, on_error="null")
        out = frame(rows).with_columns(a=pl.col("q").llm.complete("Say {q}", details=True))
        counts = server.stats().status_counts
    errors = out["a"].struct.field("error").drop_nulls().to_list()
    assert errors == []
    assert out["a"].struct.field("value").null_count() == 0
    assert counts.get(200) == rows
    assert 0 < counts.get(429, 0) <= rows  # far fewer than rows x max_attempts (8 x rows)


def test_bad_key_on_an_endpoint_already_reached_aborts_fast() -> None:
    """A wrong key stops a 1,000-row job within one round of the concurrency even on an endpoint that has
    answered before (with another key)."""
    with FakeServer(api_key="right-key") as server:
        point(server, api_key="right-key")
        frame(1, "warm").with_columns(a=pl.col("q").llm.complete())
        server.reset_stats()
        point(server, api_key="revoked-key")
        with pytest.raises(polars_llm.BatchAborted, match="API key"):
            frame(1000).with_columns(a=pl.col("q").llm.complete("Say {q}"))
        assert server.stats().calls <= polars_llm.get_settings().concurrency


def test_unknown_model_on_an_endpoint_already_reached_aborts_fast() -> None:
    """A mistyped model stops a 1,000-row job within one round of the concurrency even when it has
    already served another model."""
    with FakeServer(models=["real-model"]) as server:
        point(server, model="real-model")
        frame(1, "warm").with_columns(a=pl.col("q").llm.complete())
        server.reset_stats()
        with pytest.raises(polars_llm.BatchAborted, match="no-such-model"):
            frame(1000).with_columns(a=pl.col("q").llm.complete("Say {q}", model="no-such-model"))
        assert server.stats().calls <= polars_llm.get_settings().concurrency


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@TRANSPORTS
def test_unreachable_endpoint_stops_after_bounded_attempts(
    attempts: list[int], transport: str
) -> None:
    """A closed port stops a 1,000-row job with a message about the endpoint, not row by row."""
    url = f"http://127.0.0.1:{closed_port()}/v1"
    settings = polars_llm.configure(
        base_url=url, api_key="k", backoff_base=0.01, max_attempts=4, transport=transport
    )
    with pytest.raises(polars_llm.BatchAborted, match="check the endpoint URL") as info:
        frame(1000).with_columns(a=pl.col("q").llm.complete("Say {q}"))
    assert url in str(info.value)
    # The first round of the concurrency, then a stop: not max_attempts x 1,000.
    assert attempts[0] <= settings.concurrency + NEVER_REACHED_ATTEMPTS


def test_too_many_failures_carries_the_counts() -> None:
    """TooManyFailures raised through Polars keeps its failed and total counts."""
    with FakeServer(reply=empty_for_odd) as server:
        point(server)
        with pytest.raises(TooManyFailures) as info:
            frame(10).with_columns(a=pl.col("q").llm.complete("Say {q}"))
    assert (info.value.failed, info.value.total) == (5, 10)


@TRANSPORTS
def test_exhausted_quota_stops_the_batch(transport: str) -> None:
    """A 429 insufficient_quota is not retried: the batch stops with a message about credit."""
    with FakeServer(quota_exhausted=True) as server:
        point(server, transport=transport)
        with pytest.raises(polars_llm.BatchAborted, match="out of quota"):
            frame(1000).with_columns(a=pl.col("q").llm.complete("Say {q}"))
        assert server.stats().calls <= polars_llm.get_settings().concurrency


def test_endpoint_dying_mid_run_stops_the_batch() -> None:
    """When every request fails after the endpoint has answered, a breaker stops the batch
    after a bounded number of calls instead of retrying every row."""
    answered = [0]

    def reply(body: dict) -> str:
        answered[0] += 1
        if answered[0] > 20:
            raise RuntimeError("the model server crashed")
        return "fine"

    with FakeServer(reply=reply) as server:
        point(server, concurrency=8, max_attempts=8)
        with pytest.raises(polars_llm.BatchAborted, match="in a row failed"):
            frame(2000).with_columns(a=pl.col("q").llm.complete("Say {q}"))
        calls = server.stats().calls
    # 20 successes, then the breaker (50 consecutive failures) plus what was in flight.
    assert calls <= 20 + 50 + 2 * 8


def test_requests_refused_before_any_success_stop_the_batch(server: FakeServer) -> None:
    """An endpoint that refuses the request's shape (400) before anything ever succeeded stops
    the batch after a few calls, instead of failing every row one by one."""
    point(server)
    with pytest.raises(polars_llm.BatchAborted, match="Unrecognized request argument"):
        frame(500).with_columns(
            a=pl.col("q").llm.complete("Say {q}", extra_body={"top_k": 5}, concurrency=4)
        )
    assert server.stats().calls <= 4 + REFUSALS_BEFORE_STOP


def test_truncated_answers_cached_earlier_are_not_served_when_they_became_errors(
    server: FakeServer,
) -> None:
    """An answer cut off at max_tokens, cached while that was accepted, is asked again once
    truncated_is_error is on (and then reported as Truncated)."""
    point(server)
    df = pl.DataFrame({"q": ["a rather long prompt that the fake server will echo back"]})
    kept = df.with_columns(a=pl.col("q").llm.complete(max_tokens=2))
    assert kept["a"][0] is not None
    calls = server.stats().calls
    point(server, truncated_is_error=True, on_error="null")
    out = df.with_columns(a=pl.col("q").llm.complete(max_tokens=2, details=True)).unnest("a")
    assert server.stats().calls == calls + 1
    assert out["error"][0].startswith("Truncated")


def test_a_short_timeout_ends_its_request_on_time_beside_longer_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Timeouts are kept by the endpoint's watchdog, not a timer per request: a request with a
    short timeout, sent while one with a long timeout is in flight, still ends at its own
    deadline, not at the watchdog's next regular look."""
    import asyncio

    from polars_llm import endpoint
    from polars_llm.errors import RequestTimeout
    from polars_llm.progress import Progress

    monkeypatch.setattr(endpoint, "WATCH_EVERY", 30.0)
    settings = Settings(base_url="http://127.0.0.1:9/v1", api_key="k", cache=False)
    ended: list[str] = []

    async def main() -> None:
        client = endpoint.EndpointClient(settings.base_url, "k", "m", settings)
        client.configure(settings)

        async def answer_late() -> str:
            await asyncio.sleep(1.0)
            return "late"

        async def hang() -> str:
            await asyncio.Event().wait()
            return "never"

        async def send(name: str, call: Any, timeout: float) -> None:
            policy = endpoint.RetryPolicy(timeout, 1, 60.0, 0.01, 0.01)
            try:
                await client.send(call, tokens=1, policy=policy, progress=Progress())
                ended.append(f"{name} answered")
            except RequestTimeout as e:
                assert f"({timeout:g} s)" in str(e)
                ended.append(f"{name} timed out")

        slow = asyncio.ensure_future(send("slow", answer_late, 20.0))
        await asyncio.sleep(0.05)
        await asyncio.gather(slow, send("short", hang, 0.1))
        await client.aclose()

    asyncio.run(main())
    assert ended == ["short timed out", "slow answered"]
