"""Throughput benchmark: polars-llm against the bound and against a hand-written reference.

For N unique prompts against an endpoint with latency L, a concurrency of C and a rate limit of R
requests per minute, no client can finish faster than ``N / min(C / L, R / 60)``. This script
measures how close polars-llm gets, next to the pattern people write by hand today (the
*reference*): ``asyncio.gather`` over every prompt under an ``asyncio.Semaphore(C)``, with
``openai.AsyncOpenAI`` left at its defaults and a sleep-and-retry on ``openai.RateLimitError``.

Every measured run gets a fresh fake server in its own process (``spawn_server``), so the client
is timed alone (``time.process_time`` covers this process only) and no run inherits another's
connections. polars-llm always goes through the public API, ``df.with_columns(
a=pl.col("q").llm.complete("Say {q}", settings=...))``, with a fresh cache folder per run, and every
answer is checked (``"echo: Say <q>"``), so a broken run cannot pass for a fast one.

Scenarios:

1. latency 200 ms ± 50 ms, C = 16, 64, 256, N unique prompts: req/s against the bound.
2. zero latency, C = 64: client CPU per request and req/s, against a bare aiohttp loop (one
   keep-alive session, one orjson encode and decode per request: the most a Python client can
   do) measured in the same run; each with and without uvloop (polars-llm's engine runs on
   uvloop when it is installed, as here; ``POLARS_LLM_EVENT_LOOP=asyncio`` for asyncio's loop);
   and polars-llm through the SDK.
3. half of the rows duplicate (N rows, N/2 unique), latency as in 1, C = 64: calls and wall time.
4. a fully cached million rows: rows/s and zero calls.
5. a server limit of R requests/min, the client told R: share of the limit reached, share of 429s.
6. two dependent steps on two models (latency 200 ms ± 100 ms, C = 16 each): ``polars_llm.pipeline``
   against one ``with_columns`` per step; the same frame either way.
7. ``polars-llm enrich`` on Parquet files of growing size: peak RSS of the CLI process against the
   size of the frames in memory (bounded memory means RSS barely grows with the file).
8. four processes at once against a server enforcing R requests/min per one-second window:
   polars-llm with default settings and one cache folder (the limit is learned from the server's
   headers, the budget shared beside the cache) against the reference in four processes: share
   of the limit used, share of 429s.
9. high concurrency: C = 1024 against a latency of 1 s ± 25 %, N unique prompts: req/s against
   the bound.
11. issue #15's two latency scenarios as it states them, at a fixed latency: N = 3,000 at
    C = 256 and L = 0.2 s, N = 8,000 at C = 1,024 and L = 1 s; polars-llm cold and the bare loop.

Next to each share of the bound of scenarios 1, 9 and 11 stands the scenario's *ceiling*: the
share an ideal client reaches against the same server (``ceiling``). The bound is a rate, C / L;
a run of N requests also waits for its last round, which a run of a few rounds cannot hide.
10. Ray Data: ``polars_llm.ray.enrich`` with 1 and 2 workers on a local Ray (needs the ``ray``
    extra): rows/s, latency as in 1, C = 64 per worker.

Runs marked *cold* start on a fresh endpoint, as a one-off script does; runs marked *reached* first
send one one-row batch, as a notebook's second cell does. (A process alone with an endpoint sends
at once, with no probe round trip, so the two should agree.)

Usage::

    python scripts/bench.py              # full run, about 10-15 minutes on 2 cores
    python scripts/bench.py --quick      # reduced sizes, under two minutes
    python scripts/bench.py --scenarios 2,5 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import heapq
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import openai
import polars as pl
import psutil

import polars_llm
from polars_llm.testing import FakeTimeline, RemoteFakeServer, spawn_server

ROOT = Path(__file__).resolve().parent.parent
MODEL = "gpt-4o-mini"
TEMPLATE = "Say {q}"
LATENCY = 0.2
JITTER = 0.05
API_KEY = "bench-key"

# Sizes of the full run and of --quick.
FULL = {
    "s1_n": 5_000,
    "s1_c": [16, 64, 256],
    "s1_cold_c": [16, 64, 256],
    "s2_n": 20_000,
    "s2_rounds": 3,
    "s3_n": 5_000,
    "s3_cold": True,
    "s4_unique": 100_000,
    "s4_rows": 1_000_000,
    "s5_n": 3_000,
    "s5_rpm": 3_000,
    "s6_n": 800,
    "s7_rows": [200_000, 2_000_000],
    "s8_n": 3_000,
    "s8_rpm": 3_000,
    "s9_n": 8_000,
    "s11": [(3_000, 256, 0.2), (8_000, 1024, 1.0)],
    "ray_n": 20_000,
}
QUICK = {
    "s1_n": 320,
    "s1_c": [16, 64, 256],
    "s1_cold_c": [16, 64, 256],
    "s2_n": 1_500,
    "s2_rounds": 1,
    "s3_n": 320,
    "s3_cold": True,
    "s4_unique": 3_000,
    "s4_rows": 99_000,
    "s5_n": 300,
    "s5_rpm": 3_000,
    "s6_n": 160,
    "s7_rows": [200_000, 600_000],
    "s8_n": 600,
    "s8_rpm": 3_000,
    "s9_n": 2_048,
    "s11": [(640, 256, 0.2), (2_048, 1024, 1.0)],
    "ray_n": 2_000,
}


# ------------------------------------------------------------------------------------------------
# One measured run
# ------------------------------------------------------------------------------------------------
@dataclass
class Run:
    """What one client did against one fresh server."""

    client: str
    n: int  # rows (polars-llm) or prompts (reference)
    unique: int
    concurrency: int
    wall_s: float
    cpu_s: float
    server_cpu_s: float
    calls: int
    status_counts: dict[int, int]
    max_in_flight: int
    load_before: float
    notes: dict[str, Any] = field(default_factory=dict)
    pace: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        """Rows (or prompts) per second of wall time."""
        return self.n / self.wall_s

    @property
    def cpu_ms_per_request(self) -> float:
        return 1000.0 * self.cpu_s / max(1, self.calls)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["rate_per_s"] = self.rate
        data["cpu_ms_per_request"] = self.cpu_ms_per_request
        data["status_counts"] = {str(k): v for k, v in self.status_counts.items()}
        return data


def _load() -> float:
    return os.getloadavg()[0]


@contextmanager
def _server(**kwargs: Any) -> Iterator[tuple[RemoteFakeServer, psutil.Process]]:
    with spawn_server(**kwargs) as server:
        yield server, psutil.Process(server.process.pid)


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


STEADY_ROUNDS = 5


def _pace(
    timeline: FakeTimeline, start: float, end: float, concurrency: int, calls: int
) -> dict[str, float]:
    """Where the wall time of a run went, read from the server's timeline (``time.monotonic``,
    one clock for both processes):

    - ``to_first_ms``: from the client's start to the first request's arrival;
    - ``first_c_ms``: from the first arrival to the C-th, the time it takes to open C
      connections and fill them (0 for a client that could send all at once);
    - ``steady_per_s``: answers per second between the 20th and the 80th percentile answer,
      the pace once every connection is open and before the last round drains (only for runs
      of at least STEADY_ROUNDS rounds of C);
    - ``drain_ms``: from the last arrival to the last answer;
    - ``after_last_ms``: from the last answer to the client's return (putting results back).
    """
    arrived, answered = sorted(timeline.arrived), sorted(timeline.answered)
    if not arrived or not answered or calls <= 0:
        return {}
    pace = {
        "to_first_ms": 1000 * (arrived[0] - start),
        "first_c_ms": 1000 * (arrived[min(concurrency, len(arrived)) - 1] - arrived[0]),
        "drain_ms": 1000 * (answered[-1] - arrived[-1]),
        "after_last_ms": 1000 * (end - answered[-1]),
    }
    low, high = int(0.2 * len(answered)), int(0.8 * len(answered))
    # Answers come in rounds of C: over fewer than STEADY_ROUNDS of them, the window's ends cut
    # rounds and the pace can read above the bound (as in --quick).
    if len(answered) >= STEADY_ROUNDS * concurrency and answered[high] > answered[low]:
        pace["steady_per_s"] = (high - low) / (answered[high] - answered[low])
    return pace


def _settings(
    server: RemoteFakeServer, concurrency: int, cache_dir: Path | None, **extra: Any
) -> polars_llm.Settings:
    return polars_llm.Settings(
        base_url=server.base_url,
        api_key=API_KEY,
        model=MODEL,
        concurrency=concurrency,
        cache=cache_dir is not None,
        cache_dir=cache_dir,
        progress=False,
        **extra,
    )


def _complete(df: pl.DataFrame, settings: polars_llm.Settings) -> pl.DataFrame:
    """The public API, and a check of every answer."""
    out = df.with_columns(a=pl.col("q").llm.complete(TEMPLATE, settings=settings))
    wrong = out.filter(
        pl.col("a").is_null() | (pl.col("a") != pl.concat_str(pl.lit("echo: Say "), pl.col("q")))
    )
    if wrong.height:
        raise AssertionError(f"polars-llm gave {wrong.height} wrong answer(s), e.g. {wrong.row(0)}")
    return out


def run_polars(
    server_kwargs: dict[str, Any],
    prompts: Sequence[str],
    concurrency: int,
    *,
    reached: bool,
    cache: bool = True,
    settings_extra: dict[str, Any] | None = None,
) -> Run:
    """``df.with_columns(a=pl.col("q").llm.complete(...))`` over the prompts, on a fresh server."""
    df = pl.DataFrame({"q": list(prompts)})
    with _server(**server_kwargs) as (server, proc), tempfile.TemporaryDirectory() as tmp:
        settings = _settings(
            server, concurrency, Path(tmp) / "cache" if cache else None, **(settings_extra or {})
        )
        if reached:
            # A notebook's earlier cell: the endpoint has answered once in this process.
            _complete(pl.DataFrame({"q": ["first contact"]}), settings)
        server.reset_stats()
        load, server_cpu = _load(), _cpu(proc)
        cpu, start, clock = time.process_time(), time.perf_counter(), time.monotonic()
        _complete(df, settings)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        pace_end = time.monotonic()
        server_cpu = _cpu(proc) - server_cpu
        stats = server.stats()
        pace = _pace(server.timeline(), clock, pace_end, concurrency, stats.calls)
    return Run(
        client="polars-llm" + (" (reached)" if reached else " (cold)"),
        n=len(prompts),
        unique=len(set(prompts)),
        concurrency=concurrency,
        wall_s=wall,
        cpu_s=cpu,
        server_cpu_s=server_cpu,
        calls=stats.calls,
        status_counts=stats.status_counts,
        max_in_flight=stats.max_in_flight,
        load_before=load,
        notes={"cache": cache, **(settings_extra or {})},
        pace=pace,
    )


def run_polars_asyncio(
    server_kwargs: dict[str, Any], prompts: Sequence[str], concurrency: int
) -> Run:
    """``run_polars`` in a child process whose engine runs on asyncio's loop, not uvloop's."""
    code = (
        "import json, sys\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})\n"
        "import bench\n"
        "args = json.loads(sys.stdin.read())\n"
        "run = bench.run_polars(args['server'], args['prompts'], args['c'], reached=False)\n"
        "print(json.dumps(bench.asdict(run)))\n"
    )
    payload = json.dumps({"server": server_kwargs, "prompts": list(prompts), "c": concurrency})
    proc = subprocess.run(
        [sys.executable, "-c", code],
        input=payload,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "POLARS_LLM_EVENT_LOOP": "asyncio"},
    )
    if proc.returncode != 0:
        raise AssertionError(f"the asyncio-loop run failed: {proc.stderr[-2000:]}")
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    data["status_counts"] = {int(k): v for k, v in data["status_counts"].items()}
    data["client"] += ", asyncio loop"
    return Run(**data)


# ------------------------------------------------------------------------------------------------
# The reference: what people write by hand today
# ------------------------------------------------------------------------------------------------
REFERENCE_MAX_ATTEMPTS = 10


async def reference_complete(
    base_url: str, prompts: Sequence[str], concurrency: int
) -> tuple[list[str | None], tuple[float, float], float]:
    """gather + Semaphore(C) + sleep-and-retry on RateLimitError, default AsyncOpenAI client.

    Returns the answers, the gather's start and end on ``time.monotonic()`` and the process
    CPU time of the gather itself.
    """
    client = openai.AsyncOpenAI(base_url=base_url, api_key=API_KEY)  # default httpx, max_retries
    semaphore = asyncio.Semaphore(concurrency)

    async def one(prompt: str) -> str | None:
        async with semaphore:
            for attempt in range(REFERENCE_MAX_ATTEMPTS):
                try:
                    response = await client.chat.completions.create(
                        model=MODEL, messages=[{"role": "user", "content": prompt}]
                    )
                    return response.choices[0].message.content
                except openai.RateLimitError:
                    await asyncio.sleep(min(2**attempt, 32))
            raise RuntimeError(f"still rate limited after {REFERENCE_MAX_ATTEMPTS} attempts")

    try:
        cpu, start = time.process_time(), time.monotonic()
        answers = await asyncio.gather(*(one(p) for p in prompts))
        return answers, (start, time.monotonic()), time.process_time() - cpu
    finally:
        await client.close()


# ------------------------------------------------------------------------------------------------
# The bare loop: what Python itself allows
# ------------------------------------------------------------------------------------------------
async def bare_complete(
    base_url: str, prompts: Sequence[str], concurrency: int
) -> tuple[list[str | None], tuple[float, float], float]:
    """C workers on one keep-alive aiohttp session, one orjson encode and decode per request:
    no library, no retries, no cache. The most a Python client can do per request.

    Returns the answers, the loop's start and end on ``time.monotonic()`` and the process CPU
    time of the loop itself.
    """
    import aiohttp
    import orjson

    answers: list[str | None] = [None] * len(prompts)
    url = base_url + "/chat/completions"
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:
        indices = iter(range(len(prompts)))

        async def worker() -> None:
            for i in indices:
                body = {"model": MODEL, "messages": [{"role": "user", "content": prompts[i]}]}
                async with session.post(url, data=orjson.dumps(body)) as response:
                    data = orjson.loads(await response.read())
                answers[i] = data["choices"][0]["message"]["content"]

        cpu, start = time.process_time(), time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return answers, (start, time.monotonic()), time.process_time() - cpu


def _new_loop(use_uvloop: bool) -> asyncio.AbstractEventLoop:
    if use_uvloop:
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def run_reference(
    server_kwargs: dict[str, Any],
    questions: Sequence[str],
    concurrency: int,
    *,
    bare: bool = False,
    use_uvloop: bool = False,
) -> Run:
    """The hand-written reference (or, with ``bare``, the bare aiohttp loop) on a fresh server."""
    prompts = [TEMPLATE.format(q=q) for q in questions]
    client = bare_complete if bare else reference_complete
    name = ("bare aiohttp" if bare else "reference") + (" + uvloop" if use_uvloop else "")
    notes: dict[str, Any] = {}
    with _server(**server_kwargs) as (server, proc):
        load, server_cpu = _load(), _cpu(proc)
        loop = _new_loop(use_uvloop)
        pace: dict[str, float] = {}
        try:
            answers, (start, end), cpu = loop.run_until_complete(
                client(server.base_url, prompts, concurrency)
            )
            wall = end - start
        except Exception as e:  # as a hand-written gather does: one failed request fails it all
            answers, wall, cpu = [], float("nan"), float("nan")
            notes["failed"] = f"{type(e).__name__}: {e}"
            _log(f"  {name} failed: {notes['failed']}")
        finally:
            loop.close()
        server_cpu = _cpu(proc) - server_cpu
        stats = server.stats()
        if not notes:
            pace = _pace(server.timeline(), start, end, concurrency, stats.calls)
    wrong = (
        sum(a != "echo: " + p for a, p in zip(answers, prompts, strict=True)) if not notes else 0
    )
    if wrong:
        raise AssertionError(f"the {name} gave {wrong} wrong answer(s)")
    return Run(
        notes=notes,
        client=name,
        n=len(prompts),
        unique=len(set(prompts)),
        concurrency=concurrency,
        wall_s=wall,
        cpu_s=cpu,
        server_cpu_s=server_cpu,
        calls=stats.calls,
        status_counts=stats.status_counts,
        max_in_flight=stats.max_in_flight,
        load_before=load,
        pace=pace,
    )


# ------------------------------------------------------------------------------------------------
# Scenarios
# ------------------------------------------------------------------------------------------------
def bound_rate(concurrency: int | None, latency: float, rpm: int | None) -> float:
    """Requests per second no client can beat: min(C / L, R / 60)."""
    limits = []
    if concurrency is not None and latency > 0:
        limits.append(concurrency / latency)
    if rpm is not None:
        limits.append(rpm / 60.0)
    return min(limits) if limits else float("inf")


def ceiling(n: int, concurrency: int, latency: float, jitter: float, seed: int = 0) -> float:
    """The share of the bound (``bound_rate``) that an ideal client reaches against the fake
    server: C requests in flight from the first instant, each answered one sent at that instant,
    and no time of its own. The latencies are the server's own draws (its ``seed``, three draws
    per request, the third setting the jitter), in order of arrival.

    Below 1 because the bound is a rate: the last round drains for up to a whole latency, while
    fewer and fewer requests are in flight. With a fixed latency it is ``(N / C) / ceil(N / C)``.
    """
    rng = random.Random(seed)

    def delay() -> float:
        rng.random(), rng.random()  # the fault and kind draws
        return latency + (2.0 * rng.random() - 1.0) * jitter

    ends = [delay() for _ in range(min(n, concurrency))]
    heapq.heapify(ends)
    for _ in range(n - len(ends)):
        heapq.heappush(ends, heapq.heappop(ends) + delay())
    return n / bound_rate(concurrency, latency, None) / max(ends)


def _questions(tag: str, n: int) -> list[str]:
    return [f"{tag} question {i}" for i in range(n)]


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _record(run: Run, bound: float | None = None) -> dict[str, Any]:
    data = run.to_json()
    if bound is not None and bound != float("inf"):
        data["bound_per_s"] = bound
        # Against the bound for the unique prompts: what the client had to send.
        data["share_of_bound"] = (run.unique / run.wall_s) / bound
    _log(
        f"  {run.client:<22} C={run.concurrency:<4} n={run.n:<8} wall={run.wall_s:7.2f}s "
        f"rate={run.rate:9.1f}/s cpu/req={run.cpu_ms_per_request:6.3f}ms calls={run.calls} "
        f"429s={run.status_counts.get(429, 0)} load={run.load_before:.1f}"
    )
    return data


def scenario_1(sizes: dict[str, Any]) -> dict[str, Any]:
    server = {"latency": LATENCY, "jitter": JITTER}
    n = sizes["s1_n"]
    rows = []
    for c in sizes["s1_c"]:
        bound = bound_rate(c, LATENCY, None)
        _log(f"S1 C={c}: N={n}, bound {bound:.0f} req/s")
        entry: dict[str, Any] = {
            "concurrency": c,
            "bound_per_s": bound,
            "ceiling": ceiling(n, c, LATENCY, JITTER),
        }
        if c in sizes["s1_cold_c"]:
            entry["cold"] = _record(
                run_polars(server, _questions(f"s1c{c}", n), c, reached=False), bound
            )
        entry["reached"] = _record(
            run_polars(server, _questions(f"s1r{c}", n), c, reached=True), bound
        )
        entry["reference"] = _record(run_reference(server, _questions(f"s1x{c}", n), c), bound)
        # The Python limit: what a bare aiohttp loop reaches against the same server.
        entry["bare"] = _record(
            run_reference(server, _questions(f"s1b{c}", n), c, bare=True), bound
        )
        rows.append(entry)
    return {"n": n, "latency_s": LATENCY, "jitter_s": JITTER, "rows": rows}


def scenario_2(sizes: dict[str, Any]) -> dict[str, Any]:
    n, c = sizes["s2_n"], 64
    _log(f"S2 zero latency: N={n}, C={c}")
    sdk = {"transport": "openai"}
    # Rounds of the bare loop (asyncio's and uvloop's), polars-llm and polars-llm without its
    # cache, alternating, so that a change of the machine's load during the scenario hits every
    # side; each is reported by its median round (by req/s), and every round's figures are kept.
    rounds: dict[str, list[dict[str, Any]]] = {
        "bare": [],
        "bare_uvloop": [],
        "polars_llm": [],
        "polars_llm_no_cache": [],
    }
    for _ in range(sizes["s2_rounds"]):
        rounds["bare"].append(_record(run_reference({}, _questions("s2b", n), c, bare=True)))
        rounds["bare_uvloop"].append(
            _record(run_reference({}, _questions("s2bu", n), c, bare=True, use_uvloop=True))
        )
        rounds["polars_llm"].append(_record(run_polars({}, _questions("s2", n), c, reached=False)))
        rounds["polars_llm_no_cache"].append(
            _record(run_polars({}, _questions("s2n", n), c, reached=False, cache=False))
        )
    medians = {
        key: sorted(runs, key=lambda r: r["rate_per_s"])[len(runs) // 2]
        for key, runs in rounds.items()
    }
    return {
        "n": n,
        "concurrency": c,
        **medians,
        "rounds": {
            key: [
                {"rate_per_s": r["rate_per_s"], "cpu_ms_per_request": r["cpu_ms_per_request"]}
                for r in runs
            ]
            for key, runs in rounds.items()
        },
        "polars_llm_asyncio": _record(run_polars_asyncio({}, _questions("s2a", n), c)),
        "polars_llm_sdk": _record(
            run_polars({}, _questions("s2o", n), c, reached=False, settings_extra=sdk)
        ),
        "reference": _record(run_reference({}, _questions("s2x", n), c)),
    }


def scenario_3(sizes: dict[str, Any], s1: dict[str, Any] | None) -> dict[str, Any]:
    n, c = sizes["s3_n"], 64
    server = {"latency": LATENCY, "jitter": JITTER}
    bound = bound_rate(c, LATENCY, None)

    def doubled(tag: str) -> list[str]:
        rows = _questions(tag, n // 2) * 2
        random.Random(3).shuffle(rows)
        return rows

    _log(f"S3 duplicates: {n} rows, {n // 2} unique, C={c}")
    result: dict[str, Any] = {
        "n": n,
        "unique": n // 2,
        "concurrency": c,
    }
    if sizes["s3_cold"]:
        result["cold"] = _record(run_polars(server, doubled("s3c"), c, reached=False), bound)
    result["reached"] = _record(run_polars(server, doubled("s3r"), c, reached=True), bound)
    result["reference"] = _record(run_reference(server, doubled("s3x"), c), bound)
    if s1 is not None and s1["n"] == n:
        base = next((r for r in s1["rows"] if r["concurrency"] == c), None)
        if base is not None:
            for kind in ("cold", "reached", "reference"):
                if kind in base and kind in result:
                    result[f"wall_ratio_{kind}"] = result[kind]["wall_s"] / base[kind]["wall_s"]
    return result


def scenario_4(sizes: dict[str, Any]) -> dict[str, Any]:
    unique, rows = sizes["s4_unique"], sizes["s4_rows"]
    questions = _questions("s4", unique)
    frame = pl.DataFrame({"q": questions})
    big = pl.DataFrame({"q": questions * (rows // unique)}).sample(
        fraction=1.0, shuffle=True, seed=4
    )
    _log(f"S4 cached: warming {unique} unique prompts, then {big.height} rows")
    with _server() as (server, proc), tempfile.TemporaryDirectory() as tmp:
        settings = _settings(server, 64, Path(tmp) / "cache")
        start = time.perf_counter()
        _complete(frame, settings)
        warm_s = time.perf_counter() - start
        measured = {}
        for label, df in (("rows", big), ("all_unique", frame)):
            server.reset_stats()
            load, server_cpu = _load(), _cpu(proc)
            cpu, start = time.process_time(), time.perf_counter()
            _complete(df, settings)
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu
            stats = server.stats()
            run = Run(
                client="polars-llm (cached)",
                n=df.height,
                unique=unique,
                concurrency=64,
                wall_s=wall,
                cpu_s=cpu,
                server_cpu_s=_cpu(proc) - server_cpu,
                calls=stats.calls,
                status_counts=stats.status_counts,
                max_in_flight=stats.max_in_flight,
                load_before=load,
            )
            measured[label] = _record(run)
    return {"unique": unique, "rows": big.height, "warm_s": warm_s, **measured}


def scenario_5(sizes: dict[str, Any]) -> dict[str, Any]:
    n, rpm, c = sizes["s5_n"], sizes["s5_rpm"], 64
    server = {"rpm": rpm}
    bound = bound_rate(None, 0.0, rpm)
    _log(f"S5 server limit {rpm}/min: N={n}, C={c}, bound {bound:.0f} req/s")
    result: dict[str, Any] = {"n": n, "rpm": rpm, "concurrency": c, "bound_per_s": bound}
    for key, run in (
        (
            "polars_llm",
            lambda: run_polars(
                server, _questions("s5", n), c, reached=False, settings_extra={"rpm": rpm}
            ),
        ),
        ("reference", lambda: run_reference(server, _questions("s5x", n), c)),
    ):
        data = _record(run(), bound)
        data["share_429"] = data["status_counts"].get("429", 0) / max(1, data["calls"])
        result[key] = data
    return result


def scenario_9(sizes: dict[str, Any]) -> dict[str, Any]:
    """High concurrency: C = 1024 against a latency of 1 s (bound 1,024 req/s)."""
    n, c, latency = sizes["s9_n"], 1024, 1.0
    server = {"latency": latency, "jitter": 0.25 * latency}
    bound = bound_rate(c, latency, None)
    _log(f"S9 C={c}, latency {latency} s: N={n}, bound {bound:.0f} req/s")
    return {
        "n": n,
        "concurrency": c,
        "latency_s": latency,
        "bound_per_s": bound,
        "ceiling": ceiling(n, c, latency, server["jitter"]),
        "cold": _record(run_polars(server, _questions("s9c", n), c, reached=False), bound),
        "reached": _record(run_polars(server, _questions("s9r", n), c, reached=True), bound),
        # The Python limit: what a bare aiohttp loop reaches against the same server.
        "bare": _record(run_reference(server, _questions("s9b", n), c, bare=True), bound),
    }


def scenario_11(sizes: dict[str, Any]) -> dict[str, Any]:
    """Issue #15's latency scenarios as it states them: a fixed latency, its N, C and L."""
    rows = []
    for n, c, latency in sizes["s11"]:
        server = {"latency": latency}
        bound = bound_rate(c, latency, None)
        _log(f"S11 C={c}, latency {latency} s fixed: N={n}, bound {bound:.0f} req/s")
        tag = f"s11c{c}"
        rows.append(
            {
                "n": n,
                "concurrency": c,
                "latency_s": latency,
                "bound_per_s": bound,
                "ceiling": ceiling(n, c, latency, 0.0),
                "cold": _record(run_polars(server, _questions(tag, n), c, reached=False), bound),
                "bare": _record(
                    run_reference(server, _questions(tag + "b", n), c, bare=True), bound
                ),
            }
        )
    return {"rows": rows}


# ------------------------------------------------------------------------------------------------
# Scenario 8: four processes, one key, a per-second-window limit
# ------------------------------------------------------------------------------------------------
S8_PROCESSES = 4
S8_CONCURRENCY = 32  # per process: polars-llm's default, and the reference's semaphore


def s8_worker(argv: list[str]) -> int:
    """One of scenario 8's processes: waits for "go" on stdin, runs, prints its times as JSON."""
    kind, base_url, cache_dir, tag, n = argv
    questions = _questions(tag, int(n))
    print("ready", flush=True)
    sys.stdin.readline()
    start = time.time()
    if kind == "polars-llm":
        # Default settings: no rpm given, one cache folder shared by the four processes.
        settings = polars_llm.Settings(
            base_url=base_url, api_key=API_KEY, model=MODEL, cache_dir=cache_dir, progress=False
        )
        _complete(pl.DataFrame({"q": questions}), settings)
    else:
        prompts = [TEMPLATE.format(q=q) for q in questions]
        answers, _, _ = asyncio.run(reference_complete(base_url, prompts, S8_CONCURRENCY))
        if any(a != "echo: " + p for a, p in zip(answers, prompts, strict=True)):
            raise AssertionError("the reference gave wrong answers")
    print(json.dumps({"start": start, "end": time.time()}), flush=True)
    return 0


def run_processes(kind: str, n: int, rpm: int) -> dict[str, Any]:
    """``kind`` in four processes over n prompts in all, against one per-second-window server."""
    with (
        _server(rpm=rpm, per_second=True, latency=LATENCY, jitter=JITTER) as (server, _),
        tempfile.TemporaryDirectory() as tmp,
    ):
        share = n // S8_PROCESSES
        workers = [
            subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "s8-worker",
                    kind,
                    server.base_url,
                    tmp,
                    f"s8{kind}{i}",
                    str(share),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for i in range(S8_PROCESSES)
        ]
        for worker in workers:  # every interpreter has imported everything: start together
            assert worker.stdout is not None
            if worker.stdout.readline().strip() != "ready":
                raise RuntimeError(f"an s8 worker ({kind}) did not start")
        load = _load()
        for worker in workers:
            assert worker.stdin is not None
            worker.stdin.write("go\n")
            worker.stdin.flush()
        times = []
        for worker in workers:
            out, _ = worker.communicate(timeout=3600)
            if worker.returncode != 0:
                raise RuntimeError(f"an s8 worker ({kind}) failed")
            times.append(json.loads(out.strip().splitlines()[-1]))
        stats = server.stats()
    wall = max(t["end"] for t in times) - min(t["start"] for t in times)
    calls = stats.calls
    data = {
        "client": kind,
        "processes": S8_PROCESSES,
        "n": share * S8_PROCESSES,
        "wall_s": wall,
        "calls": calls,
        "status_counts": {str(k): v for k, v in stats.status_counts.items()},
        "share_of_limit": share * S8_PROCESSES / wall / (rpm / 60.0),
        "share_429": stats.status_counts.get(429, 0) / max(1, calls),
        "load_before": load,
    }
    _log(
        f"  {kind:<12} x{S8_PROCESSES} n={data['n']} wall={wall:7.2f}s "
        f"of limit={data['share_of_limit']:.1%} calls={calls} 429s={data['share_429']:.2%} "
        f"load={load:.1f}"
    )
    return data


def scenario_8(sizes: dict[str, Any]) -> dict[str, Any]:
    n, rpm = sizes["s8_n"], sizes["s8_rpm"]
    _log(f"S8 {S8_PROCESSES} processes, server limit {rpm}/min per one-second window: N={n}")
    return {
        "n": n,
        "rpm": rpm,
        "processes": S8_PROCESSES,
        "concurrency_per_process": S8_CONCURRENCY,
        "polars_llm": run_processes("polars-llm", n, rpm),
        "reference": run_processes("reference", n, rpm),
    }


def s8_table(s8: dict[str, Any]) -> str:
    rows = [
        [
            r["client"],
            f"{r['share_of_limit']:.1%}",
            str(r["calls"]),
            str(int(r["status_counts"].get("429", 0))),
            f"{r['share_429']:.2%}",
            _f(r["wall_s"], 1),
        ]
        for r in (s8["polars_llm"], s8["reference"])
    ]
    return (
        f"S8: {s8['processes']} processes at once, one key, server limit {s8['rpm']:,} requests/min "
        f"enforced per one-second window, latency {LATENCY * 1000:.0f} ms, N = {s8['n']:,} in all, "
        f"C = {s8['concurrency_per_process']} per process; polars-llm with default settings and "
        "one cache folder\n\n"
        + _table(["client", "of limit", "calls", "429s", "429 share", "wall s"], rows)
    )


def scenario_ray(sizes: dict[str, Any]) -> dict[str, Any]:
    """Ray Data: rows/s of ``polars_llm.ray.enrich`` with 1 and 2 workers (a local Ray, 2 CPUs).

    The wall time runs from ``enrich`` to the last row back on the driver: it includes starting
    the workers (a few seconds), as a job does.
    """
    import pyarrow as pa
    import ray
    import ray.data

    from polars_llm import Step
    from polars_llm.ray import enrich

    n, c = sizes["ray_n"], 64
    server = {"latency": LATENCY, "jitter": JITTER}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="warning")
    ray.data.DataContext.get_current().enable_progress_bars = False
    rows = []
    try:
        for workers in (1, 2):
            bound = bound_rate(c * workers, LATENCY, None)
            _log(f"S-ray {workers} worker(s): N={n}, C={c} per worker, bound {bound:.0f} rows/s")
            prompts = _questions(f"ray{workers}", n)
            ds = ray.data.from_arrow(pl.DataFrame({"q": prompts}).to_arrow()).repartition(8)
            ds = ds.materialize()
            with _server(**server) as (srv, _), tempfile.TemporaryDirectory() as tmp:
                settings = _settings(srv, c, Path(tmp) / "cache")
                load, start = _load(), time.perf_counter()
                out = enrich(ds, [Step("a", TEMPLATE)], settings, workers=workers)
                batches = list(out.iter_batches(batch_format="pyarrow", batch_size=None))
                wall = time.perf_counter() - start
                stats = srv.stats()
            got = pl.from_arrow(pa.concat_tables(batches))
            assert isinstance(got, pl.DataFrame)
            wrong = got.filter(pl.col("a") != pl.concat_str(pl.lit("echo: Say "), pl.col("q")))
            if wrong.height or got.height != n:
                raise AssertionError(f"Ray gave {wrong.height} wrong answer(s) of {got.height}")
            row = {
                "workers": workers,
                "bound_per_s": bound,
                "wall_s": wall,
                "rate_per_s": n / wall,
                "calls": stats.calls,
                "max_in_flight": stats.max_in_flight,
                "load_before": load,
            }
            _log(f"  wall={wall:.2f}s rate={n / wall:.1f} rows/s calls={stats.calls}")
            rows.append(row)
    finally:
        ray.shutdown()
    return {"n": n, "concurrency": c, "latency_s": LATENCY, "rows": rows}


# ------------------------------------------------------------------------------------------------
# Goals, tables and the chart
# ------------------------------------------------------------------------------------------------
def scenario_6(sizes: dict[str, Any]) -> dict[str, Any]:
    """Two dependent steps on two models: pipelined against one with_columns per step."""
    n, concurrency, latency, jitter = sizes["s6_n"], 16, 0.2, 0.1
    df = pl.DataFrame({"topic": [f"topic {i}" for i in range(n)]})
    steps = [
        polars_llm.Step("outline", "Outline {topic}", model="model-a"),
        polars_llm.Step("intro", "Intro for {outline}", model="model-b"),
    ]
    walls: dict[str, float] = {}
    frames: dict[str, pl.DataFrame] = {}
    for mode in ("step_by_step", "pipelined"):
        with _server(latency=latency, jitter=jitter) as (server, _):
            settings = polars_llm.Settings(
                base_url=server.base_url,
                api_key=API_KEY,
                concurrency=concurrency,
                cache=False,
                progress=False,
            )
            # First contact with both models, outside the timing.
            polars_llm.pipeline(pl.DataFrame({"topic": ["warm"]}), steps, settings=settings)
            _log(f"S6 {mode}, n={n}")
            start = time.perf_counter()
            if mode == "pipelined":
                out = polars_llm.pipeline(df, steps, settings=settings)
            else:
                out = df.with_columns(
                    outline=pl.col("topic").llm.complete(
                        "Outline {topic}", model="model-a", settings=settings
                    )
                ).with_columns(
                    intro=pl.col("outline").llm.complete(
                        "Intro for {outline}", model="model-b", settings=settings
                    )
                )
            walls[mode] = time.perf_counter() - start
            frames[mode] = out
    if not frames["pipelined"].equals(frames["step_by_step"]):
        raise AssertionError("pipelined and step-by-step frames differ")
    one_step = n / (concurrency / latency)
    return {
        "n": n,
        "concurrency_per_model": concurrency,
        "latency": latency,
        "jitter": jitter,
        "step_by_step_s": walls["step_by_step"],
        "pipelined_s": walls["pipelined"],
        "ratio": walls["pipelined"] / walls["step_by_step"],
        "one_step_bound_s": one_step,
        "two_step_bound_s": 2 * one_step,
    }


def scenario_7(sizes: dict[str, Any]) -> dict[str, Any]:
    """The CLI on files of growing size: peak RSS against the frames' size in memory."""
    runs = []
    unique = 2_000
    # A long review text per row, 2,000 distinct ones, so the file is large in memory while the
    # calls stay few: the scenario measures memory, not throughput.
    filler = "The delivery was on time and the packaging was fine. " * 5
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for rows in sizes["s7_rows"]:
            src, dst = tmp / f"in-{rows}.parquet", tmp / f"out-{rows}.parquet"
            frame = pl.DataFrame({"id": range(rows)}).with_columns(
                text=pl.format("review {} of a product. " + filler, pl.col("id") % unique)
            )
            frame.write_parquet(src, row_group_size=100_000)
            input_mb = frame.estimated_size() / 2**20
            del frame
            with _server() as (server, _):
                env = {**os.environ, "POLARS_LLM_CACHE_DIR": str(tmp / f"cache-{rows}")}
                _log(f"S7 enrich {rows:,} rows")
                start = time.perf_counter()
                proc = subprocess.run(
                    ["/usr/bin/time", "-f", "%M", sys.executable, "-m", "polars_llm.cli",
                     "enrich", str(src), str(dst), "--step", "s=Sentiment of {text}",
                     "--base-url", server.base_url, "--api-key", API_KEY, "--no-progress",
                     "--concurrency", "64"],
                    env=env, capture_output=True, text=True, check=False,
                )  # fmt: skip
                wall = time.perf_counter() - start
                calls = server.stats().calls
            if proc.returncode != 0:
                raise AssertionError(f"enrich failed: {proc.stderr[-2000:]}")
            peak_mb = int(proc.stderr.strip().splitlines()[-1]) / 1024
            out = pl.read_parquet(dst)
            if out.height != rows or out["s"].null_count():
                raise AssertionError("enrich wrote a wrong output")
            runs.append(
                {
                    "rows": rows,
                    "unique_prompts": unique,
                    "calls": calls,
                    "wall_s": wall,
                    "peak_rss_mb": peak_mb,
                    "input_in_memory_mb": input_mb,
                    "output_in_memory_mb": out.estimated_size() / 2**20,
                }
            )
            del out
        baseline = subprocess.run(
            ["/usr/bin/time", "-f", "%M", sys.executable, "-m", "polars_llm.cli", "--help"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
    return {"runs": runs, "import_rss_mb": int(baseline.stderr.strip().splitlines()[-1]) / 1024}


def _share_figure(run: dict[str, Any], row: dict[str, Any]) -> str:
    """A run's share of the bound, beside the scenario's ceiling, the bare loop's share, and
    both steady paces where the timeline has them."""
    bound, bare_run = row["bound_per_s"], row.get("bare")
    notes = [f"ceiling {row['ceiling']:.1%}"] if "ceiling" in row else []
    if bare_run is not None:
        notes.append(f"bare aiohttp loop {bare_run['share_of_bound']:.1%}")
        if (ours := _steady(run, bound)) and (theirs := _steady(bare_run, bound)):
            notes.append(f"steady pace {ours}, bare loop's {theirs}")
    return f"{run['share_of_bound']:.1%}" + (f" ({'; '.join(notes)})" if notes else "")


def goals(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each goal of the issue, whether this run met it, and the figure it was judged on."""
    out: list[dict[str, Any]] = []

    def add(goal: str, met: bool, figure: str) -> None:
        out.append({"goal": goal, "met": bool(met), "figure": figure})

    if s1 := results.get("s1"):
        for row in s1["rows"]:
            for kind in ("cold", "reached"):
                if kind in row:
                    add(
                        f"S1 C={row['concurrency']} {kind}: >= 95% of bound",
                        row[kind]["share_of_bound"] >= 0.95,
                        _share_figure(row[kind], row),
                    )
    if s2 := results.get("s2"):
        ours, bare = s2["polars_llm"], s2["bare"]
        cpu = ours["cpu_ms_per_request"]
        add("S2 client CPU <= 0.12 ms/request", cpu <= 0.12, f"{cpu:.3f} ms")
        # The 0.12 ms was set against a bare loop of 0.072 ms on its machine: as a
        # ratio, which this machine's load cannot move, at most 1.67x the bare loop's CPU.
        cpu_ratio = cpu / bare["cpu_ms_per_request"]
        add(
            "S2 client CPU <= 1.67x the bare aiohttp loop's",
            cpu_ratio <= 0.12 / 0.072,
            f"{cpu_ratio:.2f}x ({cpu:.3f} ms against {bare['cpu_ms_per_request']:.3f} ms)",
        )
        ratio = ours["rate_per_s"] / bare["rate_per_s"]
        add("S2 req/s >= 0.6x the bare aiohttp loop", ratio >= 0.6, f"{ratio:.2f}x")
        # polars-llm runs on uvloop here: against the bare loop on the same event loop too.
        if (fast := s2.get("bare_uvloop")) is not None:
            ratio = ours["rate_per_s"] / fast["rate_per_s"]
            add(
                "S2 req/s >= 0.6x the bare aiohttp loop on uvloop (same loop)",
                ratio >= 0.6,
                f"{ratio:.2f}x",
            )
        ratio = ours["rate_per_s"] / s2["reference"]["rate_per_s"]
        add("S2 req/s >= 2x reference", ratio >= 2.0, f"{ratio:.2f}x")
    if s3 := results.get("s3"):
        for kind in ("cold", "reached"):
            if kind not in s3:
                continue
            calls = s3[kind]["calls"]
            add(
                f"S3 {kind}: exactly N/2 calls", calls == s3["unique"], f"{calls} of {s3['unique']}"
            )
            ratio = s3.get(f"wall_ratio_{kind}")
            if ratio is not None:
                add(
                    f"S3 {kind}: wall about half of S1 C=64 (0.4-0.6)",
                    0.4 <= ratio <= 0.6,
                    f"{ratio:.2f}",
                )
    if s4 := results.get("s4"):
        run = s4["rows"]
        add(
            "S4 >= 1,000,000 rows/s and zero calls",
            run["rate_per_s"] >= 1_000_000 and run["calls"] == 0,
            f"{run['rate_per_s']:,.0f} rows/s, {run['calls']} calls ({s4['unique']:,} unique)",
        )
    if s9 := results.get("s9"):
        for kind in ("cold", "reached"):
            add(
                f"S9 C=1024 L=1 s ± 25 % {kind}: >= 92% of bound",
                s9[kind]["share_of_bound"] >= 0.92,
                _share_figure(s9[kind], s9),
            )
    if s11 := results.get("s11"):
        for row in s11["rows"]:
            target = 0.95 if row["concurrency"] <= 256 else 0.92
            add(
                f"S11 C={row['concurrency']} L={row['latency_s']:g} s fixed, N={row['n']:,} "
                f"cold: >= {target:.0%} of bound",
                row["cold"]["share_of_bound"] >= target,
                _share_figure(row["cold"], row),
            )
    if s5 := results.get("s5"):
        ours = s5["polars_llm"]
        share = ours["rate_per_s"] / s5["bound_per_s"]
        add(
            "S5 >= 90% of the limit with < 1% 429s",
            share >= 0.9 and ours["share_429"] < 0.01,
            f"{share:.1%} of limit, {ours['share_429']:.2%} 429s",
        )
    if s8 := results.get("s8"):
        ours = s8["polars_llm"]
        add(
            "S8 4 processes, default settings: >= 90% of the limit with < 1% 429s",
            ours["share_of_limit"] >= 0.9 and ours["share_429"] < 0.01,
            f"{ours['share_of_limit']:.1%} of limit, {ours['share_429']:.2%} 429s",
        )
    if s6 := results.get("s6"):
        add(
            "S6 pipelined two steps nearer the slower step than the sum (ratio < 0.75)",
            s6["ratio"] < 0.75,
            f"{s6['pipelined_s']:.1f} s vs {s6['step_by_step_s']:.1f} s ({s6['ratio']:.2f})",
        )
    if s7 := results.get("s7"):
        small, large = s7["runs"][0], s7["runs"][-1]
        growth = large["peak_rss_mb"] / small["peak_rss_mb"]
        add(
            "S7 peak RSS far below the output frame in memory, and flat in rows",
            large["peak_rss_mb"] < 0.5 * large["output_in_memory_mb"] and growth < 1.5,
            f"{large['peak_rss_mb']:.0f} MB peak for {large['rows']:,} rows "
            f"({large['output_in_memory_mb']:.0f} MB in memory); x{growth:.2f} from "
            f"{small['rows']:,} rows",
        )
    return out


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


def _f(value: float, digits: int = 1) -> str:
    return f"{value:,.{digits}f}"


# The columns of a run against a latency (S1, S9, S11), after the columns that name it.
LATENCY_HEADERS = [
    "bound req/s",
    "req/s",
    "of bound",
    "ceiling",
    "wall s",
    "CPU ms/req",
    "calls",
    "max in flight",
]


def _latency_cells(run: dict[str, Any], row: dict[str, Any], cpu_digits: int = 3) -> list[str]:
    """A run's LATENCY_HEADERS cells; ``row`` is its scenario's (bound, ceiling)."""
    return [
        _f(row["bound_per_s"], 0),
        _f(run["rate_per_s"]),
        f"{run['share_of_bound']:.1%}",
        f"{row['ceiling']:.1%}" if "ceiling" in row else "",
        _f(run["wall_s"], 2),
        _f(run["cpu_ms_per_request"], cpu_digits),
        str(run["calls"]),
        str(run["max_in_flight"]),
    ]


S2_RUNS = (
    "polars_llm",
    "polars_llm_asyncio",
    "polars_llm_no_cache",
    "polars_llm_sdk",
    "bare",
    "bare_uvloop",
    "reference",
)


def _steady(run: dict[str, Any], bound: float) -> str:
    steady = run.get("pace", {}).get("steady_per_s")
    return "" if steady is None else f"{steady / bound:.1%}"


def pace_table(results: dict[str, Any]) -> str:
    """Where the wall time of the S1 and S9 runs went, from the server's timeline."""
    runs: list[tuple[str, float, dict[str, Any]]] = []
    for row in results.get("s1", {}).get("rows", []):
        runs += [
            (f"S1 C={row['concurrency']}", row["bound_per_s"], row[k])
            for k in ("cold", "reached", "bare")
            if k in row
        ]
    if s9 := results.get("s9"):
        runs += [(f"S9 C={s9['concurrency']}", s9["bound_per_s"], s9[k]) for k in ("cold", "bare")]
    for row in results.get("s11", {}).get("rows", []):
        runs += [
            (f"S11 C={row['concurrency']}", row["bound_per_s"], row[k]) for k in ("cold", "bare")
        ]
    rows = [
        [
            label,
            run["client"],
            f"{run['share_of_bound']:.1%}",
            _f(pace["to_first_ms"]),
            _f(pace["first_c_ms"]),
            _steady(run, bound),
            _f(pace["drain_ms"]),
            _f(pace["after_last_ms"]),
        ]
        for label, bound, run in runs
        if (pace := run.get("pace"))
    ]
    if not rows:
        return ""
    return (
        "Where the wall time went (S1, S9, S11), from the fake server's timeline: time to the first "
        "request, time for the first C requests to arrive (each needs a new connection), the "
        "steady pace between the 20th and 80th percentile answers as a share of the bound, the "
        "last round's drain, and the time after the last answer\n\n"
        + _table(
            [
                "scenario",
                "client",
                "of bound",
                "to first ms",
                "first C ms",
                "steady of bound",
                "drain ms",
                "after last ms",
            ],
            rows,
        )
    )


def tables(results: dict[str, Any]) -> str:
    """Markdown tables of every scenario that ran."""
    env = results.get("environment", {})
    dirty = " + uncommitted library changes" if env.get("uncommitted_library_files") else ""
    parts: list[str] = [
        f"{results.get('mode', '?')} run, {env.get('date', '?')}, commit {env.get('commit', '?')}"
        f"{dirty}, {env.get('cores', '?')} cores, load average "
        f"{env.get('load_at_start', [0])[0]:.1f} at start"
    ]
    if s1 := results.get("s1"):
        rows = []
        for row in s1["rows"]:
            for kind in ("cold", "reached", "reference", "bare"):
                if kind not in row:
                    continue
                r = row[kind]
                rows.append([str(row["concurrency"]), r["client"], *_latency_cells(r, row, 2)])
        parts.append(
            f"S1: latency {s1['latency_s'] * 1000:.0f} ms ± {s1['jitter_s'] * 1000:.0f} ms, "
            f"N = {s1['n']:,} unique; the ceiling is what an ideal client reaches (``ceiling``)\n\n"
            + _table(["C", "client", *LATENCY_HEADERS], rows)
        )
    if s2 := results.get("s2"):
        rows = [
            [
                r["client"]
                + ("" if r["notes"].get("cache", True) else ", cache=False")
                + (", transport=openai" if r["notes"].get("transport") == "openai" else ""),
                _f(r["rate_per_s"]),
                _f(r["cpu_ms_per_request"], 3),
                _f(1000 * r["server_cpu_s"] / max(1, r["calls"]), 3),
                _f(r["wall_s"], 2),
                str(r["calls"]),
                str(r["max_in_flight"]),
            ]
            for key in S2_RUNS
            if (r := s2.get(key)) is not None
        ]
        ratio = s2["polars_llm"]["rate_per_s"] / s2["reference"]["rate_per_s"]
        bare = s2["polars_llm"]["rate_per_s"] / s2["bare"]["rate_per_s"]
        every = "; ".join(
            f"{key}: " + ", ".join(f"{r['rate_per_s']:,.0f}" for r in runs)
            for key, runs in s2.get("rounds", {}).items()
        )
        parts.append(
            f"S2: zero latency, C = {s2['concurrency']}, N = {s2['n']:,}; polars-llm / bare "
            f"aiohttp loop req/s = {bare:.2f}x; polars-llm / reference req/s = {ratio:.2f}x. "
            f"The bare loops, polars-llm and cache=False alternate; each is shown by its median "
            f"round (req/s of every round: {every})\n\n"
            + _table(
                [
                    "client",
                    "req/s",
                    "client CPU ms/req",
                    "server CPU ms/req",
                    "wall s",
                    "calls",
                    "max in flight",
                ],
                rows,
            )
        )
    if s3 := results.get("s3"):
        rows = []
        for kind in ("cold", "reached", "reference"):
            if kind not in s3:
                continue
            r = s3[kind]
            ratio = s3.get(f"wall_ratio_{kind}")
            rows.append(
                [
                    r["client"],
                    str(r["n"]),
                    str(r["calls"]),
                    _f(r["wall_s"], 2),
                    "-" if ratio is None else f"{ratio:.2f}",
                    f"{r['share_of_bound']:.1%}",
                ]
            )
        parts.append(
            f"S3: {s3['n']:,} rows, {s3['unique']:,} unique, C = {s3['concurrency']}, latency as "
            "S1 (bound counts unique prompts)\n\n"
            + _table(["client", "rows", "calls", "wall s", "wall / S1 C=64 wall", "of bound"], rows)
        )
    if s4 := results.get("s4"):
        rows = [
            [
                f"{s4[k]['n']:,} rows",
                f"{s4['unique']:,}",
                _f(s4[k]["rate_per_s"], 0),
                _f(s4[k]["wall_s"], 2),
                _f(s4[k]["cpu_s"], 2),
                str(s4[k]["calls"]),
            ]
            for k in ("rows", "all_unique")
        ]
        parts.append(
            f"S4: fully cached (warmed with {s4['unique']:,} unique prompts in "
            f"{s4['warm_s']:.0f} s); reference: n/a, it has no cache\n\n"
            + _table(["input", "unique prompts", "rows/s", "wall s", "CPU s", "calls"], rows)
        )
    if s5 := results.get("s5"):
        rows = [
            [
                r["client"],
                _f(r["rate_per_s"]),
                f"{r['rate_per_s'] / s5['bound_per_s']:.1%}",
                str(r["calls"]),
                str(r["status_counts"].get("429", 0)),
                f"{r['share_429']:.2%}",
                _f(r["wall_s"], 1),
            ]
            for r in (s5["polars_llm"], s5["reference"])
        ]
        parts.append(
            f"S5: server limit {s5['rpm']:,} requests/min (bound {s5['bound_per_s']:.0f} req/s), "
            f"zero latency, C = {s5['concurrency']}, N = {s5['n']:,}\n\n"
            + _table(["client", "req/s", "of limit", "calls", "429s", "429 share", "wall s"], rows)
        )
    if s6 := results.get("s6"):
        rows = [
            ["one with_columns per step", _f(s6["step_by_step_s"], 2), "1.00"],
            ["polars_llm.pipeline", _f(s6["pipelined_s"], 2), f"{s6['ratio']:.2f}"],
            ["bound: one step alone", _f(s6["one_step_bound_s"], 2), ""],
        ]
        parts.append(
            f"S6: two dependent steps on two models, N = {s6['n']:,} rows, C = "
            f"{s6['concurrency_per_model']} per model, latency {s6['latency'] * 1000:.0f} ms "
            f"± {s6['jitter'] * 1000:.0f} ms\n\n" + _table(["run", "wall s", "ratio"], rows)
        )
    if s9 := results.get("s9"):
        rows = [
            [s9[k]["client"], *_latency_cells(s9[k], s9)]
            for k in ("cold", "reached", "bare")
            if k in s9
        ]
        parts.append(
            f"S9: C = {s9['concurrency']}, latency {s9['latency_s']:.0f} s ± 25 %, "
            f"N = {s9['n']:,} unique\n\n" + _table(["client", *LATENCY_HEADERS], rows)
        )
    if s11 := results.get("s11"):
        rows = [
            [
                str(row["concurrency"]),
                f"{row['latency_s']:g}",
                f"{row['n']:,}",
                row[k]["client"],
                *_latency_cells(row[k], row),
            ]
            for row in s11["rows"]
            for k in ("cold", "bare")
        ]
        parts.append(
            "S11: issue #15's latency scenarios as it states them, at a fixed latency\n\n"
            + _table(["C", "L s", "N", "client", *LATENCY_HEADERS], rows)
        )
    if pace := pace_table(results):
        parts.append(pace)
    if s7 := results.get("s7"):
        rows = [
            [
                f"{r['rows']:,}",
                str(r["calls"]),
                _f(r["wall_s"], 1),
                _f(r["peak_rss_mb"], 0),
                _f(r["input_in_memory_mb"], 0),
                _f(r["output_in_memory_mb"], 0),
            ]
            for r in s7["runs"]
        ]
        parts.append(
            f"S7: polars-llm enrich, one step, {s7['runs'][0]['unique_prompts']:,} unique prompts; "
            f"the interpreter with its imports alone peaks at {s7['import_rss_mb']:.0f} MB\n\n"
            + _table(
                ["rows", "calls", "wall s", "peak RSS MB", "input frame MB", "output frame MB"],
                rows,
            )
        )
    if s8 := results.get("s8"):
        parts.append(s8_table(s8))
    if s_ray := results.get("s_ray"):
        rows = [
            [
                str(r["workers"]),
                _f(r["bound_per_s"], 0),
                _f(r["rate_per_s"]),
                _f(r["wall_s"], 2),
                str(r["calls"]),
                str(r["max_in_flight"]),
            ]
            for r in s_ray["rows"]
        ]
        parts.append(
            f"S-ray (scenario 10): polars_llm.ray.enrich on a local Ray (2 CPUs), "
            f"{s_ray['n']:,} unique prompts, latency {s_ray['latency_s'] * 1000:.0f} ms, "
            f"C={s_ray['concurrency']} per worker; wall time includes starting the workers\n\n"
            + _table(
                ["workers", "bound rows/s", "rows/s", "wall s", "calls", "max in flight"], rows
            )
        )
    if results.get("goals"):
        rows = [[g["goal"], "met" if g["met"] else "MISSED", g["figure"]] for g in results["goals"]]
        caveat = (
            " (quick sizes: fixed costs weigh more, indicative only)"
            if results.get("mode") == "quick"
            else ""
        )
        parts.append(f"Goals{caveat}\n\n" + _table(["goal", "result", "figure"], rows))
    return "\n\n".join(parts)


def plot(s1: dict[str, Any], path: Path) -> None:
    """Throughput against concurrency (left) and the same as a share of the bound (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cs = [r["concurrency"] for r in s1["rows"]]
    fig, (ax, share) = plt.subplots(1, 2, figsize=(11, 4.5), dpi=120)
    ax.plot(cs, [r["bound_per_s"] for r in s1["rows"]], "k--", label="bound: C / L")
    styles = {
        "cold": ("o-", "polars-llm, cold endpoint"),
        "reached": ("s-", "polars-llm, endpoint reached"),
        "reference": ("^-", "reference: gather + Semaphore + AsyncOpenAI"),
    }
    for kind, (style, label) in styles.items():
        rows = [r for r in s1["rows"] if kind in r]
        if rows:
            x = [r["concurrency"] for r in rows]
            ax.plot(x, [r[kind]["rate_per_s"] for r in rows], style, label=label)
            share.plot(x, [100 * r[kind]["share_of_bound"] for r in rows], style, label=label)
    share.plot(cs, [95 if c <= 64 else 85 for c in cs], "k_", markersize=24, label="goal")
    for axis in (ax, share):
        axis.set_xscale("log", base=2)
        axis.set_xticks(cs, [str(c) for c in cs])
        axis.set_xlabel("concurrency C")
        axis.grid(True, which="both", alpha=0.3)
    ax.set_yscale("log")
    ax.set_ylabel("throughput (req/s)")
    ax.legend(fontsize=8)
    share.set_ylim(0, 105)
    share.set_ylabel("share of the bound (%)")
    share.legend(fontsize=8, loc="lower left")
    fig.suptitle(
        f"N = {s1['n']:,} unique prompts, latency {s1['latency_s'] * 1000:.0f} ± "
        f"{s1['jitter_s'] * 1000:.0f} ms, fake server in its own process, "
        f"{os.cpu_count()} cores"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def environment() -> dict[str, Any]:
    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    return {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "polars": pl.__version__,
        "openai": openai.__version__,
        "commit": git("rev-parse", "--short", "HEAD"),
        "uncommitted_library_files": git("status", "--porcelain", "--", "polars_llm").splitlines(),
        "load_at_start": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["s8-worker"]:
        return s8_worker(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="reduced sizes, under two minutes")
    parser.add_argument("--json", type=Path, default=Path("bench-results.json"))
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "throughput.png")
    parser.add_argument(
        "--scenarios", default="1,2,3,4,5,6,7,8,9,11", help="comma-separated, e.g. 1,3"
    )
    args = parser.parse_args(argv)
    wanted = {int(s) for s in args.scenarios.split(",") if s.strip()}
    sizes = QUICK if args.quick else FULL

    results: dict[str, Any] = {
        "mode": "quick" if args.quick else "full",
        "sizes": sizes,
        "environment": environment(),
    }
    started = time.perf_counter()
    steps: list[tuple[int, str, Callable[[], dict[str, Any]]]] = [
        (1, "s1", lambda: scenario_1(sizes)),
        (2, "s2", lambda: scenario_2(sizes)),
        (3, "s3", lambda: scenario_3(sizes, results.get("s1"))),
        (4, "s4", lambda: scenario_4(sizes)),
        (5, "s5", lambda: scenario_5(sizes)),
        (6, "s6", lambda: scenario_6(sizes)),
        (7, "s7", lambda: scenario_7(sizes)),
        (8, "s8", lambda: scenario_8(sizes)),
        (9, "s9", lambda: scenario_9(sizes)),
        (10, "s_ray", lambda: scenario_ray(sizes)),
        (11, "s11", lambda: scenario_11(sizes)),
    ]
    for number, key, step in steps:
        if number in wanted:
            results[key] = step()
    results["goals"] = goals(results)
    results["total_s"] = time.perf_counter() - started
    results["environment"]["load_at_end"] = os.getloadavg()

    args.json.write_text(json.dumps(results, indent=2))
    if "s1" in results:
        plot(results["s1"], args.plot)
    print(tables(results))
    print(
        f"\ntotal {results['total_s']:.0f} s; JSON: {args.json}"
        + (f"; chart: {args.plot}" if "s1" in results else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
