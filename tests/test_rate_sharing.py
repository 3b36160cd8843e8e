"""Rate limits end to end, over real HTTP to a fake server that enforces its limit per second.

A server may count requests per one-second window (OpenAI documents that it may): any burst on
top of the rate is refused there, so these tests use ``FakeServer(per_second=True)``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import polars as pl

import polars_llm
from polars_llm.testing import FakeServer

ROOT = Path(__file__).resolve().parent.parent


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


# --------------------------------------------------------------------------------------------
# Several interpreters at once
# --------------------------------------------------------------------------------------------
# One process of a multi-process job: its prompts, the public API, every answer checked.
WORKER = """
import json, sys
import polars as pl
import polars_llm

base_url, prompts_file = sys.argv[1], sys.argv[2]
prompts = json.loads(open(prompts_file).read())
polars_llm.configure(base_url=base_url, api_key="shared-key", progress=False)
print("started", flush=True)
out = pl.DataFrame({"q": prompts}).with_columns(a=pl.col("q").llm.complete("Say {q}"))
wrong = [(q, a) for q, a in zip(out["q"], out["a"]) if a != "echo: Say " + q]
assert not wrong, wrong[:3]
print("done", flush=True)
"""


def start_worker(
    server: FakeServer, prompts: list[str], folder: Path, env: dict[str, str]
) -> subprocess.Popen[str]:
    """A separate interpreter running WORKER over ``prompts``, with default settings."""
    folder.mkdir(parents=True, exist_ok=True)
    prompts_file = folder / f"prompts-{len(list(folder.iterdir()))}.json"
    prompts_file.write_text(json.dumps(prompts))
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, server.base_url, str(prompts_file)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
    )


def finish(worker: subprocess.Popen[str]) -> None:
    out, _ = worker.communicate(timeout=600)
    assert worker.returncode == 0 and out.strip().endswith("done")


def interleaved(common: list[str], own: list[str]) -> list[str]:
    """Prompts every process has, in the same order, between prompts of its own."""
    rows = []
    for i, prompt in enumerate(common):
        rows.append(prompt)
        if i < len(own):
            rows.append(own[i])
    return rows + own[len(common) :]


def test_four_interpreters_sharing_a_cache_folder_share_one_budget(tmp_path: Path) -> None:
    """Four interpreters with default settings and one cache folder, against a server limiting
    them together per second: under 1% 429s, every row right, each prompt paid once."""
    common = [f"common {i}" for i in range(100)]
    with FakeServer(rpm=3000, per_second=True, latency=0.05) as server:
        env = {"POLARS_LLM_CACHE_DIR": str(tmp_path / "cache")}
        workers = [
            start_worker(
                server, interleaved(common, [f"own {w} {i}" for i in range(50)]), tmp_path, env
            )
            for w in range(4)
        ]
        for worker in workers:
            finish(worker)
        stats = server.stats()
    assert len(stats.paid) == 300
    assert set(stats.paid.values()) == {1}, "a prompt was paid more than once"
    assert stats.status_counts.get(429, 0) < 0.01 * stats.calls


def test_two_machines_over_redis_share_one_budget_and_pay_each_prompt_once(
    tmp_path: Path, redis_url: str
) -> None:
    """Two interpreters with separate cache folders and one redis-server: under 1% 429s from a
    server limiting them together per second, and each prompt paid once."""
    common = [f"common {i}" for i in range(100)]
    with FakeServer(rpm=1800, per_second=True, latency=0.05) as server:
        workers = [
            start_worker(
                server,
                interleaved(common, [f"own {w} {i}" for i in range(60)]),
                tmp_path,
                {
                    "POLARS_LLM_CACHE_DIR": str(tmp_path / f"cache-{w}"),
                    "POLARS_LLM_SHARED_URL": redis_url,
                },
            )
            for w in range(2)
        ]
        for worker in workers:
            finish(worker)
        stats = server.stats()
    assert len(stats.paid) == 220
    assert set(stats.paid.values()) == {1}, "a prompt was paid more than once"
    assert stats.status_counts.get(429, 0) < 0.01 * stats.calls


def test_after_a_kill_the_others_take_the_whole_budget_and_a_rerun_pays_only_the_lost(
    tmp_path: Path,
) -> None:
    """kill -9 of one of three interpreters mid-run: within seconds the other two send at the
    whole limit, nobody waits on its claims, and its rerun pays only for answers it lost."""
    limit_per_s = 20
    common = [f"common {i}" for i in range(150)]
    own = {w: [f"own {w} {i}" for i in range(150)] for w in range(3)}
    env = {"POLARS_LLM_CACHE_DIR": str(tmp_path / "cache")}
    with FakeServer(rpm=60 * limit_per_s, per_second=True, latency=0.3) as server:
        workers = [
            start_worker(server, interleaved(common, own[w]), tmp_path, env) for w in range(3)
        ]
        victim = workers[0]
        while server.stats().calls < 60:  # well under way, with requests in flight
            time.sleep(0.05)
        victim.kill()
        victim.wait()
        killed_at, calls_at_kill = time.monotonic(), server.stats().calls
        samples = []
        while any(w.poll() is None for w in workers[1:]):
            samples.append((time.monotonic() - killed_at, server.stats().calls - calls_at_kill))
            time.sleep(0.25)
        for worker in workers[1:]:
            finish(worker)
        before_rerun = server.stats()
        finish(start_worker(server, interleaved(common, own[0]), tmp_path, env))
        after = server.stats()
    # The busiest two seconds after the kill (leaving the first second for the survivors to
    # notice nothing) went at the limit, less the client's 5% margin and sampling slack.
    rates = [
        (c2 - c1) / (t2 - t1)
        for (t1, c1) in samples
        if t1 >= 1.0
        for (t2, c2) in samples
        if 2.0 <= t2 - t1 <= 2.5
    ]
    assert max(rates) >= 0.8 * limit_per_s
    # The first process to meet the endpoint sent its whole concurrency (32) at once, before any
    # answer stated the limit, and each of the two others one request to learn it: the excess of
    # those over one second's limit is the only 429s there are. Once stated, the limit is kept
    # beside the cache: the rerun spaces its requests from the first one.
    assert before_rerun.status_counts.get(429, 0) <= 32 + 2 - limit_per_s
    assert after.status_counts.get(429, 0) == before_rerun.status_counts.get(429, 0)
    # The rerun paid for the victim's own prompts that had not been paid for, and for those
    # paid for whose answers died with it: at most what it had in flight.
    rerun_paid = sum(after.paid.values()) - sum(before_rerun.paid.values())
    victim_paid_before = sum(1 for p in before_rerun.paid if p.startswith("Say own 0 "))
    repaid = sum(1 for p, n in after.paid.items() if p.startswith("Say own 0 ") and n == 2)
    assert rerun_paid == 150 - victim_paid_before + repaid
    assert repaid <= 32
    assert all(after.paid.get(f"Say {p}") for p in own[0])
    # Nothing else was paid twice but what the victim had in flight.
    assert sum(n - 1 for n in after.paid.values()) <= 32
