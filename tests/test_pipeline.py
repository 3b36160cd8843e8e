"""Pipelines and fan-out/fan-in, against the fake server."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal
from pydantic import BaseModel

import polars_llm
from polars_llm import Step, pipeline, plan
from polars_llm.testing import FakeServer

STEPS = [
    Step("summary", "Summarize: {text}"),
    Step("title", "Title for {summary} ({lang})"),
]


def _frame() -> pl.DataFrame:
    return pl.DataFrame(
        {
            "text": [f"doc {i % 40}" for i in range(120)] + [None],
            "lang": ["en", "fr", "de"] * 40 + ["en"],
        }
    )


def test_pipeline_equals_successive_with_columns() -> None:
    """Pipelined steps give the same frame as one with_columns per step."""
    df = _frame()
    with FakeServer(latency=0.01, jitter=0.01) as server:
        settings = polars_llm.Settings(base_url=server.base_url, api_key="k", cache=False)
        piped = pipeline(df, STEPS, settings=settings)
        stepwise = df.with_columns(
            summary=pl.col("text").llm.complete("Summarize: {text}", settings=settings)
        ).with_columns(
            title=pl.col("summary").llm.complete("Title for {summary} ({lang})", settings=settings)
        )
    assert_frame_equal(piped, stepwise)
    assert piped["title"][1] == "echo: Title for echo: Summarize: doc 1 (fr)"
    assert piped["title"][120] is None


def test_pipeline_sends_each_unique_prompt_once(server: FakeServer, use: object) -> None:
    """Duplicate prompts within a step are sent once, and a rerun is served from the cache."""
    df = _frame()
    pipeline(df, STEPS)
    # 40 unique summaries; titles are unique per (summary, lang): 120 rows -> 120 combos / 40*3
    assert server.stats().chat_calls == 40 + 120
    again = pipeline(df, STEPS)
    assert server.stats().chat_calls == 160
    assert again["summary"][0] == "echo: Summarize: doc 0"


def test_pipeline_row_failure_is_reported_per_row() -> None:
    """With on_error='null' a failed step nulls the rest of that row and says why in llm_error."""

    def reply(body: dict) -> str:
        return "" if "doc 3" in body["messages"][-1]["content"] else "fine"

    with FakeServer(reply=reply) as server:
        settings = polars_llm.Settings(base_url=server.base_url, api_key="k")
        out = pipeline(
            pl.DataFrame({"text": ["doc 1", "doc 3"], "lang": ["en", "en"]}),
            STEPS,
            settings=settings,
            on_error="null",
        )
    assert out["summary"].to_list() == ["fine", None]
    assert out["title"].to_list() == ["fine", None]
    assert out["llm_error"][0] is None
    assert out["llm_error"][1].startswith("summary: EmptyCompletion")
    assert out.schema["llm_error"] == pl.String


def test_pipeline_raises_by_default_on_failure() -> None:
    """With the default on_error the pipeline raises, naming how many rows failed."""
    with FakeServer(reply=lambda body: "") as server:
        settings = polars_llm.Settings(base_url=server.base_url, api_key="k")
        with pytest.raises(polars_llm.TooManyFailures, match="2 of 2 row"):
            pipeline(
                pl.DataFrame({"text": ["a", "b"], "lang": ["x", "y"]}), STEPS, settings=settings
            )


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        ([Step("s", "Say {missing}")], "not a column or an earlier step"),
        ([Step("t", "Say {s}"), Step("s", "Say {text}")], "not a column or an earlier step"),
        ([Step("text", "Say {text}")], "already a column"),
        ([], "at least one step"),
    ],
)
def test_bad_steps_are_refused_before_any_call(
    server: FakeServer, use: object, steps: list[Step], message: str
) -> None:
    """Unknown placeholders, forward references and name clashes fail upfront."""
    with pytest.raises(polars_llm.ConfigError, match=message):
        pipeline(pl.DataFrame({"text": ["a"]}), steps)
    assert server.stats().calls == 0


def test_plan_makes_no_calls_and_counts_the_cache(server: FakeServer, use: object) -> None:
    """A dry-run plan counts unique prompts and cache hits, and calls nothing."""
    df = _frame()
    before = plan(df, STEPS)
    assert server.stats().calls == 0
    assert before[0].prompts == 120
    assert (before[0].unique, before[0].cached, before[0].to_send) == (40, 0, 40)
    assert before[1].unknown == 120
    pipeline(df.head(30), STEPS)
    calls = server.stats().calls
    after = plan(df, STEPS)
    assert server.stats().calls == calls
    assert (after[0].cached, after[0].to_send) == (30, 10)
    assert after[1].cached == 30


def test_pipeline_file(tmp_path: Path) -> None:
    """A TOML file gives steps with per-step model, system, parameters, labels and schema."""
    path = tmp_path / "p.toml"
    path.write_text(
        """
[settings]
concurrency = 4

[steps.mood]
prompt = "Mood of {text}"
labels = ["good", "bad"]
model = "small"

[steps.reply]
prompt = "Reply to a {mood} text: {text}"
system = "Be kind."
params = { temperature = 0.1, max_tokens = 20 }

[steps.facts]
prompt = "Facts in {text}"
schema = { type = "object", properties = { n = { type = "integer" } }, required = ["n"] }
"""
    )
    steps, settings = polars_llm.load_pipeline(path)
    assert settings == {"concurrency": 4}
    assert [s.name for s in steps] == ["mood", "reply", "facts"]
    assert steps[0].labels == ["good", "bad"] and steps[0].model == "small"
    assert steps[1].params == {"temperature": 0.1, "max_tokens": 20}
    assert steps[2].post().dtype == pl.Struct({"n": pl.Int64})


def test_pipeline_file_errors_are_clear(tmp_path: Path) -> None:
    """A pipeline file with a typo'd key or no steps says what is wrong."""
    bad = tmp_path / "bad.toml"
    bad.write_text('[steps.a]\nprompt = "x {t}"\nmodle = "m"\n')
    with pytest.raises(polars_llm.ConfigError, match="unknown key"):
        polars_llm.load_pipeline(bad)
    empty = tmp_path / "empty.toml"
    empty.write_text("[settings]\n")
    with pytest.raises(polars_llm.ConfigError, match=r"no \[steps"):
        polars_llm.load_pipeline(empty)


class Outline(BaseModel):
    sections: list[str]


def test_fan_out_fan_in(server: FakeServer, use: object) -> None:
    """Outline per topic, explode into sections, expand each, group back, write an intro."""
    topics = pl.DataFrame({"topic": ["tea", "coffee", "cocoa"]})
    outlined = topics.with_columns(
        outline=pl.col("topic").llm.extract(Outline, "Outline an article about {topic}")
    )
    sections = outlined.select("topic", section=pl.col("outline").struct.field("sections")).explode(
        "section"
    )
    expanded = sections.with_columns(
        text=polars_llm.prompt("Write the section '{section}' about {topic}").llm.complete()
    )
    merged = expanded.group_by("topic", maintain_order=True).agg(
        body=pl.col("text").str.join("\n\n")
    )
    final = merged.with_columns(intro=pl.col("body").llm.complete("Introduce: {body}"))

    assert final["topic"].to_list() == ["tea", "coffee", "cocoa"]
    n_sections = sections.height
    assert n_sections >= 3
    unique_sections = sections.unique().height
    assert server.stats().chat_calls == 3 + unique_sections + 3
    for row in final.iter_rows(named=True):
        wanted = sections.filter(pl.col("topic") == row["topic"])["section"].to_list()
        for section in wanted:
            assert f"Write the section '{section}' about {row['topic']}" in row["intro"]


def test_plan_counts_independent_steps_from_the_cache(server: FakeServer, use: object) -> None:
    """A step that reads only input columns is planned from the cache even when an earlier,
    unrelated step has answers still to fetch."""
    df = pl.DataFrame({"text": ["a", "b"], "lang": ["en", "fr"]})
    steps = [Step("s1", "One {text}"), Step("s2", "Two {lang}"), Step("s3", "Three {s1}")]
    df.with_columns(s2=pl.col("lang").llm.complete("Two {lang}"))  # only s2 is cached
    plans = {p.name: p for p in plan(df, steps)}
    assert (plans["s1"].to_send, plans["s1"].unknown) == (2, 0)
    assert (plans["s2"].cached, plans["s2"].unknown) == (2, 0)
    assert plans["s3"].unknown == 2


def test_progress_bars_show_when_asked(
    server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """With progress=True, .llm calls and pipeline() draw a bar on stderr; with False, nothing."""
    settings = polars_llm.Settings(base_url=server.base_url, api_key="k", progress=True)
    df = pl.DataFrame({"text": ["a", "b"], "lang": ["en", "fr"]})
    pipeline(df, STEPS, settings=settings)
    assert "polars-llm" in capsys.readouterr().err
    df.with_columns(x=pl.col("text").llm.complete("Other {text}", settings=settings))
    err = capsys.readouterr().err
    assert "polars-llm" in err and "req" in err
    quiet = settings.replace(progress=False)
    df.with_columns(x=pl.col("text").llm.complete("Third {text}", settings=quiet))
    assert capsys.readouterr().err == ""
