"""What `polars-llm enrich` reads and writes: files, globs, folders of hive partitions, CSV and
NDJSON, and object storage (moto's S3 server on loopback), with the CLI run as a process."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from polars_llm.testing import FakeServer

STEP = "summary=Summarize: {review}"


def run(
    args: list[str], *, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """The CLI as a real process; it inherits POLARS_LLM_CACHE_DIR (the test's tmp dir)."""
    return subprocess.run(
        [sys.executable, "-m", "polars_llm.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def endpoint(server: FakeServer, key: str = "test-key") -> list[str]:
    return ["--base-url", server.base_url, "--api-key", key]


def reviews(start: int, n: int) -> pl.DataFrame:
    return pl.DataFrame(
        {"id": list(range(start, start + n)), "review": [f"r{i}" for i in range(n)]}
    )


def partitioned(root: Path) -> dict[str, pl.DataFrame]:
    """Three hive partitions (one of them split in two files) and the files tools leave beside."""
    parts = {
        "date=2024-01-01/part-0.parquet": reviews(0, 3),
        "date=2024-01-01/part-1.parquet": reviews(3, 2),
        "date=2024-01-02/part-0.parquet": reviews(5, 4),
        "date=2024-01-03/part-0.parquet": reviews(9, 1),
    }
    for relative, df in parts.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        df.write_parquet(root / relative)
    (root / "_SUCCESS").write_text("")
    (root / "date=2024-01-01" / ".part-0.parquet.crc").write_text("not data")
    return parts


def test_folder_of_hive_partitions_gives_one_output_file_per_input_file(
    server: FakeServer, tmp_path: Path
) -> None:
    """A folder in gives the same tree of files out, each enriched, partitions readable again."""
    src, out = tmp_path / "in", tmp_path / "out"
    parts = partitioned(src)
    proc = run(["enrich", str(src), str(out), "--step", STEP, *endpoint(server)])
    assert proc.returncode == 0, proc.stderr
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == sorted(parts)
    for relative, df in parts.items():
        got = pl.read_parquet(out / relative)
        assert_frame_equal(got.select(df.columns), df)
        assert got["summary"].to_list() == [f"echo: Summarize: {r}" for r in df["review"]]
    both = pl.scan_parquet(out / "**/*.parquet", hive_partitioning=True).collect()
    assert both.height == 10 and both["date"].n_unique() == 3
    assert f"wrote 4 files to {out}: 10 rows" in proc.stderr


def test_glob_takes_only_the_files_it_matches(server: FakeServer, tmp_path: Path) -> None:
    """A glob enriches the files it matches, at their path below the glob's folder."""
    src, out = tmp_path / "in", tmp_path / "out"
    parts = partitioned(src)
    proc = run(
        [
            "enrich",
            str(src / "date=2024-01-0[12]" / "part-0.parquet"),
            str(out),
            "--step",
            STEP,
            *endpoint(server),
        ]
    )
    assert proc.returncode == 0, proc.stderr
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == ["date=2024-01-01/part-0.parquet", "date=2024-01-02/part-0.parquet"]
    assert pl.read_parquet(out / written[1]).height == parts[written[1]].height


def test_a_glob_matching_nothing_is_bad_input(server: FakeServer, tmp_path: Path) -> None:
    """A glob that matches no file exits 3 with one line and writes nothing."""
    out = tmp_path / "out"
    proc = run(["enrich", str(tmp_path / "*.parquet"), str(out), "--step", STEP, *endpoint(server)])
    assert proc.returncode == 3
    assert proc.stderr.count("\n") == 1 and "no file matches" in proc.stderr
    assert not out.exists()


def test_an_output_folder_that_is_the_input_is_refused(server: FakeServer, tmp_path: Path) -> None:
    """OUTPUT equal to the INPUT folder would overwrite the inputs: exit 3, nothing sent."""
    src = tmp_path / "in"
    partitioned(src)
    proc = run(["enrich", str(src), str(src), "--step", STEP, *endpoint(server)])
    assert proc.returncode == 3, proc.stderr
    assert "would overwrite its own input" in proc.stderr
    assert server.stats().calls == 0


def test_empty_file_in_a_folder_still_gets_its_output(server: FakeServer, tmp_path: Path) -> None:
    """An input file with no rows gets an output file with the step and error columns."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    reviews(0, 2).write_parquet(src / "a.parquet")
    reviews(0, 0).write_parquet(src / "b.parquet")
    proc = run(["enrich", str(src), str(out), "--step", STEP, *endpoint(server)])
    assert proc.returncode == 0, proc.stderr
    empty = pl.read_parquet(out / "b.parquet")
    assert empty.height == 0
    assert empty.columns == ["id", "review", "summary", "llm_error"]


def test_csv_and_ndjson_are_read_and_written_by_extension(
    server: FakeServer, tmp_path: Path
) -> None:
    """CSV in gives CSV out, NDJSON in NDJSON out, and CSV in with a .parquet OUTPUT Parquet."""
    df = reviews(0, 5)
    df.write_csv(tmp_path / "in.csv")
    df.write_ndjson(tmp_path / "in.ndjson")
    for src, out in (("in.csv", "out.csv"), ("in.ndjson", "out.jsonl"), ("in.csv", "out.parquet")):
        proc = run(
            [
                "enrich",
                str(tmp_path / src),
                str(tmp_path / out),
                "--step",
                STEP,
                "--batch-size",
                "2",
                *endpoint(server),
            ]
        )
        assert proc.returncode == 0, proc.stderr
        path = tmp_path / out
        got = (
            pl.read_csv(path)
            if out.endswith(".csv")
            else pl.read_ndjson(path)
            if out.endswith(".jsonl")
            else pl.read_parquet(path)
        )
        assert got.columns == ["id", "review", "summary", "llm_error"], out
        assert_frame_equal(got.select(df.columns), df)
        assert got["summary"].to_list() == [f"echo: Summarize: {r}" for r in df["review"]]


def test_csv_output_writes_an_extract_step_as_json(server: FakeServer, tmp_path: Path) -> None:
    """A struct column (an --extract step) goes into a CSV file as one JSON document per row."""
    reviews(0, 3).write_csv(tmp_path / "in.csv")
    schema = tmp_path / "schema.json"
    schema.write_text(
        json.dumps(
            {"type": "object", "properties": {"stars": {"type": "integer"}}, "required": ["stars"]}
        )
    )
    pipeline = tmp_path / "p.toml"
    pipeline.write_text(
        '[steps.facts]\nprompt = "Facts: {review}"\n'
        'schema = { type = "object", properties = { stars = { type = "integer" } }, '
        'required = ["stars"] }\n'
    )
    proc = run(
        [
            "enrich",
            str(tmp_path / "in.csv"),
            str(tmp_path / "out.csv"),
            "--pipeline",
            str(pipeline),
            *endpoint(server),
        ]
    )
    assert proc.returncode == 0, proc.stderr
    got = pl.read_csv(tmp_path / "out.csv")
    assert all(isinstance(json.loads(v)["stars"], int) for v in got["facts"])


def test_a_folder_of_csv_files_keeps_csv(server: FakeServer, tmp_path: Path) -> None:
    """A folder of CSV files gives CSV files with the same names in the OUTPUT folder."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    reviews(0, 2).write_csv(src / "a.csv")
    reviews(2, 3).write_ndjson(src / "b.jsonl")
    proc = run(["enrich", str(src), str(out), "--step", STEP, *endpoint(server)])
    assert proc.returncode == 0, proc.stderr
    assert pl.read_csv(out / "a.csv").height == 2
    assert pl.read_ndjson(out / "b.jsonl")["summary"].null_count() == 0


def test_no_cache_abort_does_not_promise_a_cached_rerun(tmp_path: Path) -> None:
    """With --no-cache, an aborted run does not say that a rerun reuses cached answers."""
    reviews(0, 3).write_parquet(tmp_path / "in.parquet")
    with FakeServer(api_key="right") as server:
        args = ["enrich", str(tmp_path / "in.parquet"), str(tmp_path / "out.parquet")]
        args += ["--step", STEP, *endpoint(server, key="wrong")]
        cached = run(args)
        uncached = run([*args, "--no-cache"])
    assert cached.returncode == uncached.returncode == 5
    (with_cache,) = [line for line in cached.stderr.splitlines() if "error:" in line]
    (without,) = [line for line in uncached.stderr.splitlines() if "error:" in line]
    assert "reuses the answers received so far, which are cached" in with_cache
    assert "cached" not in without and "asks for every answer again" in without


# --------------------------------------------------------------------------------------------
# Object storage: moto's S3 server on loopback
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """moto's S3-compatible server, on a free loopback port for this module."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Any:
    """An S3 filesystem on moto with a fresh bucket; the CLI finds moto through the AWS_* env."""
    import s3fs

    env = {
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    fs = s3fs.S3FileSystem(
        endpoint_url=s3_endpoint, key="testing", secret="testing", skip_instance_cache=True
    )
    bucket = request.node.name.replace("_", "-")[:60].strip("-")
    fs.mkdir(bucket)
    fs.bucket = bucket
    return fs


def put(fs: Any, df: pl.DataFrame, path: str) -> None:
    with fs.open(path, "wb") as fh:
        df.write_parquet(fh)


def get(fs: Any, path: str) -> pl.DataFrame:
    with fs.open(path, "rb") as fh:
        return pl.read_parquet(fh)


def test_s3_file_in_and_out(server: FakeServer, s3: Any) -> None:
    """s3://bucket/in.parquet is read and s3://bucket/out.parquet written (the URL not mangled)."""
    b = s3.bucket
    put(s3, reviews(0, 4), f"{b}/in.parquet")
    proc = run(
        [
            "enrich",
            f"s3://{b}/in.parquet",
            f"s3://{b}/out.parquet",
            "--step",
            STEP,
            *endpoint(server),
        ]
    )
    assert proc.returncode == 0, proc.stderr
    s3.invalidate_cache()
    got = get(s3, f"{b}/out.parquet")
    assert got["summary"].to_list() == [f"echo: Summarize: r{i}" for i in range(4)]
    assert f"wrote s3://{b}/out.parquet" in proc.stderr


def test_s3_partitioned_folder_in_and_out(server: FakeServer, s3: Any) -> None:
    """An S3 prefix of hive partitions gives one object per input object under the OUTPUT prefix."""
    b = s3.bucket
    parts = {
        "date=2024-01-01/part-0.parquet": reviews(0, 3),
        "date=2024-01-02/part-0.parquet": reviews(3, 2),
    }
    for relative, df in parts.items():
        put(s3, df, f"{b}/raw/{relative}")
    proc = run(["enrich", f"s3://{b}/raw", f"s3://{b}/enriched", "--step", STEP, *endpoint(server)])
    assert proc.returncode == 0, proc.stderr
    s3.invalidate_cache()
    assert sorted(s3.find(f"{b}/enriched")) == sorted(f"{b}/enriched/{r}" for r in parts)
    for relative, df in parts.items():
        assert get(s3, f"{b}/enriched/{relative}").height == df.height


def test_s3_object_appears_only_when_complete(s3: Any) -> None:
    """A run that fails (too many failed rows) leaves no object at the S3 OUTPUT."""
    b = s3.bucket
    put(s3, reviews(0, 30), f"{b}/in.parquet")
    with FakeServer(reply=lambda body: "") as empty:  # every answer empty: every row fails
        proc = run(
            [
                "enrich",
                f"s3://{b}/in.parquet",
                f"s3://{b}/out.parquet",
                "--step",
                STEP,
                "--batch-size",
                "10",
                *endpoint(empty),
            ]
        )
    assert proc.returncode == 4, proc.stderr
    s3.invalidate_cache()
    assert not s3.exists(f"{b}/out.parquet")
    assert s3.find(b) == [f"{b}/in.parquet"]


def test_s3_output_bucket_missing_is_bad_input(server: FakeServer, s3: Any) -> None:
    """An OUTPUT in a bucket that does not exist exits 3 before any call."""
    b = s3.bucket
    put(s3, reviews(0, 2), f"{b}/in.parquet")
    proc = run(
        [
            "enrich",
            f"s3://{b}/in.parquet",
            "s3://no-such-bucket/out.parquet",
            "--step",
            STEP,
            *endpoint(server),
        ]
    )
    assert proc.returncode == 3, proc.stderr
    assert "no-such-bucket" in proc.stderr and proc.stderr.count("\n") == 1
    assert server.stats().calls == 0


def test_unknown_storage_scheme_says_what_is_known(server: FakeServer, tmp_path: Path) -> None:
    """A URL of a storage polars-llm cannot reach exits 3 naming the schemes it knows."""
    proc = run(
        [
            "enrich",
            "nosuch://bucket/in.parquet",
            str(tmp_path / "o.parquet"),
            "--step",
            STEP,
            *endpoint(server),
        ]
    )
    assert proc.returncode == 3, proc.stderr
    assert "s3://" in proc.stderr and proc.stderr.count("\n") == 1
