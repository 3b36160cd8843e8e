"""Typed steps on the command line, without a pipeline file: --classify/--labels and
--extract/--schema, with the CLI run as a process against the fake server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl

from polars_llm.testing import FakeServer

FACTS = {
    "type": "object",
    "properties": {"stars": {"type": "integer"}, "product": {"type": "string"}},
    "required": ["stars", "product"],
}


def run(args: list[str]) -> subprocess.CompletedProcess[str]:
    """The CLI as a real process; it inherits POLARS_LLM_CACHE_DIR (the test's tmp dir)."""
    return subprocess.run(
        [sys.executable, "-m", "polars_llm.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ.copy(),
    )


def setup(tmp_path: Path, server: FakeServer) -> list[str]:
    pl.DataFrame({"review": ["Love this lamp", "Broken lamp", "A lamp"]}).write_parquet(
        tmp_path / "in.parquet"
    )
    (tmp_path / "facts.json").write_text(json.dumps(FACTS))
    return [
        "enrich",
        str(tmp_path / "in.parquet"),
        str(tmp_path / "out.parquet"),
        "--base-url",
        server.base_url,
        "--api-key",
        "test-key",
    ]


def test_classify_and_extract_make_an_enum_and_a_struct(server: FakeServer, tmp_path: Path) -> None:
    """--classify with --labels gives an Enum column, --extract with --schema a Struct column."""
    args = setup(tmp_path, server)
    proc = run(
        [
            *args,
            "--classify",
            "sentiment=Sentiment of: {review}",
            "--labels",
            "positive, negative,neutral",
            "--extract",
            "facts=Facts in: {review}",
            "--schema",
            str(tmp_path / "facts.json"),
        ]
    )
    assert proc.returncode == 0, proc.stderr
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert out.schema["sentiment"] == pl.Enum(["positive", "negative", "neutral"])
    assert out.schema["facts"] == pl.Struct({"stars": pl.Int64, "product": pl.String})
    assert out["sentiment"].null_count() == 0 and out["facts"].null_count() == 0
    # The endpoint was asked for the label set and the schema, as structured output.
    formats = [b["response_format"]["json_schema"]["schema"] for b in server.history]
    assert any(f["properties"].get("label", {}).get("enum") for f in formats)
    assert any(set(f["properties"]) == {"stars", "product"} for f in formats)


def test_typed_steps_may_read_each_other_in_any_option_order(
    server: FakeServer, tmp_path: Path
) -> None:
    """A --step that reads a --classify step runs after it, whatever the options' order."""
    args = setup(tmp_path, server)
    proc = run(
        [
            *args,
            "--step",
            "reply=Reply to a {sentiment} review: {review}",
            "--classify",
            "sentiment=Sentiment of: {review}",
            "--labels",
            "positive,negative",
        ]
    )
    assert proc.returncode == 0, proc.stderr
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert out.columns == ["review", "sentiment", "reply", "llm_error"]
    for row in out.iter_rows(named=True):
        assert row["reply"].startswith(f"echo: Reply to a {row['sentiment']} review")


def test_a_classify_without_its_labels_is_a_usage_error(server: FakeServer, tmp_path: Path) -> None:
    """More --classify than --labels exits 2 with one line, before any call."""
    args = setup(tmp_path, server)
    proc = run([*args, "--classify", "a=A {review}", "--classify", "b=B {review}"])
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1
    assert "each --classify needs one --labels" in proc.stderr and "got 2 --classify" in proc.stderr
    assert server.stats().calls == 0


def test_a_single_label_is_a_usage_error(server: FakeServer, tmp_path: Path) -> None:
    """--labels with fewer than two labels exits 2 and shows the comma-separated form."""
    args = setup(tmp_path, server)
    proc = run([*args, "--classify", "a=A {review}", "--labels", "yes"])
    assert proc.returncode == 2
    assert "--labels positive,negative,neutral" in proc.stderr


def test_a_schema_file_that_is_not_json_is_a_usage_error(
    server: FakeServer, tmp_path: Path
) -> None:
    """A --schema file that is not JSON exits 2 naming the file; nothing is written or sent."""
    args = setup(tmp_path, server)
    (tmp_path / "bad.json").write_text("{stars: int}")
    proc = run([*args, "--extract", "f=F {review}", "--schema", str(tmp_path / "bad.json")])
    assert proc.returncode == 2
    assert "bad.json is not valid JSON" in proc.stderr and proc.stderr.count("\n") == 1
    assert not (tmp_path / "out.parquet").exists()
    assert server.stats().calls == 0


def test_a_malformed_classify_names_its_option(server: FakeServer, tmp_path: Path) -> None:
    """--classify without NAME= exits 2 with an example of the --classify form."""
    args = setup(tmp_path, server)
    proc = run([*args, "--classify", "no equals sign", "--labels", "a,b"])
    assert proc.returncode == 2
    assert "--classify sentiment=" in proc.stderr
