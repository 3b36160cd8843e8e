"""The fake OpenAI server, exercised through the real openai SDK and plain HTTP."""

from __future__ import annotations

import enum
import json
import math
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from pydantic import BaseModel

from polars_llm.testing import FakeServer, schema_example, spawn_server


class Color(enum.StrEnum):
    RED = "red"
    GREEN = "green"
    BLUE = "blue"


class Address(BaseModel):
    city: str
    zip_code: int


class Person(BaseModel):
    name: str
    age: int
    score: float
    active: bool
    color: Color
    home: Address
    nickname: str | None = None
    tags: list[str]
    past_homes: list[Address]


_open_clients: list[openai.OpenAI] = []


@pytest.fixture(autouse=True)
def close_clients():
    yield
    while _open_clients:
        _open_clients.pop().close()


def client(server, api_key: str = "x", **kwargs) -> openai.OpenAI:
    """A real SDK client without retries, closed after the test."""
    c = openai.OpenAI(base_url=server.base_url, api_key=api_key, max_retries=0, **kwargs)
    _open_clients.append(c)
    return c


def ask(c: openai.OpenAI, prompt: str, **kwargs):
    return c.chat.completions.create(
        model=kwargs.pop("model", "fake-model"),
        messages=[{"role": "user", "content": prompt}],
        **kwargs,
    )


def post_json(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read())


@pytest.fixture
def server():
    with FakeServer() as running:
        yield running


def test_chat_echoes_last_user_message_with_usage(server):
    """The default reply is "echo: " plus the last user message, with token usage."""
    response = client(server).chat.completions.create(
        model="some-model",
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": "first answer"},
            {"role": "user", "content": "what is polars?"},
        ],
    )
    choice = response.choices[0]
    assert choice.message.content == "echo: what is polars?"
    assert choice.finish_reason == "stop"
    assert response.model == "some-model"
    assert response.object == "chat.completion"
    prompt_chars = len("be brief" + "first question" + "first answer" + "what is polars?")
    assert response.usage.prompt_tokens == prompt_chars // 4
    assert response.usage.completion_tokens == len("echo: what is polars?") // 4
    assert response.usage.total_tokens == (
        response.usage.prompt_tokens + response.usage.completion_tokens
    )


def test_json_schema_reply_validates_against_pydantic_model(server):
    """A json_schema response_format gets a deterministic reply that validates."""
    c = client(server)
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "Person", "schema": Person.model_json_schema()},
    }
    people = []
    for i in range(20):
        reply = ask(c, f"describe person number {i}", response_format=response_format)
        people.append(Person.model_validate_json(reply.choices[0].message.content))
    again = ask(c, "describe person number 3", response_format=response_format)
    assert Person.model_validate_json(again.choices[0].message.content) == people[3]
    # Values come from the prompt's hash, so different prompts give different documents.
    assert len({p.model_dump_json() for p in people}) == len(people)
    assert {p.nickname is None for p in people} == {True, False}
    assert all(1 <= len(p.tags) <= 3 and 1 <= len(p.past_homes) <= 3 for p in people)
    assert any("person" in p.name or "number" in p.name or "describe" in p.name for p in people)


def test_sdk_parse_helper_gets_a_parsed_model(server):
    """The SDK's parse() helper (strict schema) gets a reply it parses into the model."""
    completion = client(server).chat.completions.parse(
        model="fake-model",
        messages=[{"role": "user", "content": "parse this"}],
        response_format=Person,
    )
    assert isinstance(completion.choices[0].message.parsed, Person)


def test_schema_example_handles_type_lists_refs_and_bounds():
    """Type lists, const, nested $ref, bounds and string lengths are all honoured."""
    schema = {
        "type": "object",
        "properties": {
            "maybe": {"type": ["integer", "null"], "minimum": 5, "maximum": 7},
            "fixed": {"const": "k"},
            "ratio": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
            "code": {"type": "string", "minLength": 40, "maxLength": 41},
            "node": {"$ref": "#/$defs/Node"},
        },
        "$defs": {
            "Node": {
                "type": "object",
                "properties": {"children": {"type": "array", "items": {"$ref": "#/$defs/Node"}}},
                "required": ["children"],
            }
        },
    }
    values = [schema_example(schema, f"prompt {i}") for i in range(30)]
    for value in values:
        assert value["maybe"] is None or 5 <= value["maybe"] <= 7
        assert value["fixed"] == "k"
        assert 0 < value["ratio"] <= 1
        assert 40 <= len(value["code"]) <= 41
        assert isinstance(value["node"]["children"], list)
    assert {v["maybe"] is None for v in values} == {True, False}
    assert schema_example(schema, "prompt 1") == values[1]


def test_max_tokens_truncates_with_finish_reason_length(server):
    """A reply longer than max_tokens is cut to that many tokens and ends with "length"."""
    c = client(server)
    prompt = "word " * 40
    response = ask(c, prompt, max_tokens=5)
    assert response.choices[0].finish_reason == "length"
    assert response.choices[0].message.content == ("echo: " + prompt)[:20]
    assert response.usage.completion_tokens == 5
    short = ask(c, "hi", max_completion_tokens=5)
    assert short.choices[0].finish_reason == "stop"
    assert short.choices[0].message.content == "echo: hi"


def test_embeddings_are_deterministic_unit_norm_vectors(server):
    """Embeddings have the asked dimension, unit norm, and equal texts get equal vectors."""
    c = client(server)
    result = c.embeddings.create(model="fake-embed", input=["cat", "dog", "cat"])
    vectors = [d.embedding for d in result.data]
    assert [d.index for d in result.data] == [0, 1, 2]
    assert all(len(v) == 8 for v in vectors)
    assert all(math.isclose(sum(x * x for x in v), 1.0, rel_tol=1e-5) for v in vectors)
    assert vectors[0] == vectors[2]
    assert vectors[0] != vectors[1]
    assert result.usage.prompt_tokens == len("catdogcat") // 4
    single = c.embeddings.create(model="fake-embed", input="dog", dimensions=32)
    assert len(single.data[0].embedding) == 32
    stats = server.stats()
    assert (stats.embedding_calls, stats.embedding_inputs, stats.chat_calls) == (2, 4, 0)


def test_embeddings_float_format_over_plain_http(server):
    """Plain HTTP with encoding_format float gets float lists equal to the SDK's vectors."""
    status, body = post_json(
        server.base_url + "/embeddings",
        {"model": "m", "input": ["cat"], "encoding_format": "float"},
    )
    assert status == 200
    vector = body["data"][0]["embedding"]
    from_sdk = client(server).embeddings.create(model="m", input="cat").data[0].embedding
    assert len(vector) == len(from_sdk) == 8
    assert all(
        math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-7)
        for a, b in zip(vector, from_sdk, strict=True)
    )


def test_wrong_api_key_raises_authentication_error():
    """With api_key set, another key gets a 401 invalid_api_key and the right one works."""
    with FakeServer(api_key="sk-right-key") as server:
        with pytest.raises(openai.AuthenticationError) as caught:
            ask(client(server), "hello")
        assert caught.value.status_code == 401
        assert caught.value.code == "invalid_api_key"
        good = client(server, api_key="sk-right-key")
        assert ask(good, "hello").choices[0].message.content == "echo: hello"
        assert server.stats().status_counts == {401: 1, 200: 1}


def test_unknown_model_raises_not_found():
    """With models set, another model gets a 404 model_not_found; /v1/models lists them."""
    with FakeServer(models=["alpha", "beta"]) as server:
        c = client(server)
        with pytest.raises(openai.NotFoundError) as caught:
            ask(c, "hello", model="gamma")
        assert caught.value.code == "model_not_found"
        assert ask(c, "hello", model="beta").model == "beta"
        assert [m.id for m in c.models.list()] == ["alpha", "beta"]


def test_models_default_to_fake_model(server):
    """Without models set, /v1/models lists the single fake-model."""
    assert [m.id for m in client(server).models.list()] == ["fake-model"]


def test_rpm_limit_answers_429_with_retry_after_headers():
    """Past the RPM bucket a 429 carries retry-after-ms, and waiting that long is enough."""
    with FakeServer(rpm=60) as server:  # a bucket of 1 request, refilled 1 per second
        c = client(server)
        ask(c, "first")
        with pytest.raises(openai.RateLimitError) as caught:
            ask(c, "one too many")
        headers = caught.value.response.headers
        wait_ms = float(headers["retry-after-ms"])
        assert 0 < wait_ms <= 1000
        assert headers["retry-after"] == "1"
        assert headers["x-ratelimit-limit-requests"] == "60"
        assert headers["x-ratelimit-remaining-requests"] == "0"
        assert re.fullmatch(r"\d+ms|1s", headers["x-ratelimit-reset-requests"])
        assert caught.value.body["type"] == "requests"
        assert caught.value.code == "rate_limit_exceeded"
        time.sleep(wait_ms / 1000)
        raw = c.chat.completions.with_raw_response.create(
            model="fake-model", messages=[{"role": "user", "content": "after the wait"}]
        )
        assert raw.headers["x-ratelimit-limit-requests"] == "60"
        assert server.stats().status_counts == {200: 2, 429: 1}


def test_tpm_limit_charges_prompt_and_max_tokens():
    """The TPM bucket charges prompt tokens plus max_tokens and refuses with type tokens."""
    with FakeServer(tpm=6000) as server:  # a bucket of 100 tokens
        c = client(server)
        ask(c, "x" * 40, max_tokens=80)  # 10 + 80 = 90 tokens
        with pytest.raises(openai.RateLimitError) as caught:
            ask(c, "x" * 40, max_tokens=80)
        assert caught.value.body["type"] == "tokens"
        assert caught.value.response.headers["x-ratelimit-limit-tokens"] == "6000"
        assert "x-ratelimit-limit-requests" not in caught.value.response.headers
        assert server.stats().tokens == 90


def test_error_rate_one_gives_5xx():
    """With error_rate=1 every request gets a 500 or 503 with an OpenAI error body."""
    with FakeServer(error_rate=1.0, seed=3) as server:
        c = client(server)
        codes = []
        for i in range(12):
            with pytest.raises(openai.InternalServerError) as caught:
                ask(c, f"q{i}")
            codes.append(caught.value.status_code)
        assert set(codes) == {500, 503}
        assert sum(server.stats().status_counts.values()) == 12


def test_faults_repeat_for_the_same_seed():
    """The same seed and arrival order give the same faults; another seed differs."""

    def outcomes(seed: int) -> list[int]:
        with FakeServer(error_rate=0.5, seed=seed) as server:
            c = client(server)
            result = []
            for i in range(16):
                try:
                    ask(c, f"q{i}")
                    result.append(200)
                except openai.InternalServerError as error:
                    result.append(error.status_code)
            return result

    first = outcomes(7)
    assert first == outcomes(7)
    assert 200 in first and len(set(first)) > 1
    assert first != outcomes(8)


def test_reset_rate_one_gives_connection_error():
    """With reset_rate=1 the connection is reset and the SDK raises APIConnectionError."""
    with FakeServer(reset_rate=1.0) as server:
        with pytest.raises(openai.APIConnectionError) as caught:
            ask(client(server), "hello")
        assert not isinstance(caught.value, openai.APITimeoutError)
        assert server.stats().status_counts == {0: 1}


def test_hang_rate_one_times_out_and_stop_is_prompt():
    """Hung requests make the client time out, and stop() still returns at once."""
    server = FakeServer(hang_rate=1.0).start()
    try:
        with pytest.raises(openai.APITimeoutError):
            ask(client(server, timeout=0.5), "hello")
        # A second client is still waiting (long timeout) when the server stops.
        errors: list[Exception] = []

        def wait_for_answer() -> None:
            try:
                ask(client(server), "still waiting")
            except Exception as error:
                errors.append(error)

        waiting = threading.Thread(target=wait_for_answer)
        waiting.start()
        deadline = time.monotonic() + 5
        while server.stats().in_flight < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.stats().in_flight == 1
    finally:
        started = time.monotonic()
        server.stop()
        stopped_in = time.monotonic() - started
    waiting.join(timeout=5)
    assert stopped_in < 2.0
    assert not waiting.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], openai.APIConnectionError)


def test_latency_delays_each_answer():
    """Each answer takes latency seconds, give or take jitter."""
    with FakeServer(latency=0.2, jitter=0.05) as server:
        c = client(server)
        ask(c, "warm up the connection")
        started = time.monotonic()
        ask(c, "hello")
        took = time.monotonic() - started
        assert 0.15 <= took < 0.6


def test_max_in_flight_reflects_concurrency():
    """Eight concurrent requests with 0.5 s latency are all in flight at once."""
    # 0.5 s rather than less, so that a loaded CI machine still overlaps all eight.
    with FakeServer(latency=0.5) as server:
        clients = [client(server) for _ in range(8)]
        barrier = threading.Barrier(8)

        def call(c: openai.OpenAI) -> str:
            barrier.wait()
            return ask(c, "same").choices[0].message.content

        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(call, clients))
        assert replies == ["echo: same"] * 8
        stats = server.stats()
        assert stats.max_in_flight == 8
        assert stats.in_flight == 0
        ask(clients[0], "alone")
        server.reset_stats()
        assert server.stats().max_in_flight == 0


def test_prompts_counter_and_history(server):
    """prompts counts each last user message; history keeps every body in order."""
    c = client(server)
    for prompt in ["a", "b", "a", "a"]:
        ask(c, prompt)
    c.embeddings.create(model="m", input="e")
    stats = server.stats()
    assert stats.prompts == {"a": 3, "b": 1}
    assert (stats.calls, stats.chat_calls, stats.embedding_calls) == (5, 4, 1)
    assert [b.get("messages", [{}])[-1].get("content") for b in server.history[:4]] == [
        "a",
        "b",
        "a",
        "a",
    ]
    assert server.history[4]["input"] == "e"
    server.reset_stats()
    assert server.stats().calls == 0 and server.history == []


def test_bad_json_is_a_400_counted_as_a_call(server):
    """A body that is not JSON gets a 400 and still counts as a call."""
    request = urllib.request.Request(
        server.base_url + "/chat/completions", data=b"{not json", method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=10)
    caught.value.close()
    assert caught.value.code == 400
    assert server.stats().status_counts == {400: 1}
    assert server.stats().calls == 1


def test_in_process_server_serves_stats_over_http(server):
    """GET /_fake/stats returns the same counters as stats()."""
    ask(client(server), "hello")
    root = server.base_url.removesuffix("/v1")
    with urllib.request.urlopen(root + "/_fake/stats", timeout=10) as response:
        body = json.loads(response.read())
    assert body["calls"] == 1
    assert body["prompts"] == {"hello": 1}
    status, _ = post_json(root + "/_fake/reset", {})
    assert status == 200
    assert server.stats().calls == 0


def test_timeline_sets_each_call_on_the_clients_clock():
    """timeline() gives each call's arrival and answer on time.monotonic(), answers after
    arrivals by about the latency; a reset connection arrives but is never answered."""
    with FakeServer(latency=0.05) as server:
        c = client(server)
        before = time.monotonic()
        ask(c, "one")
        ask(c, "two")
        after = time.monotonic()
        timeline = server.timeline()
        assert len(timeline.arrived) == len(timeline.answered) == 2
        assert before <= timeline.arrived[0] <= timeline.arrived[1] <= after
        for arrived, answered in zip(timeline.arrived, timeline.answered, strict=True):
            assert 0.05 <= answered - arrived < after - before
        server.reset_stats()
        assert server.timeline().arrived == []
    with FakeServer(reset_rate=1.0) as server, pytest.raises(openai.APIConnectionError):
        ask(client(server), "cut")
    timeline = server.timeline()
    assert len(timeline.arrived) == 1 and timeline.answered == []


def test_spawned_server_serves_its_timeline():
    """A server in another process gives its timeline over HTTP, on this process's clock."""
    with spawn_server() as remote:
        before = time.monotonic()
        ask(client(remote), "hi")
        timeline = remote.timeline()
        assert len(timeline.arrived) == len(timeline.answered) == 1
        assert before <= timeline.arrived[0] <= timeline.answered[0] <= time.monotonic()
        remote.reset_stats()
        assert remote.timeline().answered == []


def test_parallel_threads_share_one_server(server):
    """Many client threads at once all get their own echo, and every call is counted."""
    c = client(server)
    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda i: ask(c, f"p{i}").choices[0].message.content, range(64)))
    assert replies == [f"echo: p{i}" for i in range(64)]
    stats = server.stats()
    assert stats.calls == 64 and stats.status_counts == {200: 64}
    assert len(stats.prompts) == 64


def test_spawn_server_runs_in_a_subprocess():
    """spawn_server serves from another process and reports its stats over HTTP."""
    with spawn_server(latency=0.01, rpm=6000, api_key="k", models=["m1"]) as remote:
        c = client(remote, api_key="k")
        assert ask(c, "hi", model="m1").choices[0].message.content == "echo: hi"
        with pytest.raises(openai.NotFoundError):
            ask(c, "hi", model="m2")
        stats = remote.stats()
        assert stats.calls == 2
        assert stats.status_counts == {200: 1, 404: 1}
        assert stats.prompts == {"hi": 2}
        assert remote.process.pid != os.getpid()
        remote.reset_stats()
        assert remote.stats().calls == 0
        process = remote.process
    assert process.poll() is not None


def test_command_on_a_busy_port_says_so_in_one_line_and_exits_2(server):
    """`python -m polars_llm.testing` on a port in use prints one line and exits 2."""
    proc = subprocess.run(
        [sys.executable, "-m", "polars_llm.testing", "--port", str(server.port)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""  # no base URL for a client to go on with
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert f"127.0.0.1:{server.port}" in lines[0] and "--port 0" in lines[0]
