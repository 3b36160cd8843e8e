"""The polars-llm command line, in process (CliRunner) and as a real subprocess, against the fake
server over real HTTP."""

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
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner, Result
from polars.testing import assert_frame_equal

from polars_llm.cli import cli
from polars_llm.settings import Settings
from polars_llm.testing import FakeServer

SENTIMENT = "sentiment=Sentiment of this review, one word: {review}"
REPLY = "reply=Write a short reply to a {sentiment} review: {review}"


def reviews(n: int = 20, unique: int = 8) -> pl.DataFrame:
    """Reviews with repeats, a null and a non-text column."""
    return pl.DataFrame(
        {
            "id": list(range(n)),
            "review": [None if i == 3 else f"review {i % unique}" for i in range(n)],
            "stars": [float(i % 5) for i in range(n)],
        }
    )


def write(df: pl.DataFrame, path: Path, **kwargs: object) -> Path:
    df.write_parquet(path, **kwargs)  # type: ignore[arg-type]
    return path


def endpoint(server: FakeServer, key: str = "test-key") -> list[str]:
    return ["--base-url", server.base_url, "--api-key", key]


def invoke(args: Sequence[str], input: str | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), input=input, catch_exceptions=False)


def run(args: Sequence[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The CLI as a real process; it inherits POLARS_LLM_CACHE_DIR (the test's tmp dir)."""
    return subprocess.run(
        [sys.executable, "-m", "polars_llm.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=os.environ.copy(),
    )


def start(args: Sequence[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "polars_llm.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ.copy(),
    )


def wait_for_calls(server: FakeServer, n: int, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 30
    while server.stats().calls < n:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run made too few calls"
        time.sleep(0.005)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".probe-" in p.name)


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------
def test_multi_step_output_row_by_row(server: FakeServer, tmp_path: Path) -> None:
    """Input columns are kept in order, step columns and a null llm_error appended, row by row."""
    df = reviews()
    src = write(df, tmp_path / "in.parquet")
    out = tmp_path / "out.parquet"
    result = invoke(
        ["enrich", str(src), str(out), "--step", SENTIMENT, "--step", REPLY, *endpoint(server)]
    )
    assert result.exit_code == 0, result.stderr
    got = pl.read_parquet(out)
    assert got.columns == ["id", "review", "stars", "sentiment", "reply", "llm_error"]
    assert got.schema["sentiment"] == pl.String and got.schema["llm_error"] == pl.String
    assert_frame_equal(got.select(df.columns), df)
    for row in got.iter_rows(named=True):
        if row["review"] is None:
            assert row["sentiment"] is None and row["reply"] is None
        else:
            sentiment = f"echo: Sentiment of this review, one word: {row['review']}"
            assert row["sentiment"] == sentiment
            assert row["reply"] == (
                f"echo: Write a short reply to a {sentiment} review: {row['review']}"
            )
        assert row["llm_error"] is None
    assert server.stats().chat_calls == 2 * 8  # each unique prompt sent once
    assert result.stderr.strip().endswith(f"wrote {out}: 20 rows")


def test_small_batches_give_the_same_output_as_one_batch(
    server: FakeServer, tmp_path: Path
) -> None:
    """Batches of 7 rows (one of them all null) give the same file as a single batch."""
    df = reviews(40).with_columns(
        review=pl.when(pl.col("id").is_between(7, 13)).then(None).otherwise(pl.col("review"))
    )
    src = write(df, tmp_path / "in.parquet", row_group_size=10)
    steps = ["--step", SENTIMENT, "--step", REPLY, *endpoint(server)]
    one, many = tmp_path / "one.parquet", tmp_path / "many.parquet"
    assert invoke(["enrich", str(src), str(one), *steps]).exit_code == 0
    result = invoke(["enrich", str(src), str(many), "--batch-size", "7", *steps])
    assert result.exit_code == 0, result.stderr
    assert pq.ParquetFile(many).num_row_groups == 6
    assert pq.ParquetFile(many).schema_arrow == pq.ParquetFile(one).schema_arrow
    assert_frame_equal(pl.read_parquet(many), pl.read_parquet(one))
    assert pl.read_parquet(many).slice(7, 7)["reply"].null_count() == 7


def test_pipeline_file_with_settings_overridden_by_options(tmp_path: Path) -> None:
    """A TOML pipeline runs its steps with its [settings]; command-line options win over them."""

    def reply(body: dict) -> str:
        prompt = body["messages"][-1]["content"]
        return "positive" if prompt.startswith("Mood") else f"{body['model']}: {prompt}"

    (tmp_path / "p.toml").write_text(
        """
[settings]
model = "file-model"
concurrency = 2

[steps.mood]
prompt = "Mood of {review}"
labels = ["positive", "negative"]

[steps.answer]
prompt = "Answer a {mood} review: {review}"
system = "Be brief."
params = { max_tokens = 50 }
"""
    )
    src = write(reviews(), tmp_path / "in.parquet")
    with FakeServer(reply=reply, latency=0.01) as server:
        base = ["enrich", str(src), "--pipeline", str(tmp_path / "p.toml"), *endpoint(server)]
        assert invoke([*base, str(tmp_path / "a.parquet")]).exit_code == 0
        assert server.stats().max_in_flight <= 2
        first = pl.read_parquet(tmp_path / "a.parquet")
        assert invoke([*base, str(tmp_path / "b.parquet"), "--model", "cli-model"]).exit_code == 0
        history = server.history
    assert first.columns == ["id", "review", "stars", "mood", "answer", "llm_error"]
    assert first["mood"].drop_nulls().to_list() == ["positive"] * 19
    assert first["answer"][0] == "file-model: Answer a positive review: review 0"
    assert pl.read_parquet(tmp_path / "b.parquet")["answer"][0].startswith("cli-model: ")
    answer_bodies = [b for b in history if b["messages"][-1]["content"].startswith("Answer")]
    assert answer_bodies[0]["messages"][0] == {"role": "system", "content": "Be brief."}
    assert answer_bodies[0]["max_tokens"] == 50


def test_rerun_is_served_from_the_cache(server: FakeServer, tmp_path: Path) -> None:
    """Running the same command twice calls nothing the second time and gives the same file."""
    src = write(reviews(), tmp_path / "in.parquet")
    out = tmp_path / "out.parquet"
    args = ["enrich", str(src), str(out), "--step", SENTIMENT, *endpoint(server)]
    assert invoke(args).exit_code == 0
    first = pl.read_parquet(out)
    calls = server.stats().calls
    result = invoke(args)
    assert result.exit_code == 0
    assert server.stats().calls == calls
    assert_frame_equal(pl.read_parquet(out), first)
    # The progress line at the end: answers (not rows) from the cache, and nothing paid.
    assert "20/20 rows, 19/19 answers cached, 0 failed, 0 tokens paid" in result.stderr


def test_progress_flags(server: FakeServer, tmp_path: Path) -> None:
    """Without a terminal: a log line by default, a bar with --progress, none with --no-progress."""
    src = write(reviews(), tmp_path / "in.parquet")
    args = ["enrich", str(src), str(tmp_path / "o.parquet"), "--step", SENTIMENT, *endpoint(server)]
    log = invoke(args).stderr
    assert "polars-llm: 20/20 rows, 0/19 answers cached, 0 failed, " in log
    assert " tokens paid, " in log and " rows/s\n" in log
    bar = invoke([*args, "--progress"]).stderr
    assert "20/20 [" in bar and "19/19 answers cached, 0 failed" in bar and "row/s" in bar
    quiet = invoke([*args, "--no-progress"]).stderr.splitlines()
    # No progress, only the closing summary.
    assert quiet[-1] == f"polars-llm: wrote {tmp_path / 'o.parquet'}: 20 rows"
    assert len(quiet) == 2 and quiet[0].startswith("polars-llm: 19 answers for 20 rows")


# --------------------------------------------------------------------------------------------
# Kill, interrupt, resume
# --------------------------------------------------------------------------------------------
def test_kill_9_then_rerun_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    """After kill -9 nothing is at the output path; a rerun finishes it without paying twice."""
    unique, concurrency = 400, 4
    src = write(
        pl.DataFrame({"q": [f"question {i}" for i in range(unique)]}), tmp_path / "in.parquet"
    )
    with FakeServer(latency=0.05) as server:
        step = ["--step", "a=Answer {q}", *endpoint(server), "--batch-size", "100"]
        reference = tmp_path / "reference.parquet"
        ref_opts = ["--cache-dir", str(tmp_path / "ref-cache"), "--concurrency", "32"]
        result = invoke(["enrich", str(src), str(reference), *step, *ref_opts])
        assert result.exit_code == 0, result.stderr
        server.reset_stats()

        out = tmp_path / "out.parquet"
        args = ["enrich", str(src), str(out), *step, "--concurrency", str(concurrency)]
        proc = start(args)
        wait_for_calls(server, 100, proc)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=10)
        assert proc.returncode == -signal.SIGKILL
        assert not out.exists()
        killed_calls = server.stats().calls
        assert killed_calls < unique

        done = run(args)
        assert done.returncode == 0, done.stderr
        stats = server.stats()
    assert_frame_equal(pl.read_parquet(out), pl.read_parquet(reference))
    # Paid again: what was in flight at the kill, and the answers the cache writer was still
    # gathering (it writes every few milliseconds; a busy run's every 50 at most, see
    # cache._GATHER): a round of the concurrency each at most at this rate.
    assert stats.calls <= unique + 2 * concurrency
    assert sum(n - 1 for n in stats.prompts.values()) <= 2 * concurrency
    assert stats.calls - killed_calls < unique  # the rerun did not start over
    assert leftovers(tmp_path) == []  # the killed run's temporary file was cleaned up


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_leaves_nothing_behind(tmp_path: Path, sig: int, code: int) -> None:
    """Ctrl-C or SIGTERM mid-run exits 130/143, removes the temporary file and writes no output."""
    src = write(pl.DataFrame({"q": [f"q{i}" for i in range(300)]}), tmp_path / "in.parquet")
    out = tmp_path / "out.parquet"
    with FakeServer(latency=0.05) as server:
        opts = ["--concurrency", "4", "--batch-size", "50", "--report", str(tmp_path / "r.json")]
        step = ["--step", "a=Say {q}", *endpoint(server)]
        proc = start(["enrich", str(src), str(out), *step, *opts])
        wait_for_calls(server, 80, proc)
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=20)
    assert proc.returncode == code, stderr
    assert not out.exists()
    assert leftovers(tmp_path) == []
    assert "rerun the same command to resume" in stderr.lower()
    assert "Traceback" not in stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["exit_code"] == code and 0 < report["rows_done"] < 300


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------
def _bad_cases(tmp: Path) -> dict[str, tuple[list[str], int, str]]:
    good = write(reviews(), tmp / "in.parquet")
    (tmp / "notes.txt").write_text("not parquet\n")
    empty = write(reviews().clear(), tmp / "empty.parquet")
    enriched = write(reviews().with_columns(llm_error=None), tmp / "enriched.parquet")
    (tmp / "a-file").write_text("")
    out = str(tmp / "out.parquet")
    return {
        "missing file": (
            [str(tmp / "nope.parquet"), out, "--step", SENTIMENT],
            3,
            "does not exist",
        ),
        "not parquet": ([str(tmp / "notes.txt"), out, "--step", SENTIMENT], 3, "not a Parquet"),
        "missing column": (
            [str(good), out, "--step", "s=Summarize {title}: {review}"],
            3,
            "{title} is not a column",
        ),
        "unknown placeholder": (
            [str(good), out, "--step", SENTIMENT, "--step", "r=Reply to a {sentimnet} review"],
            3,
            "did you mean {sentiment}?",
        ),
        "step named like a column": (
            [str(good), out, "--step", "stars=Rate {review}"],
            3,
            "another name",
        ),
        "empty file": ([str(empty), out, "--step", SENTIMENT], 3, "has no rows"),
        "already enriched": ([str(enriched), out, "--step", SENTIMENT], 3, "drop that column"),
        "output folder missing": (
            [str(good), str(tmp / "no" / "out.parquet"), "--step", SENTIMENT],
            3,
            "does not exist",
        ),
        "output folder is a file": (
            [str(good), str(tmp / "a-file" / "out.parquet"), "--step", SENTIMENT],
            3,
            "not a folder",
        ),
        "step without =": ([str(good), out, "--step", "sentiment"], 2, "NAME=TEMPLATE"),
        "malformed template": ([str(good), out, "--step", "s=Say {review"], 2, "malformed"),
        "later step": (
            [
                str(good),
                out,
                "--step",
                "r=Reply to {s}",
                "--step",
                SENTIMENT.replace("sentiment", "s"),
            ],
            2,
            "put step 's' first",
        ),
        "no steps": ([str(good), out], 2, "no steps"),
        "bad pipeline file": (
            [str(good), out, "--pipeline", str(tmp / "notes.txt")],
            2,
            "not valid TOML",
        ),
    }


BAD_IDS = [
    "missing file",
    "not parquet",
    "missing column",
    "unknown placeholder",
    "step named like a column",
    "empty file",
    "already enriched",
    "output folder missing",
    "output folder is a file",
    "step without =",
    "malformed template",
    "later step",
    "no steps",
    "bad pipeline file",
]


@pytest.mark.parametrize("case", BAD_IDS)
def test_bad_input_is_one_line_with_its_exit_code(
    server: FakeServer, tmp_path: Path, case: str
) -> None:
    """Each bad input gives one 'polars-llm: error:' line saying what to fix, its code, no output."""
    args, code, hint = _bad_cases(tmp_path)[case]
    result = invoke(["enrich", *args, *endpoint(server)])
    lines = result.stderr.splitlines()
    assert result.exit_code == code, result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("polars-llm: error: ")
    assert hint in lines[0]
    assert not (tmp_path / "out.parquet").exists()
    assert leftovers(tmp_path) == []
    assert server.stats().calls == 0


def test_unwritable_output_folder(server: FakeServer, tmp_path: Path) -> None:
    """An output folder that cannot be written to is refused before any call, with exit 3."""
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        target = folder
        if not _refuses_files(folder):  # root ignores permissions; sysfs refuses even root
            target = Path("/sys")
            assert _refuses_files(target), "this test needs a folder that refuses new files"
        src = write(reviews(), tmp_path / "in.parquet")
        out = target / "out.parquet"
        result = invoke(["enrich", str(src), str(out), "--step", SENTIMENT, *endpoint(server)])
    finally:
        folder.chmod(0o700)
    assert result.exit_code == 3
    assert result.stderr.startswith("polars-llm: error: cannot write in the output folder")
    assert len(result.stderr.splitlines()) == 1
    assert server.stats().calls == 0
    assert not out.exists()


def _refuses_files(folder: Path) -> bool:
    probe = folder / "polars-llm-probe"
    try:
        probe.touch()
    except OSError:
        return True
    probe.unlink()
    return False


def test_bad_input_in_a_real_process_has_no_traceback(tmp_path: Path) -> None:
    """As a real process, a missing file and a malformed --step print one line each, no traceback."""
    missing = run(
        ["enrich", str(tmp_path / "nope.parquet"), str(tmp_path / "o.parquet"), "--step", SENTIMENT]
    )
    assert missing.returncode == 3
    assert missing.stderr.splitlines() == [
        f"polars-llm: error: input file {tmp_path / 'nope.parquet'} does not exist; check the path"
    ]
    src = write(reviews(), tmp_path / "in.parquet")
    malformed = run(["enrich", str(src), str(tmp_path / "o.parquet"), "--step", "oops"])
    assert malformed.returncode == 2
    assert len(malformed.stderr.splitlines()) == 1
    assert malformed.stderr.startswith("polars-llm: error: Invalid value for '--step'")
    assert not (tmp_path / "o.parquet").exists()


# --------------------------------------------------------------------------------------------
# Dry run and report
# --------------------------------------------------------------------------------------------
def test_dry_run_calls_nothing_and_counts_the_cache(server: FakeServer, tmp_path: Path) -> None:
    """A dry run prints per-step counts and writes nothing; after a partial run it counts hits."""
    src = write(reviews(), tmp_path / "in.parquet")
    out = tmp_path / "out.parquet"
    args = ["enrich", str(src), str(out), "--step", SENTIMENT, "--step", REPLY, *endpoint(server)]
    before = invoke([*args, "--dry-run"])
    assert before.exit_code == 0, before.stderr
    assert server.stats().calls == 0
    assert not out.exists()
    rows = {line.split()[0]: line.split() for line in before.stdout.splitlines() if line}
    # step, model, prompts, unique, cached, to send, unknown, ...
    assert rows["sentiment"][1:7] == ["gpt-4o-mini", "19", "8", "0", "8", "0"]
    assert rows["reply"][2:7] == ["19", "0", "0", "0", "19"]
    assert "$" in rows["sentiment"][-1]  # gpt-4o-mini has a known price
    assert "Approximate" not in before.stdout

    part = write(reviews().head(6), tmp_path / "part.parquet")
    assert invoke(["enrich", str(part), str(tmp_path / "p.parquet"), *args[3:]]).exit_code == 0
    calls = server.stats().calls
    after = invoke([*args, "--dry-run", "--batch-size", "5"])
    assert server.stats().calls == calls
    rows = {line.split()[0]: line.split() for line in after.stdout.splitlines() if line}
    # Batches of 5 rows: unique prompts are summed per batch, and the output says so.
    assert rows["sentiment"][2:6] == ["19", "19", "13", "6"]
    assert rows["reply"][2:7] == ["19", "13", "13", "0", "6"]
    assert "Approximate: the input was read in 4 batches" in after.stdout
    assert not out.exists()


def test_report_json(server: FakeServer, tmp_path: Path) -> None:
    """--report writes what the run did: rows, calls, cache hits, failures, tokens, code, steps."""
    src = write(reviews(), tmp_path / "in.parquet")
    out, report_path = tmp_path / "out.parquet", tmp_path / "run.json"
    args = ["enrich", str(src), str(out), "--step", SENTIMENT, "--step", REPLY, *endpoint(server)]
    assert invoke([*args, "--report", str(report_path)]).exit_code == 0
    report = json.loads(report_path.read_text())
    assert report["input"] == str(src) and report["output"] == str(out)
    assert (report["rows"], report["rows_done"], report["calls"]) == (20, 20, 16)
    assert (report["cache_hits"], report["failed_rows"], report["failures_by_reason"]) == (0, 0, {})
    assert report["prompt_tokens"] > 0 and report["completion_tokens"] > 0
    assert report["exit_code"] == 0 and report["error"] is None
    assert report["seconds"] > 0
    assert [s["name"] for s in report["steps"]] == ["sentiment", "reply"]

    assert invoke([*args, "--report", str(report_path)]).exit_code == 0
    again = json.loads(report_path.read_text())
    assert (again["calls"], again["cache_hits"]) == (0, 19 + 19)


# --------------------------------------------------------------------------------------------
# Failures
# --------------------------------------------------------------------------------------------
def _empty_for_bad(body: dict) -> str:
    prompt = body["messages"][-1]["content"]
    return "" if "review 2" in prompt else f"echo: {prompt}"


def test_too_many_failed_rows_exit_4_and_no_output(tmp_path: Path) -> None:
    """Failed rows above --max-failed-rows and --max-failed-rate: exit 4, no file, a report."""
    src = write(reviews(), tmp_path / "in.parquet")  # 'review 2' in rows 2, 10, 18
    out, report_path = tmp_path / "out.parquet", tmp_path / "run.json"
    with FakeServer(reply=_empty_for_bad) as server:
        args = ["enrich", str(src), str(out), "--step", SENTIMENT, *endpoint(server)]
        result = invoke([*args, "--report", str(report_path)])
        assert result.exit_code == 4
        assert not out.exists() and leftovers(tmp_path) == []
        assert result.stderr.splitlines()[-1].startswith(
            "polars-llm: error: 3 row(s) failed, more than the 0 allowed"
        )
        assert "EmptyCompletion" in result.stderr
        report = json.loads(report_path.read_text())
        assert report["exit_code"] == 4 and "3 row(s) failed" in report["error"]
        assert report["failures_by_reason"] == {"EmptyCompletion": 3}

        assert invoke([*args, "--max-failed-rows", "2", "--max-failed-rate", "0.1"]).exit_code == 4
        assert not out.exists()


@pytest.mark.parametrize("limit", [["--max-failed-rows", "3"], ["--max-failed-rate", "0.15"]])
def test_failed_rows_within_the_limit_are_written_with_their_error(
    tmp_path: Path, limit: list[str]
) -> None:
    """Within the limit the run succeeds and each failed row says why in llm_error."""
    src = write(reviews(), tmp_path / "in.parquet")
    out = tmp_path / "out.parquet"
    with FakeServer(reply=_empty_for_bad) as server:
        result = invoke(
            ["enrich", str(src), str(out), "--step", SENTIMENT, *endpoint(server), *limit]
        )
    assert result.exit_code == 0, result.stderr
    got = pl.read_parquet(out)
    failed = got.filter(pl.col("llm_error").is_not_null())
    assert failed["id"].to_list() == [2, 10, 18]
    assert failed["sentiment"].null_count() == 3
    assert failed["llm_error"][0].startswith("sentiment: EmptyCompletion: ")
    assert (
        got.filter(pl.col("llm_error").is_null())["sentiment"].null_count() == 1
    )  # the null review
    assert "3 failed (see llm_error)" in result.stderr


def test_bad_api_key_aborts_with_exit_5(tmp_path: Path) -> None:
    """A wrong key stops the run within the first round of the concurrency (a 401 is not
    billed) with exit 5 and a clear message."""
    src = write(pl.DataFrame({"q": [f"q{i}" for i in range(200)]}), tmp_path / "in.parquet")
    out = tmp_path / "out.parquet"
    with FakeServer(api_key="right-key") as server:
        proc = run(
            ["enrich", str(src), str(out), "--step", "a=Say {q}", *endpoint(server, "wrong-key")]
        )
        calls = server.stats().calls
    assert proc.returncode == 5, proc.stderr
    assert 1 <= calls <= Settings().concurrency
    line = proc.stderr.splitlines()[-1]
    assert line.startswith("polars-llm: error: aborted: ")
    assert "Incorrect API key" in line and "--api-key" in line and "$OPENAI_API_KEY" in line
    assert line.count("--api-key") == 1
    assert "Traceback" not in proc.stderr
    assert not out.exists() and leftovers(tmp_path) == []


# --------------------------------------------------------------------------------------------
# cache and help
# --------------------------------------------------------------------------------------------
def test_cache_stats_and_clear(server: FakeServer, tmp_path: Path) -> None:
    """cache stats shows folder, entries and size; clear asks first, --yes does not; both honour
    --cache-dir and $POLARS_LLM_CACHE_DIR."""
    src = write(reviews(), tmp_path / "in.parquet")
    env_dir = Path(os.environ["POLARS_LLM_CACHE_DIR"])
    other = tmp_path / "other-cache"
    args = ["enrich", str(src), str(tmp_path / "o.parquet"), "--step", SENTIMENT, *endpoint(server)]
    assert invoke(args).exit_code == 0
    assert invoke([*args, "--cache-dir", str(other), "--step", REPLY]).exit_code == 0

    stats = invoke(["cache", "stats"])
    assert stats.exit_code == 0
    assert f"folder:  {env_dir}" in stats.stdout and "entries: 8\n" in stats.stdout
    assert "KiB" in stats.stdout
    assert "entries: 16\n" in invoke(["cache", "stats", "--cache-dir", str(other)]).stdout

    refused = invoke(["cache", "clear"], input="n\n")
    assert refused.exit_code == 0 and "nothing removed" in refused.stdout
    assert "entries: 8\n" in invoke(["cache", "stats"]).stdout
    confirmed = invoke(["cache", "clear"], input="y\n")
    assert f"removed 8 entries from {env_dir}" in confirmed.stdout
    assert "entries: 0\n" in invoke(["cache", "stats"]).stdout
    forced = invoke(["cache", "clear", "--yes", "--cache-dir", str(other)])
    assert f"removed 16 entries from {other}" in forced.stdout


def test_help_explains_every_option_and_the_exit_codes() -> None:
    """enrich --help lists every option with an example, the exit codes and example commands."""
    result = invoke(["enrich", "--help"])
    assert result.exit_code == 0
    text = result.stdout
    for option in [
        "--step", "--pipeline", "--model", "--system", "--max-tokens", "--temperature",
        "--base-url", "--api-key", "--concurrency", "--rpm", "--tpm", "--timeout",
        "--cache-dir", "--no-cache", "--batch-size", "--max-failed-rows", "--max-failed-rate",
        "--dry-run", "--report", "--progress / --no-progress",
    ]:  # fmt: skip
        assert option in text, option
    assert text.count("Example:") >= 15
    assert "Exit codes:" in text and "130" in text
    assert "polars-llm enrich reviews.parquet enriched.parquet" in text


def test_abandoned_temp_files_are_removed_but_live_ones_kept(
    server: FakeServer, tmp_path: Path
) -> None:
    """A temp file left by a killed run is deleted; one locked by a run in progress is not."""
    src = write(reviews(), tmp_path / "in.parquet")
    out = tmp_path / "out.parquet"
    abandoned = tmp_path / ".out.parquet.tmp-abandoned"
    abandoned.write_bytes(b"partial")
    live = tmp_path / ".out.parquet.tmp-live"
    live.write_bytes(b"in progress")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys, time\n"
            f"f = open({str(live)!r}, 'rb'); fcntl.flock(f, fcntl.LOCK_EX)\n"
            "print('locked', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        result = invoke(["enrich", str(src), str(out), "--step", SENTIMENT, *endpoint(server)])
        assert result.exit_code == 0, result.stderr
        assert not abandoned.exists()
        assert live.exists()
    finally:
        holder.kill()
        holder.wait()


# --------------------------------------------------------------------------------------------
# Robustness: permissions, --report, column types, text encoding, pipeline file values
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600)])
def test_output_permissions_follow_the_umask(
    server: FakeServer, tmp_path: Path, umask: int, mode: int
) -> None:
    """The output file gets the mode any new file would get under the caller's umask."""
    src, out = write(reviews(), tmp_path / "in.parquet"), tmp_path / "out.parquet"
    shell = ["sh", "-c", f'umask {umask:03o} && exec "$@"', "sh"]
    command = [sys.executable, "-m", "polars_llm.cli", "enrich", str(src), str(out)]
    proc = subprocess.run(
        [*shell, *command, "--step", SENTIMENT, *endpoint(server)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_mode & 0o777 == mode


@pytest.mark.parametrize("target", ["input", "output"])
def test_report_naming_the_input_or_output_is_refused(
    server: FakeServer, tmp_path: Path, target: str
) -> None:
    """--report naming INPUT or OUTPUT exits 2 with one line before anything runs."""
    src, out = write(reviews(), tmp_path / "in.parquet"), tmp_path / "out.parquet"
    before = src.read_bytes()
    named = {"input": tmp_path / "." / "in.parquet", "output": out}[target]
    proc = run(
        [
            "enrich",
            str(src),
            str(out),
            "--step",
            SENTIMENT,
            *endpoint(server),
            "--report",
            str(named),
        ]
    )
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"polars-llm: error: --report {named} names the {target} file; give the report its own "
        "file, e.g. --report run.json"
    ]
    assert src.read_bytes() == before and not out.exists()
    assert server.stats().calls == 0


def _unusable_columns(folder: Path) -> Path:
    path = folder / "typed.parquet"
    pl.DataFrame(
        {
            "text": ["a", "b"],
            "tags": [["x", "y"], ["z"]],
            "blob": [b"\x00\x01", b"\x02"],
            "point": [{"x": 1, "y": 2}, {"x": 3, "y": 4}],
        }
    ).with_columns(pair=pl.concat_list("text", "text").list.to_array(2)).write_parquet(path)
    return path


@pytest.mark.parametrize(
    ("column", "kind"),
    [("tags", "a list"), ("pair", "an array"), ("blob", "a binary"), ("point", "a struct")],
)
def test_a_template_naming_a_list_array_binary_or_struct_column_exits_3(
    server: FakeServer, tmp_path: Path, column: str, kind: str
) -> None:
    """A column that is not text, numbers or dates is bad input: one line, exit 3, no calls."""
    src, out = _unusable_columns(tmp_path), tmp_path / "out.parquet"
    proc = run(["enrich", str(src), str(out), "--step", f"s=Say {{{column}}}", *endpoint(server)])
    assert proc.returncode == 3, proc.stderr
    (line,) = proc.stderr.splitlines()
    assert line.startswith(f"polars-llm: error: column '{column}' of {src} is {kind} column")
    assert f"pl.col('{column}')." in line
    assert server.stats().calls == 0 and not out.exists() and leftovers(tmp_path) == []


def test_text_that_is_not_utf8_exits_3(server: FakeServer, tmp_path: Path) -> None:
    """A Parquet text column holding Latin-1 bytes is bad input: one line, exit 3, no output."""
    import pyarrow as pa

    latin = pa.array(["fine", None, "caf\xe9"], pa.large_string())
    raw = pa.array([b"fine", None, "caf\xe9".encode("latin-1")], pa.large_binary())
    src, out = tmp_path / "latin.parquet", tmp_path / "out.parquet"
    # Parquet stores text as bytes and does not check them: label Latin-1 bytes as text.
    pq.write_table(pa.table({"t": raw.view(latin.type)}), src)
    proc = run(["enrich", str(src), str(out), "--step", "s=Say {t}", *endpoint(server)])
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.splitlines() == [
        f"polars-llm: error: {src} holds text that is not valid UTF-8 in columns t (In column 0: "
        "Invalid: Invalid UTF8 sequence at string index 2); re-encode it as UTF-8"
    ]
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("toml", "hint"),
    [
        (
            '[settings]\nconcurrency = "x"\n',
            "[settings] concurrency must be a whole number; got 'x'",
        ),
        ('[steps.s]\nprompt = "Say {review}"\nlabels = 3\n', "labels must be a list of strings"),
        ('[steps.s]\nprompt = "Say {review}"\nparams = 5\n', "params must be a table"),
        ('[steps.s]\nprompt = "Say {review}"\nmodel = 5\n', "model must be a string"),
        ("[steps]\ns = 3\n", "steps.s must be a table"),
        ('[steps.s]\nprompt = "Say {review} caf\xe9"\n', "is not UTF-8 text"),
    ],
)
def test_wrongly_typed_pipeline_file_values_exit_2(
    server: FakeServer, tmp_path: Path, toml: str, hint: str
) -> None:
    """A pipeline value of the wrong type, or a file not in UTF-8: one line naming it, exit 2."""
    pipeline_file = tmp_path / "pipeline.toml"
    pipeline_file.write_bytes(toml.encode("latin-1"))
    if "[steps" not in toml:
        with pipeline_file.open("a") as fh:
            fh.write('[steps.s]\nprompt = "Say {review}"\n')
    src, out = write(reviews(), tmp_path / "in.parquet"), tmp_path / "out.parquet"
    proc = run(["enrich", str(src), str(out), "--pipeline", str(pipeline_file), *endpoint(server)])
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.splitlines()
    assert line.startswith(f"polars-llm: error: {pipeline_file}") or "pipeline file" in line
    assert hint in line
    assert server.stats().calls == 0 and not out.exists()
