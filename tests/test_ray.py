"""polars_llm.ray and ``polars-llm enrich --ray`` on a real local Ray cluster, against the fake
server over real HTTP. Ray starts once for the whole module (about 2 s and 0.5 GB)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import psutil
import pytest
import ray
import ray.data
from click.testing import CliRunner

from polars_llm import ConfigError, Settings, Step, plan
from polars_llm.cli import cli
from polars_llm.ray import ClusterState, RayState, _Secret, cluster_state, enrich
from polars_llm.shared import SharedState
from polars_llm.testing import FakeServer

KEY = "sk-ray-test-0123456789abcdef"
ROWS, UNIQUE, BLOCKS, WORKERS = 2000, 500, 8, 2


@pytest.fixture(scope="module")
def session_dir() -> Iterator[Path]:
    """One local Ray for the module; yields its session folder (where Ray keeps its logs)."""
    context = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = True
    try:
        yield Path(context.address_info["session_dir"])
    finally:
        ray.shutdown()


def prompts(rows: int = ROWS, unique: int = UNIQUE, seed: int = 0) -> list[str]:
    """``rows`` texts drawn from ``unique`` distinct ones, each used at least once."""
    rng = random.Random(seed)
    texts = [f"text {i}" for i in range(unique)]
    texts += [f"text {rng.randrange(unique)}" for _ in range(rows - unique)]
    rng.shuffle(texts)
    return texts


def dataset(texts: list[str], blocks: int = BLOCKS) -> ray.data.Dataset:
    df = pl.DataFrame({"id": list(range(len(texts))), "text": texts})
    return ray.data.from_arrow(df.to_arrow()).repartition(blocks)


def collect(ds: ray.data.Dataset) -> pl.DataFrame:
    frames = [pl.from_arrow(t) for t in ds.iter_batches(batch_format="pyarrow", batch_size=None)]
    return pl.concat([f for f in frames if isinstance(f, pl.DataFrame)]).sort("id")


def settings(server: FakeServer, **changes: object) -> Settings:
    return Settings(base_url=server.base_url, api_key=KEY, backoff_base=0.01).replace(**changes)


def test_every_row_right_and_each_prompt_paid_once(session_dir: Path) -> None:
    """2,000 rows, 500 unique prompts, 8 blocks, 2 workers: every row right, each prompt paid once."""
    texts = prompts()
    answers_before = ray.get(cluster_state().counts.remote())["answers"]
    with FakeServer(latency=0.02) as server:
        out = collect(
            enrich(dataset(texts), [Step("answer", "Q: {text}")], settings(server), workers=WORKERS)
        )
        calls = server.stats().calls
    assert out.height == ROWS
    assert out["text"].to_list() == texts
    assert out["answer"].to_list() == [f"echo: Q: {t}" for t in texts]
    assert out["llm_error"].null_count() == ROWS
    assert UNIQUE <= calls <= UNIQUE + 5
    # The answers went to the cluster's shared tier too.
    assert ray.get(cluster_state().counts.remote())["answers"] - answers_before == UNIQUE


def test_one_budget_for_the_cluster(session_dir: Path) -> None:
    """Told the limit, 2 workers against a server enforcing it per second get fewer than 1% 429s."""
    texts = prompts()
    with FakeServer(rpm=3_000, per_second=True) as server:
        out = collect(
            enrich(dataset(texts), [Step("a", "{text}")], settings(server, rpm=3_000), workers=2)
        )
        stats = server.stats()
    assert out["a"].to_list() == [f"echo: {t}" for t in texts]
    assert stats.status_counts.get(200, 0) >= UNIQUE
    assert stats.status_counts.get(429, 0) < 0.01 * stats.calls


def test_steps_from_a_pipeline_file(session_dir: Path, tmp_path: Path) -> None:
    """A pipeline file's steps and [settings] run as they do in the CLI: a step reads the one before."""
    path = tmp_path / "pipeline.toml"
    path.write_text(
        '[settings]\nmax_attempts = 2\n\n[steps.first]\nprompt = "A {text}"\n\n'
        '[steps.second]\nprompt = "B {first}"\n'
    )
    with FakeServer() as server:
        out = collect(enrich(dataset(["x", "y", "x"], blocks=2), path, settings(server)))
    assert out["second"].to_list() == [f"echo: B echo: A {t}" for t in ("x", "y", "x")]


def test_a_bad_row_fails_alone(session_dir: Path) -> None:
    """A row whose answer is unusable gets null and its reason in llm_error; the job goes on."""

    def reply(body: dict) -> str:
        text = body["messages"][-1]["content"]
        return "" if text.endswith("text 7") else f"ok {text}"

    texts = prompts(rows=200, unique=50)
    with FakeServer(reply=reply) as server:
        out = collect(
            enrich(dataset(texts, blocks=4), [Step("a", "{text}")], settings(server), workers=2)
        )
    bad = out.filter(pl.col("text") == "text 7")
    good = out.filter(pl.col("text") != "text 7")
    assert bad.height > 0
    assert bad["a"].null_count() == bad.height
    assert all(e.startswith("a: EmptyCompletion") for e in bad["llm_error"].to_list())
    assert good["a"].to_list() == [f"ok {t}" for t in good["text"].to_list()]
    assert good["llm_error"].null_count() == good.height


def test_the_key_never_shows(session_dir: Path) -> None:
    """The API key is in no repr, no Ray log file and no plan of the dataset, even when a job fails."""
    with FakeServer(api_key="another-key") as server:
        ds = enrich(dataset(["a", "b"], blocks=2), [Step("s", "{text}")], settings(server))
        assert KEY not in repr(ds) and KEY not in str(ds)
        with pytest.raises(Exception, match="Incorrect API key"):
            collect(ds)
    assert KEY not in repr(_Secret(KEY, None))
    leaks = [
        p
        for p in session_dir.rglob("*")
        if p.is_file() and p.stat().st_size < 50_000_000 and KEY.encode() in p.read_bytes()
    ]
    assert leaks == []


def test_the_input_is_checked_on_the_driver(session_dir: Path) -> None:
    """A template naming a missing column fails at once, before any worker starts."""
    with pytest.raises(ConfigError, match="not a column"):
        enrich(dataset(["a"], blocks=1), [Step("s", "{txet}")], Settings())


# --------------------------------------------------------------------------------------------
# The cluster's shared state
# --------------------------------------------------------------------------------------------
@pytest.fixture
def actor(session_dir: Path) -> Iterator[object]:
    """A private ClusterState actor (not the cluster's named one)."""
    handle = ray.remote(num_cpus=0)(ClusterState).remote(max_answer_bytes=100)  # type: ignore[attr-defined]
    yield handle
    ray.kill(handle)


def test_budget_is_one_timeline_for_every_worker(actor: object) -> None:
    """Two workers taking chunks of budget get consecutive slices of one timeline."""

    async def take() -> list[float]:
        a, b = RayState(actor), RayState(actor)
        return [await home.reserve("scope", 0.5) for home in (a, b, a, b)]

    waits = asyncio.run(take())
    assert waits[0] == pytest.approx(0.0, abs=0.05)
    for before, after in itertools.pairwise(waits):
        assert after == pytest.approx(before + 0.5, abs=0.05)


def test_a_pause_holds_every_worker_back(actor: object) -> None:
    """A 429's pause from one worker makes the next reservation of another wait."""

    async def run() -> float:
        await RayState(actor).pause("scope", 2.0)
        return await RayState(actor).reserve("scope", 0.0)

    assert 1.5 < asyncio.run(run()) <= 2.0


def test_a_claim_is_held_by_one_worker_until_released_or_expired(actor: object) -> None:
    """Only one worker holds a claim; the other gets it after a release or after the lease."""

    async def run() -> list[bool]:
        a, b = RayState(actor), RayState(actor)
        results = [await a.claim("k", 30), await b.claim("k", 30), await a.claim("k", 30)]
        await a.release("k")
        results.append(await b.claim("k", 0.2))
        results.append(await a.claim("k", 30))
        await asyncio.sleep(0.3)
        results.append(await a.claim("k", 30))
        return results

    assert asyncio.run(run()) == [True, False, True, True, False, True]


def test_answers_are_shared_and_bounded(actor: object) -> None:
    """An answer put by one worker is found by another; the oldest go past the size bound."""

    async def run() -> tuple[list[str | None], list[str | None]]:
        a, b = RayState(actor), RayState(actor)
        await a.put_answer("k1", "x" * 60)
        first = await b.get_answers(["k1", "k2"])
        await a.put_answer("k2", "y" * 60)
        return first, await b.get_answers(["k1", "k2"])

    first, second = asyncio.run(run())
    assert first == ["x" * 60, None]
    assert second == [None, "y" * 60]


def test_calls_made_together_go_in_one_message(actor: object) -> None:
    """Many claims at once cost a few actor calls, not one each."""

    async def run() -> list[bool]:
        home = RayState(actor)
        return await asyncio.gather(*(home.claim(f"k{i}", 30) for i in range(200)))

    assert all(asyncio.run(run()))
    assert ray.get(actor.counts.remote())["calls"] <= 3  # type: ignore[attr-defined]


def test_a_worker_end_is_a_shared_state_home(actor: object) -> None:
    """RayState has the SharedState interface that the engine calls."""
    assert isinstance(RayState(actor), SharedState)


# --------------------------------------------------------------------------------------------
# The CLI
# --------------------------------------------------------------------------------------------
def write_inputs(folder: Path, files: int = 3) -> list[pl.DataFrame]:
    folder.mkdir()
    frames = []
    for k in range(files):
        df = pl.DataFrame(
            {"id": list(range(100 + k)), "text": [f"t{(i * 7 + k) % 40}" for i in range(100 + k)]}
        )
        df.write_parquet(folder / f"part-{k}.parquet")
        frames.append(df)
    return frames


def cli_run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "polars_llm.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env=os.environ.copy(),
    )


def test_cli_writes_one_file_per_input_file_and_resumes(session_dir: Path, tmp_path: Path) -> None:
    """`enrich IN_DIR OUT_DIR --ray ADDRESS` writes each file's rows in order; a rerun pays nothing."""
    frames = write_inputs(tmp_path / "in")
    (tmp_path / "out").mkdir()
    address = ray.get_runtime_context().gcs_address
    with FakeServer() as server:
        args = ["enrich", "in", "out", "--step", "a=Q {text}", "--base-url", server.base_url]
        first = cli_run([*args, f"--ray={address}"], tmp_path)
        assert first.returncode == 0, first.stderr
        paid = server.stats().calls
        second = cli_run([*args, f"--ray={address}"], tmp_path)
        assert second.returncode == 0, second.stderr
        assert server.stats().calls == paid
    assert paid >= 40
    for k, df in enumerate(frames):
        out = pl.read_parquet(tmp_path / "out" / f"part-{k}.parquet")
        assert out["id"].to_list() == df["id"].to_list()
        assert out["a"].to_list() == [f"echo: Q {t}" for t in df["text"]]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        f"part-{k}.parquet" for k in range(3)
    ]


def test_cli_counts_and_reports_what_the_workers_did(session_dir: Path, tmp_path: Path) -> None:
    """The run on Ray ends with the summary line of a run on one machine, and --report writes
    its report: the workers' answers, calls and tokens, added up; a rerun is all cache hits."""
    write_inputs(tmp_path / "in")  # 303 rows, 40 distinct texts
    (tmp_path / "out").mkdir()
    address = ray.get_runtime_context().gcs_address
    reports = []
    with FakeServer() as server:
        for name in ("first", "rerun"):
            before = server.stats().calls
            done = cli_run(
                [
                    *("enrich", "in", "out", "--step", "a=Q {text}"),
                    *("--base-url", server.base_url, "--report", f"{name}.json"),
                    f"--ray={address}",
                ],
                tmp_path,
            )
            assert done.returncode == 0, done.stderr
            report = json.loads((tmp_path / f"{name}.json").read_text())
            reports.append((report, done.stderr, server.stats().calls - before))
    (first, said, paid), (rerun, said_again, paid_again) = reports
    assert paid == 40 and paid_again == 0  # each distinct prompt once, then nothing
    assert first["rows"] == first["rows_done"] == first["answers"] == 303
    assert first["calls"] == first["steps"][0]["requests"] == 40
    assert first["prompt_tokens"] > 0 and first["steps"][0]["model"]
    assert first["files_written"] == 3 and first["exit_code"] == 0
    hits = first["cache_hits"]
    assert f"303 answers for 303 rows x 1 step(s): {hits} from the cache, " in said
    assert f"{303 - hits} asked in 40 calls" in said and "wrote 3 file(s)" in said
    assert rerun["cache_hits"] == rerun["answers"] == 303
    assert (rerun["calls"], rerun["prompt_tokens"]) == (0, 0)
    assert rerun["cached_prompt_tokens"] == first["prompt_tokens"]
    assert "303 from the cache, 0 asked in 0 calls" in said_again


def test_cli_dry_run_with_ray_plans_the_folder_without_a_cluster(tmp_path: Path) -> None:
    """--dry-run --ray sends nothing, starts no Ray and writes nothing: the plan of the input
    folder, as a dry run without --ray prints it."""
    write_inputs(tmp_path / "in")  # 303 rows in 3 files
    (tmp_path / "out").mkdir()
    with FakeServer() as server:
        args = ["enrich", "in", "out", "--step", "a=Q {text}", "--base-url", server.base_url]
        planned = cli_run([*args, "--dry-run", "--ray"], tmp_path)
        local = cli_run([*args, "--dry-run"], tmp_path)
        assert server.stats().calls == 0
    assert planned.returncode == 0, planned.stderr
    assert planned.stdout == local.stdout  # the same plan
    row = next(line.split() for line in planned.stdout.splitlines() if line.startswith("a "))
    assert row[2] == "303"  # prompts
    assert list((tmp_path / "out").iterdir()) == []
    assert planned.stderr == ""  # no local Ray started (it logs its start on stderr)


def test_cli_ray_flag_without_address(session_dir: Path, tmp_path: Path) -> None:
    """`--ray` as the last option takes no address (here the cluster already joined)."""
    write_inputs(tmp_path / "in", files=1)
    (tmp_path / "out").mkdir()
    with FakeServer() as server:
        result = CliRunner().invoke(
            cli,
            [
                "enrich",
                str(tmp_path / "in"),
                str(tmp_path / "out"),
                "--step",
                "a={text}",
                "--base-url",
                server.base_url,
                "--ray",
            ],
        )
    assert result.exit_code == 0, result.output
    assert pl.read_parquet(tmp_path / "out" / "part-0.parquet")["a"][0] == "echo: t0"


def test_cli_refuses_a_folder_without_parquet_files(session_dir: Path, tmp_path: Path) -> None:
    """An input folder with no Parquet file: one line, exit 3, nothing written."""
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    result = cli_run(["enrich", "in", "out", "--step", "a={text}", "--ray=auto"], tmp_path)
    assert result.returncode == 3
    assert result.stderr.strip().splitlines() == [
        "polars-llm: error: in holds no .parquet file; give a folder of them"
    ]
    assert list((tmp_path / "out").iterdir()) == []


def test_cli_bad_key_is_one_line_and_exit_5(session_dir: Path, tmp_path: Path) -> None:
    """A key the endpoint refuses stops the job: one line, exit 5, no output file."""
    write_inputs(tmp_path / "in", files=1)
    (tmp_path / "out").mkdir()
    address = ray.get_runtime_context().gcs_address
    with FakeServer(api_key="the-right-key") as server:
        result = cli_run(
            [
                "enrich",
                "in",
                "out",
                "--step",
                "a={text}",
                "--base-url",
                server.base_url,
                "--api-key",
                "a-wrong-key",
                f"--ray={address}",
            ],
            tmp_path,
        )
    assert result.returncode == 5, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("polars-llm: error: aborted:")
    assert list((tmp_path / "out").iterdir()) == []


def _kill_a_worker_after(server: FakeServer, calls: int, killed: list[int]) -> threading.Thread:
    """SIGKILL one Ray worker of this test's cluster once the server has seen ``calls`` calls."""

    def watch() -> None:
        deadline = time.monotonic() + 240
        while server.stats().calls < calls and time.monotonic() < deadline:
            time.sleep(0.01)
        for proc in psutil.Process().children(recursive=True):  # our own Ray's processes only
            with contextlib.suppress(psutil.Error):
                if "_Enrich" in " ".join(proc.cmdline()):
                    proc.send_signal(signal.SIGKILL)
                    killed.append(proc.pid)
                    return

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_a_killed_worker_then_a_rerun_pays_only_what_was_lost(session_dir: Path) -> None:
    """SIGKILL of a worker mid-run; a rerun then pays only for the prompts with no cached answer."""
    texts = prompts()
    steps = [Step("a", "{text}")]
    with FakeServer(latency=0.05) as server:
        config = settings(server, concurrency=8)
        killed: list[int] = []
        killer = _kill_a_worker_after(server, 150, killed)
        with contextlib.suppress(Exception):  # Ray may retry the lost batch, or give up on it
            collect(enrich(dataset(texts), steps, config, workers=WORKERS))
        killer.join()
        frame = pl.DataFrame({"text": texts})
        lost = sum(p.to_send for p in plan(frame, steps, settings=config))
        before = server.stats().calls
        out = collect(enrich(dataset(texts), steps, config, workers=WORKERS))
        rerun = server.stats().calls - before
    assert len(killed) == 1
    assert before >= 150
    assert out["a"].to_list() == [f"echo: {t}" for t in texts]
    assert rerun <= lost
