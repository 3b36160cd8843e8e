"""Rate limits end to end, over real HTTP to a fake server that enforces its limit per second.

A server may count requests per one-second window (OpenAI documents that it may): any burst on
top of the rate is refused there, so these tests use ``FakeServer(per_second=True)``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import polars as pl

import polars_llm
from polars_llm.testing import FakeServer


def test_limit_known_draws_fewer_than_one_percent_429s_per_second_window() -> None:
    """Told the server's 6,000 rpm, a 600-row job sees under 1% 429s and every row is right."""
    with FakeServer(rpm=6000, per_second=True, latency=0.02) as server:
        polars_llm.configure(base_url=server.base_url, api_key="k", rpm=6000, concurrency=64)
        df = pl.DataFrame({"q": [f"q{i}" for i in range(600)]})
        out = df.with_columns(a=pl.col("q").llm.complete("Say {q}"))
        counts = server.stats().status_counts
    assert out["a"].to_list() == [f"echo: Say q{i}" for i in range(600)]
    assert counts.get(200) == 600  # six times the server's window: the limit was in play
    assert counts.get(429, 0) < 6


def test_a_shared_url_that_is_not_redis_is_refused_before_anything_runs(tmp_path: Path) -> None:
    """`--shared-url http://...` exits 2 with one line naming the expected form; no output."""
    source = tmp_path / "in.parquet"
    pl.DataFrame({"q": ["a"]}).write_parquet(source)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "polars_llm.cli",
            "enrich",
            str(source),
            str(tmp_path / "out.parquet"),
            "--step",
            "a={q}",
            "--base-url",
            "http://127.0.0.1:9/v1",
            "--shared-url",
            "http://localhost:6379",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "redis://host:6379/0" in lines[0]
    assert not (tmp_path / "out.parquet").exists()
