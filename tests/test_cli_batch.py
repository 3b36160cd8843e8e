"""`polars-llm enrich --batch`, `batch list|status|cancel` and the library's batch=True, as real
processes against the fake server's Batch API over real HTTP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from polars_llm.testing import FakeServer

SENTIMENT = "sentiment=Sentiment of this review, one word: {review}"
REPLY = "reply=Write a short reply to a {sentiment} review: {review}"


def reviews(n: int = 30, unique: int = 10) -> pl.DataFrame:
    """Reviews with repeats and a null."""
    return pl.DataFrame(
        {
            "id": list(range(n)),
            "review": [None if i == 4 else f"review {i % unique}" for i in range(n)],
        }
    )


def cli(args: Sequence[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "polars_llm.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=os.environ.copy(),
    )


def finish_while_advancing(
    server: FakeServer, args: Sequence[str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run the CLI while the batch clock jumps ahead, so that every batch it waits on ends."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "polars_llm.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ.copy(),
    )
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        server.advance_batches(2000)
        time.sleep(0.2)
    stdout, stderr = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def enrich(server: FakeServer, src: Path, out: Path, *extra: str) -> list[str]:
    return [
        "enrich",
        str(src),
        str(out),
        "--step",
        SENTIMENT,
        "--step",
        REPLY,
        "--base-url",
        server.base_url,
        "--api-key",
        "x",
        *extra,
    ]


@pytest.fixture
def src(tmp_path: Path) -> Path:
    path = tmp_path / "in.parquet"
    reviews().write_parquet(path)
    return path


def test_a_two_step_batch_run_gives_the_synchronous_frame_without_chat_calls(
    src: Path, tmp_path: Path
) -> None:
    """--batch writes the same frame as a synchronous run, through batches only."""
    with FakeServer(batch_seconds=0.3) as server:
        sync_out, batch_out = tmp_path / "sync.parquet", tmp_path / "batch.parquet"
        sync = cli([*enrich(server, src, sync_out), "--cache-dir", str(tmp_path / "c1")])
        assert sync.returncode == 0, sync.stderr
        server.reset_stats()
        done = cli(
            [*enrich(server, src, batch_out, "--batch"), "--cache-dir", str(tmp_path / "c2")]
        )
        assert done.returncode == 0, done.stderr
        assert_frame_equal(pl.read_parquet(batch_out), pl.read_parquet(sync_out))
        stats = server.stats()
        assert stats.chat_calls == 0
        # One round per step, each unique prompt once.
        assert stats.batches_created == 2 and stats.batch_lines == 2 * 10
        assert "batches: 1/1 ended" in done.stderr


def test_a_batch_runs_numbers_are_the_synchronous_runs_at_half_the_cost(
    src: Path, tmp_path: Path
) -> None:
    """--batch counts each step as a synchronous run of the same input does (answers, cached,
    requests, calls, tokens paid and served from the cache, read in several frames), and its
    cost is at Batch API prices: half. A rerun asks nothing and pays nothing."""
    runs = {}
    with FakeServer(batch_seconds=0.3) as server:
        for name, extra, cache in (
            ("sync", (), "c1"),
            ("batch", ("--batch",), "c2"),
            ("rerun", ("--batch",), "c2"),
        ):
            report = tmp_path / f"{name}.json"
            done = cli(
                [
                    *enrich(server, src, tmp_path / f"{name}.parquet", *extra),
                    *("--cache-dir", str(tmp_path / cache), "--batch-size", "12"),
                    *("--report", str(report)),
                ]
            )
            assert done.returncode == 0, done.stderr
            runs[name] = (json.loads(report.read_text()), done.stderr)
    (sync, _), (batch, said), (rerun, said_again) = runs["sync"], runs["batch"], runs["rerun"]

    def numbers(report: dict) -> list[dict]:
        return [{k: v for k, v in step.items() if k != "cost_usd"} for step in report["steps"]]

    assert numbers(batch) == numbers(sync)
    assert [s["requests"] for s in batch["steps"]] == [10, 10]
    assert [s["cached"] for s in batch["steps"]] == [17, 17]  # repeats across the 3 frames
    for ours, theirs in zip(batch["steps"], sync["steps"], strict=True):
        assert ours["cost_usd"] == pytest.approx(theirs["cost_usd"] / 2, abs=1e-6)  # rounded
    assert "58 answers for 30 rows x 2 step(s): 34 from the cache, 24 asked in 20 calls" in said
    assert [(s["requests"], s["prompt_tokens"]) for s in rerun["steps"]] == [(0, 0), (0, 0)]
    assert "58 from the cache, 0 asked in 0 calls" in said_again


def test_a_refused_line_counts_as_one_request_across_frames(src: Path, tmp_path: Path) -> None:
    """A line refused by the Batch API is one request and one call of its step, however many
    frames read its error back; the steps' calls add up to the lines sent."""
    with FakeServer(batch_seconds=0.2, batch_refuse="review 3") as server:
        report = tmp_path / "run.json"
        done = cli(
            [
                *enrich(server, src, tmp_path / "out.parquet", "--batch"),
                *("--batch-size", "12", "--max-failed-rows", "100", "--report", str(report)),
            ]
        )
        assert done.returncode == 0, done.stderr
        lines = server.stats().batch_lines
    numbers = json.loads(report.read_text())
    sentiment, reply = numbers["steps"]
    assert (sentiment["requests"], sentiment["calls"]) == (10, 10)  # "review 3" refused once
    assert reply["requests"] == 9  # no reply to the refused review
    assert sentiment["calls"] + reply["calls"] == numbers["calls"] == lines


def test_failed_and_expired_lines_are_resubmitted_near_the_unique_count(
    src: Path, tmp_path: Path
) -> None:
    """5xx and expired lines go out again; the lines sent stay near the unique prompts."""
    with FakeServer(
        batch_seconds=0.2, batch_error_rate=0.1, batch_expire_rate=0.1, seed=11
    ) as server:
        out = tmp_path / "out.parquet"
        done = cli(enrich(server, src, out, "--batch"))
        assert done.returncode == 0, done.stderr
        got = pl.read_parquet(out)
        assert got.get_column("llm_error").null_count() == got.height
        assert got.get_column("reply").null_count() == 1
        stats = server.stats()
        assert stats.chat_calls == 0
        assert stats.batches_created > 2
        assert 20 < stats.batch_lines <= 20 * 1.6


def test_a_refused_line_is_a_row_error_with_its_reason(src: Path, tmp_path: Path) -> None:
    """A 400 line becomes that row's llm_error, and it is not resubmitted."""
    with FakeServer(batch_seconds=0.2, batch_refuse="review 3") as server:
        out = tmp_path / "out.parquet"
        done = cli([*enrich(server, src, out, "--batch"), "--max-failed-rows", "5"])
        assert done.returncode == 0, done.stderr
        errors = pl.read_parquet(out).get_column("llm_error").drop_nulls()
        assert errors.len() == 3
        assert errors[0].startswith("sentiment: BadRequest:") and "safety system" in errors[0]
        assert server.stats().batch_lines == 10 + 9


def test_kill_9_while_waiting_then_a_rerun_resumes_the_same_batch(
    src: Path, tmp_path: Path
) -> None:
    """A run killed while it waits leaves its batch in the ledger; the rerun waits on it."""
    with FakeServer(batch_seconds=1000) as server:
        out = tmp_path / "out.parquet"
        proc = subprocess.Popen(
            [sys.executable, "-m", "polars_llm.cli", *enrich(server, src, out, "--batch")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=os.environ.copy(),
        )
        deadline = time.monotonic() + 60
        while server.stats().batches_created < 1:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.5)  # into its wait
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        server.advance_batches(2000)
        done = finish_while_advancing(server, enrich(server, src, out, "--batch"))
        assert done.returncode == 0, done.stderr
        stats = server.stats()
        assert stats.batches_created == 2 and stats.batch_lines == 2 * 10
        assert pl.read_parquet(out).get_column("reply").null_count() == 1


def test_no_wait_exits_75_writes_nothing_and_later_runs_finish(src: Path, tmp_path: Path) -> None:
    """--no-wait submits and exits 75 without output; reruns submit the next step, then write."""
    with FakeServer(batch_seconds=1000) as server:
        out = tmp_path / "out.parquet"
        args = enrich(server, src, out, "--batch", "--no-wait")
        first = cli(args)
        assert first.returncode == 75, first.stderr
        assert "pending; rerun the same command later" in first.stderr
        assert not out.exists() and not list(tmp_path.glob(".out.parquet*"))
        again = cli(args)
        assert again.returncode == 75 and server.stats().batches_created == 1
        server.advance_batches(2000)
        second = cli(args)
        assert second.returncode == 75 and not out.exists()
        assert server.stats().batches_created == 2
        server.advance_batches(2000)
        third = cli(args)
        assert third.returncode == 0, third.stderr
        assert pl.read_parquet(out).height == 30
        assert server.stats().batch_lines == 20 and server.stats().chat_calls == 0


def test_answers_sent_by_runs_stopped_at_exit_75_count_as_paid_in_the_run_that_finishes(
    src: Path, tmp_path: Path
) -> None:
    """--no-wait three times: step 1 is sent, then collected while step 2 is sent, then step 2
    is collected. The run that finishes counts both steps as a synchronous run does (step 1's
    answers were paid for, not served from the cache), and each run's calls are its lines."""
    with FakeServer(batch_seconds=1000) as server:
        sync_report = tmp_path / "sync.json"
        sync = cli(
            [
                *enrich(server, src, tmp_path / "sync.parquet"),
                *("--cache-dir", str(tmp_path / "c1"), "--report", str(sync_report)),
            ]
        )
        assert sync.returncode == 0, sync.stderr
        server.reset_stats()
        reports, codes, said = [], [], ""
        # The last run finishes; a rerun then serves everything from the cache.
        for name in ("first", "second", "last", "rerun"):
            report = tmp_path / f"{name}.json"
            done = cli(
                [
                    *enrich(server, src, tmp_path / "out.parquet", "--batch", "--no-wait"),
                    *("--cache-dir", str(tmp_path / "c2"), "--report", str(report)),
                ]
            )
            codes.append(done.returncode)
            reports.append(json.loads(report.read_text()))
            said = done.stderr
            server.advance_batches(2000)
        assert codes == [75, 75, 0, 0], said
        assert server.stats().batch_lines == 20
    expected = json.loads(sync_report.read_text())["steps"]
    last = reports[2]["steps"]
    for key in ("answers", "cached", "requests", "prompt_tokens", "completion_tokens"):
        assert [s[key] for s in last] == [s[key] for s in expected], key
    assert [s["requests"] for s in last] == [10, 10]
    for ours, theirs in zip(last, expected, strict=True):
        assert ours["cost_usd"] == pytest.approx(theirs["cost_usd"] / 2, abs=1e-6)
    # Each stop reported the lines it submitted; the last runs submitted none.
    assert [r["calls"] for r in reports] == [10, 10, 0, 0]
    assert not (tmp_path / "c2" / "batches" / "unreported.keys").exists()
    # Counted once: the rerun pays nothing.
    rerun = reports[3]["steps"]
    assert [(s["requests"], s["prompt_tokens"]) for s in rerun] == [(0, 0), (0, 0)]


def test_batch_cancel_stops_the_batches_and_a_rerun_resubmits_the_rest(
    src: Path, tmp_path: Path
) -> None:
    """`batch cancel` cancels the running batches; `batch status` shows it; a rerun finishes."""
    with FakeServer(batch_seconds=100) as server:
        out = tmp_path / "out.parquet"
        endpoint = ["--base-url", server.base_url, "--api-key", "x"]
        assert cli(enrich(server, src, out, "--batch", "--no-wait")).returncode == 75
        server.advance_batches(50)
        cancelled = cli(["batch", "cancel", "--json", *endpoint])
        assert cancelled.returncode == 0, cancelled.stderr
        ids = json.loads(cancelled.stdout)["cancelled"]
        assert len(ids) == 1
        status = cli(["batch", "status", "--json", *endpoint])
        assert status.returncode == 0, status.stderr
        [entry] = json.loads(status.stdout)
        assert (entry["batch_id"], entry["status"], entry["lines"]) == (ids[0], "cancelled", 10)
        listed = cli(["batch", "list"])
        assert ids[0] in listed.stdout and "cancelled" in listed.stdout
        assert cli(["batch", "cancel", "--json", *endpoint]).stdout.strip() == '{"cancelled": []}'
        rerun = cli(enrich(server, src, out, "--batch", "--no-wait"))
        assert rerun.returncode == 75
        # Half the lines were done before the cancel: only the other half goes out again.
        assert server.stats().batch_lines == 10 + 5
        server.advance_batches(1000)
        done = finish_while_advancing(server, enrich(server, src, out, "--batch"))
        assert done.returncode == 0, done.stderr
        assert server.stats().batch_lines == 10 + 5 + 10


def test_batch_commands_reject_an_unknown_batch_in_one_line(tmp_path: Path) -> None:
    """Cancelling a batch the ledger does not know is a usage error, not a traceback."""
    done = cli(["batch", "cancel", "batch_nope"])
    assert done.returncode == 2
    assert done.stderr.strip().startswith("polars-llm: error: no batch batch_nope")
    assert "Traceback" not in done.stderr


def test_dry_run_with_batch_shows_files_lines_and_batch_prices(src: Path, tmp_path: Path) -> None:
    """--dry-run --batch counts the batch files and lines and prices them at half the rate."""
    with FakeServer() as server:
        done = cli(
            [
                *enrich(server, src, tmp_path / "o.parquet", "--batch", "--dry-run"),
                "--model",
                "gpt-4o-mini",
            ]
        )
        assert done.returncode == 0, done.stderr
        line = next(x for x in done.stdout.splitlines() if x.startswith("Batch API:"))
        assert "1 batch file(s) over 1 model(s): 10 line(s) in the first round" in line
        assert "up to 29 more in later rounds" in line
        batch_cost, sync_cost = (
            float(x.split("$")[1].split()[0].rstrip(")")) for x in line.split("at batch prices")
        )
        # Both are shown to 4 decimals: equal to within that rounding.
        assert batch_cost == pytest.approx(sync_cost / 2, abs=1e-4)
        assert server.stats().batches_created == 0


def test_a_pipeline_file_turns_batch_on(src: Path, tmp_path: Path) -> None:
    """`batch = true` under [settings] sends the steps as batches."""
    toml = tmp_path / "p.toml"
    toml.write_text('[settings]\nbatch = true\n[steps.sentiment]\nprompt = "Sentiment: {review}"\n')
    with FakeServer(batch_seconds=0.2) as server:
        out = tmp_path / "o.parquet"
        done = cli(
            [
                "enrich",
                str(src),
                str(out),
                "--pipeline",
                str(toml),
                "--base-url",
                server.base_url,
                "--api-key",
                "x",
            ]
        )
        assert done.returncode == 0, done.stderr
        assert server.stats().batch_lines == 10 and server.stats().chat_calls == 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--no-wait"], "--no-wait goes with --batch"),
        (["--batch", "--no-cache"], "the Batch API keeps its answers and its ledger in the cache"),
    ],
)
def test_batch_options_that_cannot_work_are_one_line_errors(
    src: Path, tmp_path: Path, extra: list[str], message: str
) -> None:
    """--no-wait without --batch, and --batch without a cache, exit 2 with what to do."""
    with FakeServer() as server:
        done = cli(enrich(server, src, tmp_path / "o.parquet", *extra))
        assert done.returncode == 2, done.stderr
        assert message in done.stderr and "Traceback" not in done.stderr
        assert not (tmp_path / "o.parquet").exists()
        assert server.stats().batches_created == 0
