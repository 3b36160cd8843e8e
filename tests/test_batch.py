"""The Batch API backend (polars_llm.batch) against the fake server over real HTTP."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from polars_llm import batch
from polars_llm.batch import BatchPending, BatchSession, Ledger, shards
from polars_llm.cache import open_cache
from polars_llm.errors import BadRequest, BatchAborted
from polars_llm.settings import Settings
from polars_llm.testing import FakeServer


def requests(n: int, model: str = "m", tag: str = "") -> dict[str, dict[str, Any]]:
    return {
        f"key{tag}{i}": {"model": model, "messages": [{"role": "user", "content": f"hi {tag}{i}"}]}
        for i in range(n)
    }


def settings(server: FakeServer, tmp_path: Path) -> Settings:
    return Settings(base_url=server.base_url, api_key="x", cache_dir=tmp_path / "c")


def session(server: FakeServer, tmp_path: Path, **kwargs: Any) -> BatchSession:
    return BatchSession(settings(server, tmp_path), poll_min=0.05, poll_max=0.2, **kwargs)


def test_answers_land_in_the_cache_in_the_engines_format(tmp_path: Path) -> None:
    """Every request is answered through a batch, cached as {text, usage, finish}; no chat call."""
    with FakeServer(batch_seconds=0.2) as server:
        s = session(server, tmp_path)
        assert s.send(requests(12)) == {}
        cache = open_cache(tmp_path / "c")
        for i in range(12):
            entry = cache.get(f"key{i}")
            assert entry is not None
            assert entry["text"] == f"echo: hi {i}" and entry["finish"] == "stop"
            assert len(entry["usage"]) == 2
        stats = server.stats()
        assert stats.chat_calls == 0 and stats.batches_created == 1 and stats.batch_lines == 12


def test_failed_and_expired_lines_are_resubmitted_and_4xx_lines_are_row_errors(
    tmp_path: Path,
) -> None:
    """5xx and expired lines go out again; a 400 line is an error with the server's reason."""
    with FakeServer(
        batch_seconds=0.2,
        batch_error_rate=0.2,
        batch_expire_rate=0.1,
        batch_refuse="forbidden",
        seed=7,
    ) as server:
        todo = requests(60)
        todo["bad"] = {"model": "m", "messages": [{"role": "user", "content": "forbidden"}]}
        # Six rounds: a line failing all of them (0.3 ** 6) would be bad luck, not a bug.
        s = session(server, tmp_path, max_rounds=5)
        errors = s.send(todo)
        assert list(errors) == ["bad"]
        assert isinstance(errors["bad"], BadRequest) and "safety system" in errors["bad"].message
        cache = open_cache(tmp_path / "c")
        assert all(cache.get(k) is not None for k in todo if k != "bad")
        stats = server.stats()
        assert stats.batches_created >= 2
        # Each round resubmits only what failed: about 61 / (1 - 0.3) lines in all.
        assert 61 < stats.batch_lines <= 61 * 1.8


def test_lines_that_keep_failing_become_row_errors_after_the_last_round(tmp_path: Path) -> None:
    """A line failing every round ends as a row error naming the rounds and the last reason."""
    with FakeServer(batch_seconds=0.1, batch_error_rate=1.0) as server:
        s = session(server, tmp_path, max_rounds=2)
        errors = s.send(requests(3))
        assert sorted(errors) == ["key0", "key1", "key2"]
        assert "after 3 round(s)" in errors["key0"].message and "500" in errors["key0"].message
        assert server.stats().batch_lines == 9


def test_no_wait_submits_once_and_a_later_call_collects(tmp_path: Path) -> None:
    """wait=False raises BatchPending with the batch ids; asking again submits nothing twice."""
    with FakeServer(batch_seconds=1000) as server:
        with pytest.raises(BatchPending) as first:
            session(server, tmp_path, wait=False).send(requests(5))
        with pytest.raises(BatchPending) as second:
            session(server, tmp_path, wait=False).send(requests(5))
        assert first.value.batch_ids == second.value.batch_ids
        assert server.stats().batches_created == 1
        server.advance_batches(2000)
        assert session(server, tmp_path, wait=False).send(requests(5)) == {}
        assert server.stats().batches_created == 1
        assert open_cache(tmp_path / "c").get("key4") is not None


def test_only_what_is_neither_cached_nor_pending_is_submitted(tmp_path: Path) -> None:
    """A job overlapping a pending batch submits only its new keys."""
    with FakeServer(batch_seconds=1000) as server:
        with pytest.raises(BatchPending):
            session(server, tmp_path, wait=False).send(requests(5))
        with pytest.raises(BatchPending) as e:
            session(server, tmp_path, wait=False).send({**requests(5), **requests(3, tag="x")})
        assert len(e.value.batch_ids) == 2
        assert server.stats().batch_lines == 8


def test_a_lost_ledger_is_rebuilt_from_the_servers_list(tmp_path: Path) -> None:
    """Without its ledger, a rerun finds its batches through GET /v1/batches: no new batch."""
    with FakeServer(batch_seconds=1000) as server:
        with pytest.raises(BatchPending) as first:
            session(server, tmp_path, wait=False).send(requests(4))
        shutil.rmtree(Ledger(tmp_path / "c").folder)
        with pytest.raises(BatchPending) as second:
            session(server, tmp_path, wait=False).send(requests(4))
        assert second.value.batch_ids == first.value.batch_ids
        assert server.stats().batches_created == 1
        entry = batch.list_batches(tmp_path / "c")[0]
        assert entry.batch_id == first.value.batch_ids[0] and entry.lines == 4


def test_a_batch_that_fails_validation_is_reported_with_the_servers_reason(
    tmp_path: Path,
) -> None:
    """A failed batch raises BatchAborted quoting the server's error."""
    with (
        FakeServer(batch_seconds=0.1, batch_max_lines=3) as server,
        pytest.raises(BatchAborted, match="failed validation: too_many_requests"),
    ):
        session(server, tmp_path).send(requests(5))


def test_shards_hold_one_model_and_respect_the_limits() -> None:
    """Files split by model, by line count and by bytes; every key lands in exactly one file."""
    todo = [*requests(7, "a").items(), *requests(3, "b", tag="b").items()]
    files = list(shards(todo, "/v1/chat/completions", max_lines=3, max_bytes=10_000))
    assert sorted((f.model, len(f.keys)) for f in files) == [("a", 1), ("a", 3), ("a", 3), ("b", 3)]
    for f in files:
        body = [json.loads(x) for x in f.data.decode().splitlines()]
        assert [x["custom_id"] for x in body] == f.keys
        assert {x["body"]["model"] for x in body} == {f.model}
    small = list(shards(todo[:4], "/v1/chat/completions", max_bytes=300))
    assert all(len(f.data) <= 300 for f in small) and sum(len(f.keys) for f in small) == 4


def test_wait_for_batches_polls_until_every_batch_ended(tmp_path: Path) -> None:
    """The async API an Airflow trigger uses: submit, then await the batches on its own loop."""
    with FakeServer(batch_seconds=1000) as server:
        ids = batch.submit(requests(3), settings(server, tmp_path))
        assert len(ids) == 1
        seen: list[batch.BatchProgress] = []

        async def wait() -> list[batch.BatchStatus]:
            waiting = asyncio.ensure_future(
                batch.wait_for_batches(
                    ids,
                    base_url=server.base_url,
                    api_key="x",
                    on_progress=seen.append,
                    poll_min=0.05,
                    poll_max=0.1,
                )
            )
            await asyncio.sleep(0.3)
            assert not waiting.done()
            server.advance_batches(2000)
            return await asyncio.wait_for(waiting, 30)

        statuses = asyncio.run(wait())
        assert [s.status for s in statuses] == ["completed"]
        assert seen[0].ended == 0 and seen[-1].completed == 3
        assert batch.collect(settings(server, tmp_path)) == 3
        assert open_cache(tmp_path / "c").get("key2") is not None


def test_cancel_then_a_rerun_resubmits_the_leftovers(tmp_path: Path) -> None:
    """cancel() stops running batches; the next call resubmits only the lines not done."""
    with FakeServer(batch_seconds=100) as server:
        ids = batch.submit(requests(10), settings(server, tmp_path))
        server.advance_batches(40)
        assert batch.cancel(settings(server, tmp_path)) == ids
        assert batch.refresh(settings(server, tmp_path))[0].status == "cancelled"
        with pytest.raises(BatchPending):
            session(server, tmp_path, wait=False).send(requests(10))
        server.advance_batches(200)
        assert session(server, tmp_path, wait=False).send(requests(10)) == {}
        stats = server.stats()
        assert stats.batches_created == 2 and stats.batch_lines == 10 + 6
