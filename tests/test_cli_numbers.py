"""Numbers a user can trust, in the CLI's summary and its --report JSON: rows against answers,
tokens paid against served from the cache, calls and retries, the endpoint and model of each
step, cost in dollars; and the dry run's estimates. The CLI runs as a process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from polars_llm.prices import PRICES, load_prices, price
from polars_llm.testing import FakeServer

ROOT = Path(__file__).resolve().parent.parent
SENTIMENT = "sentiment=Sentiment of this review, one word: {review}"
REPLY = "reply=Write a short reply to a {sentiment} review: {review}"


def run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI as a real process; it inherits POLARS_LLM_CACHE_DIR (the test's tmp dir)."""
    return subprocess.run(
        [sys.executable, "-m", "polars_llm.cli", *args],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, **(env or {})},
    )


def reviews(tmp_path: Path, n: int = 30, unique: int = 10) -> Path:
    """``n`` reviews with ``unique`` distinct texts."""
    path = tmp_path / "in.parquet"
    pl.DataFrame({"review": [f"review {i % unique}" for i in range(n)]}).write_parquet(path)
    return path


def enrich(
    server: FakeServer, src: Path, tmp_path: Path, *extra: str
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    report = tmp_path / "report.json"
    proc = run(
        [
            "enrich",
            str(src),
            str(tmp_path / "out.parquet"),
            "--report",
            str(report),
            "--base-url",
            server.base_url,
            "--api-key",
            "test-key",
            *extra,
        ]
    )
    return proc, json.loads(report.read_text())


def summary(proc: subprocess.CompletedProcess[str]) -> str:
    (line,) = [line for line in proc.stderr.splitlines() if " answers for " in line]
    return line


def test_rows_and_answers_are_counted_apart(server: FakeServer, tmp_path: Path) -> None:
    """30 rows x 2 steps are 60 answers; 10 distinct prompts per step are 20 requests."""
    src = reviews(tmp_path)
    proc, report = enrich(server, src, tmp_path, "--step", SENTIMENT, "--step", REPLY)
    assert proc.returncode == 0, proc.stderr
    assert (report["rows"], report["rows_done"], report["answers"]) == (30, 30, 60)
    assert report["cache_hits"] == 0
    assert [st["requests"] for st in report["steps"]] == [10, 10]
    assert report["calls"] == server.stats().calls == 20
    assert summary(proc).startswith(
        "polars-llm: 60 answers for 30 rows x 2 step(s): 0 from the cache, 60 asked in 20 calls"
    )


def test_a_cached_rerun_pays_no_tokens(server: FakeServer, tmp_path: Path) -> None:
    """A fully cached rerun reports 0 tokens paid and the first run's tokens as cached."""
    src = reviews(tmp_path)
    first_proc, first = enrich(server, src, tmp_path, "--step", SENTIMENT)
    assert first_proc.returncode == 0, first_proc.stderr
    assert first["prompt_tokens"] > 0 and first["completion_tokens"] > 0
    assert first["cached_prompt_tokens"] == first["cached_completion_tokens"] == 0
    # Counted once per request: the 10 distinct prompts alone (another cache) pay the same.
    distinct = tmp_path / "distinct"
    distinct.mkdir()
    _, alone = enrich(
        server, reviews(distinct, n=10), distinct, "--step", SENTIMENT, "--cache-dir", str(distinct)
    )
    assert (alone["prompt_tokens"], alone["completion_tokens"]) == (
        first["prompt_tokens"],
        first["completion_tokens"],
    )
    second_proc, second = enrich(server, src, tmp_path, "--step", SENTIMENT)
    assert second_proc.returncode == 0, second_proc.stderr
    assert second["prompt_tokens"] == second["completion_tokens"] == 0
    assert second["cached_prompt_tokens"] == first["prompt_tokens"]
    assert second["cached_completion_tokens"] == first["completion_tokens"]
    assert second["cache_hits"] == second["answers"] == 30 and second["calls"] == 0
    assert second["cost_usd"] == 0
    assert "tokens paid: 0 prompt + 0 completion" in summary(second_proc)


def test_retries_are_the_attempts_beyond_the_first(tmp_path: Path) -> None:
    """With a server failing some requests, retries equal its 5xx answers; calls count them."""
    src = reviews(tmp_path, n=40, unique=40)
    with FakeServer(error_rate=0.3, seed=7) as flaky:
        proc, report = enrich(flaky, src, tmp_path, "--step", SENTIMENT)
        stats = flaky.stats()
    assert proc.returncode == 0, proc.stderr
    errors = sum(n for status, n in stats.status_counts.items() if status >= 500)
    assert errors > 0
    assert report["retries"] == errors
    assert report["calls"] == stats.calls == 40 + errors
    assert f"40 asked in {40 + errors} calls ({errors} retries)" in summary(proc)


def test_each_step_reports_the_endpoint_and_model_it_used(
    server: FakeServer, tmp_path: Path
) -> None:
    """The report names each step's endpoint and model, the default one included (not null)."""
    src = reviews(tmp_path)
    pipeline = tmp_path / "p.toml"
    pipeline.write_text(
        '[steps.sentiment]\nprompt = "Sentiment: {review}"\n'
        '[steps.reply]\nprompt = "Reply to: {sentiment}"\nmodel = "gpt-4o"\n'
    )
    proc, report = enrich(server, src, tmp_path, "--pipeline", str(pipeline))
    assert proc.returncode == 0, proc.stderr
    got = [(st["name"], st["endpoint"], st["model"]) for st in report["steps"]]
    assert got == [
        ("sentiment", server.base_url, "gpt-4o-mini"),
        ("reply", server.base_url, "gpt-4o"),
    ]
    sent = {b["model"] for b in server.history}
    assert sent == {"gpt-4o-mini", "gpt-4o"}


def test_cost_is_priced_by_model_and_overridable(server: FakeServer, tmp_path: Path) -> None:
    """Cost is tokens x the table's price; a --prices file adds a model; unknown says so."""
    src = reviews(tmp_path)
    proc, report = enrich(server, src, tmp_path, "--step", SENTIMENT, "--model", "gpt-4o")
    assert proc.returncode == 0, proc.stderr
    price_in, price_out = PRICES["gpt-4o"]
    expected = (report["prompt_tokens"] * price_in + report["completion_tokens"] * price_out) / 1e6
    assert report["cost_usd"] == round(expected, 6) > 0
    assert f"cost ${expected:,.4f}" in summary(proc)

    proc, report = enrich(server, src, tmp_path, "--step", SENTIMENT, "--model", "my-model")
    assert proc.returncode == 0, proc.stderr
    assert report["cost_usd"] == "unknown" and report["steps"][0]["cost_usd"] == "unknown"
    assert "cost unknown (no price for my-model; give one with --prices FILE)" in summary(proc)

    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"my-model": {"input": 1.0, "output": 2.0}}))
    proc, report = enrich(
        server, src, tmp_path, "--step", SENTIMENT, "--model", "my-model", "--prices", str(prices)
    )
    assert proc.returncode == 0, proc.stderr
    # A rerun served from the cache pays nothing; the cached tokens are priced by nobody.
    assert report["cost_usd"] == 0 and report["prompt_tokens"] == 0
    (tmp_path / "cache").rename(tmp_path / "old-cache")
    proc, report = enrich(
        server, src, tmp_path, "--step", SENTIMENT, "--model", "my-model", "--prices", str(prices)
    )
    expected = (report["prompt_tokens"] * 1.0 + report["completion_tokens"] * 2.0) / 1e6
    assert report["cost_usd"] == round(expected, 6) > 0


def test_a_bad_price_file_is_a_usage_error(server: FakeServer, tmp_path: Path) -> None:
    """A price entry that is not {input, output} exits 2 naming the model, before any call."""
    src = reviews(tmp_path)
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"m": 0.5}))
    proc = run(
        [
            "enrich",
            str(src),
            str(tmp_path / "o.parquet"),
            "--step",
            SENTIMENT,
            "--prices",
            str(prices),
            "--base-url",
            server.base_url,
            "--api-key",
            "k",
        ]
    )
    assert proc.returncode == 2
    assert "'m' must be" in proc.stderr and proc.stderr.count("\n") == 1
    assert server.stats().calls == 0


def dry_run(server: FakeServer, src: Path, tmp_path: Path, *steps: str) -> list[dict[str, Any]]:
    report = tmp_path / "plan.json"
    proc = run(
        [
            "enrich",
            str(src),
            str(tmp_path / "o.parquet"),
            "--dry-run",
            "--report",
            str(report),
            "--base-url",
            server.base_url,
            "--api-key",
            "k",
            *steps,
        ]
    )
    assert proc.returncode == 0, proc.stderr
    plans: list[dict[str, Any]] = json.loads(report.read_text())["plan"]
    return plans


def test_dry_run_estimates_completions_from_the_cached_answers(
    server: FakeServer, tmp_path: Path
) -> None:
    """A dry run expects as many completion tokens per call as the step's cached answers had."""
    half = reviews(tmp_path, n=10, unique=10)
    proc, report = enrich(server, half, tmp_path, "--step", SENTIMENT)
    assert proc.returncode == 0, proc.stderr
    per_answer = -(-report["completion_tokens"] // report["steps"][0]["requests"])  # ceil
    more = tmp_path / "more.parquet"
    pl.DataFrame({"review": [f"review {i}" for i in range(30)]}).write_parquet(more)
    (plan,) = dry_run(server, more, tmp_path, "--step", SENTIMENT)
    assert (plan["cached"], plan["to_send"]) == (10, 20)
    assert plan["est_completion_tokens"] == 20 * per_answer


def test_dry_run_estimates_a_classify_step_by_its_labels(
    server: FakeServer, tmp_path: Path
) -> None:
    """With nothing cached, a classify step expects a label's few tokens per call, not 256."""
    src = reviews(tmp_path)
    (plan,) = dry_run(
        server, src, tmp_path, "--classify", SENTIMENT, "--labels", "positive,negative"
    )
    assert plan["to_send"] == 10
    longest = len(json.dumps({"label": "positive"})) // 4 + 1
    assert plan["est_completion_tokens"] == 10 * longest


def test_embedded_model_banner_is_a_line_of_its_own(tmp_path: Path) -> None:
    """With the progress bar on, the embedded model's banner starts its own line."""
    src = tmp_path / "in.parquet"
    pl.read_parquet(ROOT / "datasets" / "stdlib_docs.parquet").head(2).write_parquet(src)
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_BASE_URL", "OPENAI_API_KEY")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "polars_llm.cli",
            "enrich",
            str(src),
            str(tmp_path / "o.parquet"),
            "--step",
            "s=In three words: {doc}",
            "--max-tokens",
            "8",
            "--progress",
            "--report",
            str(tmp_path / "r.json"),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    # tqdm redraws with carriage returns: split on them too, as a terminal shows the lines.
    lines = proc.stderr.replace("\r", "\n").splitlines()
    banner = [line for line in lines if "using the embedded model" in line]
    assert banner and all(line.startswith("polars-llm: no endpoint configured") for line in banner)
    bars = [i for i, line in enumerate(lines) if "row/s" in line or "/2 [" in line]
    assert bars and lines.index(banner[0]) < bars[0]
    (step,) = json.loads((tmp_path / "r.json").read_text())["steps"]
    assert (step["endpoint"], step["model"]) == ("embedded", "local")
    assert step["cost_usd"] == 0


def test_prices_cover_dated_names_and_the_env_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dated model name takes its undated price; $POLARS_LLM_PRICES adds to the table."""
    assert price("gpt-4o-mini-2024-07-18") == PRICES["gpt-4o-mini"]
    assert price("no-such-model") is None
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"mine": {"input": 3, "output": 4}}))
    monkeypatch.setenv("POLARS_LLM_PRICES", str(prices))
    table = load_prices()
    assert table["mine"] == (3.0, 4.0) and table["gpt-4o"] == PRICES["gpt-4o"]
