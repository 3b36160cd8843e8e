"""Both transports against the fake server over real HTTP: answers, error mapping, rate-limit
headers, and the bounds on every request (whole-request timeout, body size cap, bad bytes)."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import polars as pl
import pytest

import polars_llm
from polars_llm import transport as transport_module
from polars_llm.errors import (
    AuthError,
    BadRequest,
    ConnectionFailed,
    ContentError,
    ModelNotFound,
    QuotaExceeded,
    RateLimited,
    RequestTimeout,
    RowError,
    ServerError,
)
from polars_llm.testing import FakeServer, embedding_vector, estimate_tokens
from polars_llm.transport import (
    CHAT_BODY_CAP,
    AiohttpTransport,
    Completion,
    Embeddings,
    TransportKind,
    make_transport,
)

KINDS: list[TransportKind] = ["aiohttp", "openai"]


def body(prompt: str = "hello", **params: Any) -> dict[str, Any]:
    return {"model": "fake-model", "messages": [{"role": "user", "content": prompt}], **params}


def chat(
    kind: TransportKind, base_url: str, request: dict[str, Any], *, key: str = "k", timeout=5.0
) -> Completion | RowError:
    """One chat request through a fresh transport: its answer, or the RowError it raised."""

    async def go() -> Completion | RowError:
        transport = make_transport(kind, base_url, key, timeout, 4)
        try:
            return await transport.chat(request)
        except RowError as e:
            return e
        finally:
            await transport.aclose()

    return asyncio.run(go())


def embed(kind: TransportKind, base_url: str, inputs: list[str]) -> Embeddings | RowError:
    async def go() -> Embeddings | RowError:
        transport = make_transport(kind, base_url, "k", 5.0, 4)
        try:
            return await transport.embed("fake-model", inputs, {})
        except RowError as e:
            return e
        finally:
            await transport.aclose()

    return asyncio.run(go())


# --------------------------------------------------------------------------------------------
# Answers
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_chat_answer_text_reason_and_usage(kind: TransportKind, server: FakeServer) -> None:
    """A chat answer comes back with its text, finish reason and token counts."""
    answer = chat(kind, server.base_url, body("hi there"))
    assert isinstance(answer, Completion)
    assert answer.text == "echo: hi there"
    assert answer.finish_reason == "stop"
    assert answer.prompt_tokens == estimate_tokens("hi there")
    assert answer.completion_tokens == estimate_tokens("echo: hi there")


@pytest.mark.parametrize("kind", KINDS)
def test_completion_carries_the_rate_limit_headers(kind: TransportKind) -> None:
    """The x-ratelimit-* headers of an answer are on the Completion, names lower-cased."""
    with FakeServer(rpm=600, tpm=100_000) as server:
        answer = chat(kind, server.base_url, body())
    assert isinstance(answer, Completion)
    assert answer.headers["x-ratelimit-limit-requests"] == "600"
    assert answer.headers["x-ratelimit-limit-tokens"] == "100000"
    assert int(answer.headers["x-ratelimit-remaining-requests"]) < 600
    assert all(name.startswith("x-ratelimit-") for name in answer.headers)


@pytest.mark.parametrize("kind", KINDS)
def test_embeddings_in_input_order(kind: TransportKind, server: FakeServer) -> None:
    """Embeddings of several inputs come back as float vectors in input order."""
    answer = embed(kind, server.base_url, ["a", "b", "c"])
    assert isinstance(answer, Embeddings)
    assert answer.vectors == [embedding_vector(t, 8) for t in ("a", "b", "c")]
    assert answer.prompt_tokens == estimate_tokens("abc")


# --------------------------------------------------------------------------------------------
# Errors: one mapping for both transports
# --------------------------------------------------------------------------------------------
STATUS_CASES: dict[str, tuple[dict[str, Any], dict[str, Any], type[RowError], int]] = {
    "bad key": ({"api_key": "right"}, {}, AuthError, 401),
    "unknown model": ({"models": ["other"]}, {}, ModelNotFound, 404),
    "out of quota": ({"quota_exhausted": True}, {}, QuotaExceeded, 429),
    "server error": ({"error_rate": 1.0, "seed": 1}, {}, ServerError, 500),
    "refused request": ({}, {"stream": True}, BadRequest, 400),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", STATUS_CASES, ids=list(STATUS_CASES))
def test_http_status_becomes_our_error(kind: TransportKind, case: str) -> None:
    """Each HTTP error status becomes the same RowError, with its status, on both transports."""
    server_kwargs, params, error_type, status = STATUS_CASES[case]
    with FakeServer(**server_kwargs) as server:
        answer = chat(kind, server.base_url, body(**params))
    assert type(answer) is error_type
    assert isinstance(answer, RowError)
    assert answer.status in (status, 503 if status == 500 else status)


@pytest.mark.parametrize("kind", KINDS)
def test_429_carries_the_servers_retry_after(kind: TransportKind) -> None:
    """A 429 becomes RateLimited with the wait the server's retry-after-ms asks for."""
    with FakeServer(rpm=60) as server:  # one a second, a bucket of one
        first = chat(kind, server.base_url, body())
        second = chat(kind, server.base_url, body())
    assert isinstance(first, Completion)
    assert isinstance(second, RateLimited)
    assert second.retry_after is not None and 0 < second.retry_after <= 1.0


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("kind", KINDS)
def test_refused_connection_is_connection_failed(kind: TransportKind) -> None:
    """Nothing listening at the endpoint gives ConnectionFailed naming the endpoint."""
    url = f"http://127.0.0.1:{closed_port()}/v1"
    answer = chat(kind, url, body())
    assert isinstance(answer, ConnectionFailed)
    assert url in answer.message


# --------------------------------------------------------------------------------------------
# Bounds: the whole request, the body's size, its bytes
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_dripping_body_ends_at_the_timeout(kind: TransportKind) -> None:
    """A body that comes one byte a second ends in RequestTimeout: the timeout covers the body."""
    with FakeServer(broken_answers={"slow": "drip"}) as server:
        answer = chat(kind, server.base_url, body("slow"), timeout=1.0)
    # The body is hundreds of bytes long: read to its end it would have been an answer.
    assert isinstance(answer, RequestTimeout)


@pytest.mark.parametrize("kind", KINDS)
def test_endless_body_is_cut_at_the_cap(kind: TransportKind) -> None:
    """A chat body that never ends stops at the documented cap with a ContentError."""
    with FakeServer(broken_answers={"more": "endless"}) as server:
        answer = chat(kind, server.base_url, body("more"), timeout=60.0)
        after = chat(kind, server.base_url, body("fine"))
    assert isinstance(answer, ContentError)
    assert f"{CHAT_BODY_CAP // (1024 * 1024)} MiB" in answer.message
    assert isinstance(after, Completion)  # the server (and a new connection) still work


@pytest.mark.parametrize("kind", KINDS)
def test_invalid_utf8_is_a_content_error(kind: TransportKind) -> None:
    """An answer holding bytes that are not UTF-8 is a ContentError that says so."""
    with FakeServer(broken_answers={"bytes": "invalid-utf8"}) as server:
        answer = chat(kind, server.base_url, body("bytes"))
    assert isinstance(answer, ContentError)
    assert "UTF-8" in answer.message


@pytest.mark.parametrize("kind", KINDS)
def test_lone_surrogate_is_a_content_error(kind: TransportKind) -> None:
    """An answer holding a lone surrogate escape (\\ud800) is a ContentError that says so."""
    with FakeServer(reply=lambda b: "half \ud800 a pair") as server:
        answer = chat(kind, server.base_url, body())
    assert isinstance(answer, ContentError)
    assert "surrogate" in answer.message


@pytest.mark.parametrize("kind", KINDS)
def test_garbage_usage_counts_zero_and_keeps_the_answer(kind: TransportKind) -> None:
    """A usage field whose counts are not numbers counts 0 tokens; the text is kept."""
    with FakeServer(broken_answers={"count": "bad-usage"}) as server:
        answer = chat(kind, server.base_url, body("count"))
    assert isinstance(answer, Completion)
    assert answer.text == "echo: count"
    assert (answer.prompt_tokens, answer.completion_tokens) == (0, 0)


# --------------------------------------------------------------------------------------------
# Through the public API: a bad answer affects only its row
# --------------------------------------------------------------------------------------------
def point(server: FakeServer, kind: TransportKind, **changes: object) -> None:
    polars_llm.configure(
        base_url=server.base_url,
        api_key="k",
        backoff_base=0.01,
        transport=kind,
        on_error="null",
        **changes,
    )


def surrogate_for_q1(request: dict[str, Any]) -> str:
    prompt = request["messages"][-1]["content"]
    return "bad \ud800" if prompt == "q1" else f"echo: {prompt}"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("broken", ["invalid-utf8", "endless", "surrogate"])
def test_bad_answer_fails_only_its_row(kind: TransportKind, broken: str) -> None:
    """One broken answer among good ones is that row's ContentError; the other rows keep their
    values, and a rerun asks again for that row only (nothing broken reached the cache)."""
    server_kwargs: dict[str, Any] = (
        {"reply": surrogate_for_q1} if broken == "surrogate" else {"broken_answers": {"q1": broken}}
    )
    df = pl.DataFrame({"q": ["q0", "q1", "q2"]})
    with FakeServer(**server_kwargs) as server:
        point(server, kind, timeout=60.0)
        out = df.with_columns(a=pl.col("q").llm.complete(details=True)).unnest("a")
        server.reset_stats()
        df.with_columns(a=pl.col("q").llm.complete(details=True))
        rerun = server.stats()
    assert out["value"].to_list() == ["echo: q0", None, "echo: q2"]
    errors = out["error"].to_list()
    assert errors[0] is None and errors[2] is None
    assert errors[1].startswith("ContentError:")
    assert rerun.prompts == {"q1": 1}


@pytest.mark.parametrize("kind", KINDS)
def test_garbage_usage_keeps_the_rows_value(kind: TransportKind) -> None:
    """A garbage usage field keeps the row's answer and counts its tokens as 0."""
    with FakeServer(broken_answers={"q1": "bad-usage"}) as server:
        point(server, kind)
        out = (
            pl.DataFrame({"q": ["q0", "q1"]})
            .with_columns(a=pl.col("q").llm.complete(details=True))
            .unnest("a")
        )
    assert out["value"].to_list() == ["echo: q0", "echo: q1"]
    assert out["error"].to_list() == [None, None]
    assert out["prompt_tokens"][1] == 0
    assert out["prompt_tokens"][0] > 0


@pytest.mark.parametrize("kind", KINDS)
def test_dripping_body_row_times_out_through_the_api(kind: TransportKind) -> None:
    """With timeout=1 and one attempt, a row whose body drips gets RequestTimeout; the others
    are answered."""
    with FakeServer(broken_answers={"q1": "drip"}) as server:
        point(server, kind, timeout=1.0, max_attempts=1)
        out = (
            pl.DataFrame({"q": ["q0", "q1"]})
            .with_columns(a=pl.col("q").llm.complete(details=True))
            .unnest("a")
        )
    assert out["value"].to_list() == ["echo: q0", None]
    assert out["error"][1].startswith("RequestTimeout:")


def test_a_filling_pool_lets_requests_at_it_a_few_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While its pool fills, the transport lets at most OPENING requests at a time look for a
    connection, so the first ones are sent before the others are half made; every request is
    answered, and once the pool has filled nothing waits any more."""
    looking = most = 0
    connect = transport_module._FillingConnector.connect

    async def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal looking, most
        looking += 1
        most = max(most, looking)
        try:
            return await connect(self, *args, **kwargs)
        finally:
            looking -= 1

    monkeypatch.setattr(transport_module._FillingConnector, "connect", counted)
    concurrency = 4 * transport_module.OPENING

    async def main(base_url: str) -> tuple[list[str | None], int]:
        transport = make_transport("aiohttp", base_url, "k", 10.0, concurrency)
        assert isinstance(transport, AiohttpTransport)
        try:
            first = await asyncio.gather(
                *(transport.chat(body(f"p{i}")) for i in range(concurrency))
            )
            filling_most = most
            assert transport._connector is not None and transport._connector.filling <= 0
            again = await asyncio.gather(
                *(transport.chat(body(f"q{i}")) for i in range(concurrency))
            )
            return [c.text for c in first + again], filling_most
        finally:
            await transport.aclose()

    with FakeServer(latency=0.05) as server:
        texts, filling_most = asyncio.run(main(server.base_url))
    assert texts == [f"echo: p{i}" for i in range(concurrency)] + [
        f"echo: q{i}" for i in range(concurrency)
    ]
    assert 1 < filling_most <= transport_module.OPENING


def test_a_request_whose_turn_never_comes_goes_anyway(monkeypatch: pytest.MonkeyPatch) -> None:
    """Behind OPENING requests stuck connecting, a request waits OPENING_WAIT, then goes."""
    monkeypatch.setattr(transport_module, "OPENING_WAIT", 0.05)

    async def main(base_url: str) -> str | None:
        transport = make_transport("aiohttp", base_url, "k", 10.0, 64)
        assert isinstance(transport, AiohttpTransport)
        try:
            connector = transport._open().connector
            assert isinstance(connector, transport_module._FillingConnector)
            for _ in range(transport_module.OPENING):  # every turn held by a stuck request
                await connector._gate.acquire()
            return (await transport.chat(body("late"))).text
        finally:
            await transport.aclose()

    with FakeServer() as server:
        assert asyncio.run(main(server.base_url)) == "echo: late"
