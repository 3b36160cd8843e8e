"""batch=True in the library: the .llm methods and pipeline() send their calls as Batch API jobs
(real HTTP to the fake server's Batch API).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest

import polars_llm
from polars_llm import Settings, Step, TooManyFailures, pipeline
from polars_llm.testing import FakeServer


def reviews(n: int = 30, unique: int = 10) -> pl.DataFrame:
    return pl.DataFrame({"review": [None if i == 4 else f"review {i % unique}" for i in range(n)]})


@pytest.fixture
def server() -> Iterator[FakeServer]:
    with FakeServer(batch_seconds=0.2) as srv:
        polars_llm.configure(base_url=srv.base_url, api_key="x")
        yield srv


def test_complete_with_batch_true_goes_through_batches(server: FakeServer) -> None:
    """.llm.complete with batch=True answers every row from a batch; no chat-completions call."""
    out = reviews().with_columns(s=pl.col("review").llm.complete("Say {review}", batch=True))
    assert out.get_column("s").to_list()[:5] == [
        "echo: Say review 0",
        "echo: Say review 1",
        "echo: Say review 2",
        "echo: Say review 3",
        None,
    ]
    stats = server.stats()
    assert stats.chat_calls == 0 and stats.batches_created == 1 and stats.batch_lines == 10
    again = reviews().with_columns(s=pl.col("review").llm.complete("Say {review}", batch=True))
    assert again.equals(out) and server.stats().batches_created == 1


def test_extract_classify_and_embed_take_batch_true(server: FakeServer) -> None:
    """Structured output, labels and embeddings come back typed through batches too."""
    df = reviews(6, 3)
    out = df.with_columns(
        e=pl.col("review").llm.extract(
            {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]},
            batch=True,
        ),
        c=pl.col("review").llm.classify(["good", "bad"], batch=True),
        v=pl.col("review").llm.embed(model="emb", dimensions=4, batch=True),
    )
    assert out.schema["e"] == pl.Struct({"n": pl.Int64})
    assert out.get_column("e").struct.field("n").null_count() == 1
    assert out.get_column("c").null_count() == 1
    assert out.schema["v"] == pl.Array(pl.Float32, 4) and out.get_column("v").null_count() == 1
    stats = server.stats()
    assert stats.chat_calls == 0 and stats.embedding_calls == 0
    assert stats.batch_lines == 3 * 3


def test_pipeline_with_settings_batch_runs_steps_as_rounds(server: FakeServer) -> None:
    """pipeline(settings=Settings(batch=True)): step b goes out once step a is answered."""
    steps = [Step("a", "A {review}"), Step("b", "B {a}")]
    settings = Settings(base_url=server.base_url, api_key="x", batch=True)
    out = pipeline(reviews(), steps, settings=settings)
    assert out.get_column("b")[1] == "echo: B echo: A review 1"
    assert out.get_column("b").null_count() == 1
    stats = server.stats()
    assert stats.chat_calls == 0 and stats.batches_created == 2 and stats.batch_lines == 20


def test_a_refused_line_raises_or_is_null_as_on_error_says() -> None:
    """A 400 line is a row error: raised by default, null with its reason under details=True."""
    with FakeServer(batch_seconds=0.2, batch_refuse="review 2") as server:
        polars_llm.configure(base_url=server.base_url, api_key="x", batch=True)
        with pytest.raises(TooManyFailures, match="1 of 10"):
            reviews().with_columns(s=pl.col("review").llm.complete())
        out = reviews().with_columns(s=pl.col("review").llm.complete(on_error="null", details=True))
        errors = out.get_column("s").struct.field("error").drop_nulls()
        assert errors.len() == 3 and "safety system" in errors[0]


def test_keys_kept_at_a_pending_stop_are_counted_as_paid_once(tmp_path: Path) -> None:
    """A run that does not wait stops at its pending batches, keeping their keys in the ledger;
    the call that reads the answers counts them as paid and the ledger lets them go, so a later
    run counts them as served from the cache."""
    from polars_llm.batch import BatchPending, BatchRun, active
    from polars_llm.pipeline import PipelineStats

    steps = [Step("s", "Say {review}")]
    with FakeServer(batch_seconds=1000) as server:
        settings = Settings(
            base_url=server.base_url, api_key="x", cache_dir=tmp_path / "c", batch=True
        )
        kept = tmp_path / "c" / "batches" / "unreported.keys"
        run = BatchRun(wait=False)
        with active(run), pytest.raises(BatchPending):
            pipeline(reviews(), steps, settings=settings)
        assert len(kept.read_text().split()) == 10
        server.advance_batches(2000)
        paid, later = PipelineStats(), PipelineStats()
        with active(run):
            pipeline(reviews(), steps, settings=settings, stats=paid)
        assert not kept.exists()
        pipeline(reviews(), steps, settings=settings, stats=later)
        assert server.stats().batch_lines == 10
    assert (paid.steps["s"].requests, paid.steps["s"].cached) == (10, 0)
    assert (later.steps["s"].requests, later.steps["s"].cached) == (0, 29)
