"""Typed results: structured output, classification and embeddings, against the fake server."""

from __future__ import annotations

import enum
import json
import math

import polars as pl
import pytest
from pydantic import BaseModel

import polars_llm
from polars_llm.testing import FakeServer


class Mood(enum.Enum):
    happy = "happy"
    sad = "sad"


class Address(BaseModel):
    city: str
    zip: str | None = None


class Person(BaseModel):
    name: str
    age: int | None
    tags: list[str]
    mood: Mood
    address: Address
    score: float


PERSON_DTYPE = pl.Struct(
    {
        "name": pl.String,
        "age": pl.Int64,
        "tags": pl.List(pl.String),
        "mood": pl.Enum(["happy", "sad"]),
        "address": pl.Struct({"city": pl.String, "zip": pl.String}),
        "score": pl.Float64,
    }
)


def test_extract_dtype_is_known_before_any_call(server: FakeServer, use: object) -> None:
    """A LazyFrame's schema resolves to the struct of the model without a call."""
    lf = pl.LazyFrame({"bio": ["x"]}).with_columns(p=pl.col("bio").llm.extract(Person))
    assert lf.collect_schema()["p"] == PERSON_DTYPE
    assert server.stats().calls == 0


def test_extract_fills_nested_and_optional_fields(server: FakeServer, use: object) -> None:
    """The server's schema-valid JSON becomes typed struct values, nested fields included."""
    df = pl.DataFrame({"bio": ["Ada, 36, London", "Alan, 41, Wilmslow", None]})
    out = df.with_columns(p=pl.col("bio").llm.extract(Person, "Extract the person: {bio}"))
    assert out.schema["p"] == PERSON_DTYPE
    rows = out["p"].to_list()
    assert rows[2] is None
    for row in rows[:2]:
        assert isinstance(row["name"], str) and row["mood"] in ("happy", "sad")
        assert isinstance(row["address"]["city"], str)
        assert isinstance(row["tags"], list)
    sent = server.history[0]["response_format"]
    assert sent["type"] == "json_schema" and sent["json_schema"]["strict"] is True


def test_extract_repairs_then_reports_invalid_output() -> None:
    """Invalid JSON is sent back for repair; if it stays invalid the row's error keeps the raw text."""
    answers = {"good": '{"city": "Paris", "zip": null}', "bad": "not json at all"}

    def reply(body: dict) -> str:
        first = body["messages"][0]["content"]
        if "fixable" in first:
            return answers["good"] if len(body["messages"]) > 1 else "{oops"
        return answers["bad"] if "broken" in first else answers["good"]

    with FakeServer(reply=reply) as server:
        polars_llm.configure(base_url=server.base_url, api_key="k")
        df = pl.DataFrame({"t": ["fine", "fixable", "broken"]})
        out = df.with_columns(
            a=pl.col("t").llm.extract(Address, on_error="null", details=True)
        ).unnest("a")
    assert out["value"].to_list()[:2] == [{"city": "Paris", "zip": None}] * 2
    assert out["value"][2] is None
    assert "SchemaMismatch" in out["error"][2] and "not json at all" in out["error"][2]
    assert out["error"][:2].to_list() == [None, None]
    # fine: 1 call; fixable: 1 + 1 repair; broken: 1 + 2 repairs
    assert server.stats().chat_calls == 6


def test_changing_the_schema_is_not_served_from_cache(server: FakeServer, use: object) -> None:
    """A different output schema makes a new request instead of a stale cache hit."""

    class Small(BaseModel):
        city: str

    df = pl.DataFrame({"t": ["x"]})
    df.with_columns(a=pl.col("t").llm.extract(Address))
    df.with_columns(a=pl.col("t").llm.extract(Small))
    df.with_columns(a=pl.col("t").llm.extract(Small))
    assert server.stats().chat_calls == 2


def test_extract_takes_a_json_schema(server: FakeServer, use: object) -> None:
    """A plain JSON schema works like a Pydantic model."""
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer"}, "ok": {"type": "boolean"}},
        "required": ["n", "ok"],
    }
    out = pl.DataFrame({"t": ["x"]}).with_columns(a=pl.col("t").llm.extract(schema))
    assert out.schema["a"] == pl.Struct({"n": pl.Int64, "ok": pl.Boolean})
    assert isinstance(out["a"][0]["n"], int)


def _judge(body: dict) -> str:
    text = body["messages"][-1]["content"].lower()
    if "love" in text:
        return '"Positive."'
    if "hate" in text:
        return "NEGATIVE"
    return "It is hard to say"


def test_classify_gives_an_enum_and_rejects_outside_labels() -> None:
    """Answers map to the labels ignoring case and punctuation; others are row errors, not labels."""
    with FakeServer(reply=_judge) as server:
        polars_llm.configure(base_url=server.base_url, api_key="k")
        df = pl.DataFrame({"r": ["I love it", "I hate it", "Meh"]})
        out = df.with_columns(
            s=pl.col("r").llm.classify(["positive", "negative"], on_error="null", details=True)
        ).unnest("s")
    assert out.schema["value"] == pl.Enum(["positive", "negative"])
    assert out["value"].to_list() == ["positive", "negative", None]
    assert "LabelMismatch" in out["error"][2]
    system = server.history[0]["messages"][0]
    assert system["role"] == "system" and "positive, negative" in system["content"]


def test_classify_raises_by_default_on_an_outside_label() -> None:
    """With the default on_error, an answer outside the labels raises and names the count."""
    with FakeServer(reply=_judge) as server:
        polars_llm.configure(base_url=server.base_url, api_key="k")
        df = pl.DataFrame({"r": ["I love it", "Meh"]})
        with pytest.raises(polars_llm.TooManyFailures, match="1 of 2"):
            df.with_columns(s=pl.col("r").llm.classify(["positive", "negative"]))


def test_changing_labels_is_not_served_from_cache() -> None:
    """A different label set makes a new request."""
    with FakeServer(reply=_judge) as server:
        polars_llm.configure(base_url=server.base_url, api_key="k")
        df = pl.DataFrame({"r": ["I love it"]})
        df.with_columns(s=pl.col("r").llm.classify(["positive", "negative"]))
        df.with_columns(s=pl.col("r").llm.classify(["positive", "negative", "neutral"]))
    assert server.stats().chat_calls == 2


def test_embeddings_are_deduplicated_batched_and_cached(server: FakeServer, use: object) -> None:
    """Duplicate inputs are sent once, several per request, and a rerun makes no call."""
    words = [f"w{i % 30}" for i in range(100)] + [None]
    df = pl.DataFrame({"t": words})
    expr = pl.col("t").llm.embed(model="emb", dimensions=16, batch_size=8)
    out = df.with_columns(v=expr)
    assert out.schema["v"] == pl.Array(pl.Float32, 16)
    stats = server.stats()
    assert stats.embedding_inputs == 30
    assert stats.embedding_calls == 4  # ceil(30 / 8)
    first = out["v"].to_list()
    assert first[0] == first[30]  # same word, same vector
    assert first[100] is None
    assert math.isclose(sum(x * x for x in first[0]), 1.0, rel_tol=1e-4)
    df.with_columns(v=expr)
    assert server.stats().embedding_calls == 4


def test_embedding_size_must_be_known(server: FakeServer, use: object) -> None:
    """An embedding model of unknown size asks for dimensions= before any call."""
    with pytest.raises(polars_llm.ConfigError, match="dimensions="):
        pl.col("t").llm.embed(model="mystery")


def test_details_struct_reports_cache_and_tokens(server: FakeServer, use: object) -> None:
    """details=True gives cached flag and token usage per row."""
    df = pl.DataFrame({"q": ["hello there"]})
    first = df.with_columns(a=pl.col("q").llm.complete(details=True)).unnest("a")
    second = df.with_columns(a=pl.col("q").llm.complete(details=True)).unnest("a")
    assert first["cached"].to_list() == [False] and second["cached"].to_list() == [True]
    assert first["prompt_tokens"][0] > 0 and first["completion_tokens"][0] > 0
    assert second["prompt_tokens"][0] == first["prompt_tokens"][0]
    assert json.dumps(second["value"][0]) == json.dumps(first["value"][0])


def test_classify_asks_for_a_label_from_the_set(server: FakeServer, use: object) -> None:
    """classify sends a JSON schema whose enum is the label set, and reads the label from it."""
    df = pl.DataFrame({"r": ["I love it", "Broken", "Fine"]})
    out = df.with_columns(s=pl.col("r").llm.classify(["positive", "negative", "neutral"]))
    assert set(out["s"].to_list()) <= {"positive", "negative", "neutral"}
    assert out["s"].null_count() == 0
    fmt = server.history[0]["response_format"]
    assert fmt["json_schema"]["schema"]["properties"]["label"]["enum"] == [
        "positive",
        "negative",
        "neutral",
    ]
