"""The fake server's Files and Batches API, through the official openai client over real HTTP."""

from __future__ import annotations

import io
import json
from typing import Any

import openai
import pytest

from polars_llm.testing import FakeServer, spawn_server


def lines(n: int, model: str = "m", start: int = 0) -> list[dict[str, Any]]:
    return [
        {
            "custom_id": f"k{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": f"hi {i}"}]},
        }
        for i in range(start, start + n)
    ]


def create(client: openai.OpenAI, rows: list[dict[str, Any]]) -> Any:
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    uploaded = client.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch")
    return client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"job": "test"},
    )


def read(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines()]


@pytest.fixture
def slow() -> Any:
    with FakeServer(batch_seconds=100) as srv:
        yield srv, openai.OpenAI(base_url=srv.base_url, api_key="x")


def test_a_batch_moves_through_its_statuses_as_the_clock_advances(slow: Any) -> None:
    """validating, in_progress with growing counts, then completed with an output file."""
    server, client = slow
    batch = create(client, lines(10))
    assert batch.status == "validating"
    assert batch.metadata == {"job": "test"}
    assert client.batches.retrieve(batch.id).status == "in_progress"
    server.advance_batches(50)
    half = client.batches.retrieve(batch.id)
    assert half.status == "in_progress" and half.request_counts.completed == 5
    server.advance_batches(50)
    done = client.batches.retrieve(batch.id)
    assert done.status == "completed"
    assert done.request_counts.total == 10 and done.request_counts.completed == 10
    assert done.error_file_id is None
    assert server.stats().batches_created == 1 and server.stats().batch_lines == 10


def test_the_output_is_shuffled_and_answers_match_by_custom_id(slow: Any) -> None:
    """Output lines come in another order; each custom_id carries its own prompt's answer."""
    server, client = slow
    batch = create(client, lines(30))
    server.advance_batches(200)
    out = read(client, client.batches.retrieve(batch.id).output_file_id)
    ids = [x["custom_id"] for x in out]
    assert sorted(ids) == sorted(f"k{i}" for i in range(30))
    assert ids != [f"k{i}" for i in range(30)]
    for x in out:
        content = x["response"]["body"]["choices"][0]["message"]["content"]
        assert content == f"echo: hi {x['custom_id'][1:]}"
    assert server.stats().chat_calls == 0


def test_failed_and_expired_lines_land_in_the_error_file() -> None:
    """5xx lines and lines left undone by expiry are in the error file; the batch is expired."""
    with FakeServer(batch_seconds=1, batch_error_rate=0.2, batch_expire_rate=0.2, seed=5) as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="x")
        batch = create(client, lines(50))
        srv.advance_batches(5)
        done = client.batches.retrieve(batch.id)
        assert done.status == "expired"
        errors = read(client, done.error_file_id)
        out = read(client, done.output_file_id)
        codes = {(x["error"] or {}).get("code") or x["response"]["status_code"] for x in errors}
        assert codes == {"batch_expired", 500}
        assert len(out) + len(errors) == 50
        assert done.request_counts.failed == len(errors)


def test_a_duplicate_custom_id_fails_validation_with_the_reason(slow: Any) -> None:
    """A repeated custom_id fails the batch, with errors naming the code and line."""
    _, client = slow
    rows = lines(3)
    batch = create(client, [*rows, rows[1]])
    failed = client.batches.retrieve(batch.id)
    assert failed.status == "failed"
    assert failed.errors is not None and failed.errors.data is not None
    error = failed.errors.data[0]
    assert (error.code, error.line) == ("duplicate_custom_id", 4)


def test_mixed_models_fail_validation(slow: Any) -> None:
    """One file may hold one model only."""
    _, client = slow
    batch = create(client, [*lines(2, "a"), *lines(2, "b", start=2)])
    failed = client.batches.retrieve(batch.id)
    assert failed.status == "failed"
    assert failed.errors is not None and failed.errors.data is not None
    assert failed.errors.data[0].code == "mixed_models"


def test_list_pages_newest_first(slow: Any) -> None:
    """GET /v1/batches pages with limit/after, newest first, and the SDK follows the pages."""
    _, client = slow
    made = [create(client, lines(1)).id for _ in range(5)]
    page = client.batches.list(limit=2)
    assert [b.id for b in page.data] == made[::-1][:2] and page.has_more
    assert [b.id for b in client.batches.list(limit=2)] == made[::-1]


def test_cancel_keeps_the_lines_done_and_marks_the_rest(slow: Any) -> None:
    """A cancelled batch has the lines done so far in its output, the rest batch_cancelled."""
    server, client = slow
    batch = create(client, lines(10))
    client.batches.retrieve(batch.id)
    server.advance_batches(30)
    assert client.batches.cancel(batch.id).status == "cancelling"
    cancelled = client.batches.retrieve(batch.id)
    assert cancelled.status == "cancelled"
    out = read(client, cancelled.output_file_id)
    errors = read(client, cancelled.error_file_id)
    assert len(out) == 3
    assert {x["error"]["code"] for x in errors} == {"batch_cancelled"} and len(errors) == 7
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(batch.id)


def test_a_server_in_another_process_advances_its_batch_clock() -> None:
    """spawn_server's batch clock is advanced over HTTP, and its stats count batch lines."""
    with spawn_server(batch_seconds=1000) as remote:
        client = openai.OpenAI(base_url=remote.base_url, api_key="x")
        batch = create(client, lines(4))
        assert client.batches.retrieve(batch.id).status == "in_progress"
        remote.advance_batches(2000)
        assert client.batches.retrieve(batch.id).status == "completed"
        assert remote.stats().batch_lines == 4
