"""S2 in one fresh process, with the CPU of each thread: where the cache-on path spends.

    python scripts/s2_threads.py default          # the public API, cache on (as S2)
    python scripts/s2_threads.py nocache          # cache=False
    python scripts/s2_threads.py nowriter         # diagnostic: answers never written to disk
    python scripts/s2_threads.py nowriter,nogate  # diagnostic: no writes and no claims either
    python scripts/s2_threads.py nosolo           # diagnostic: claims through the SQLite file
                                                  # even for a process alone

Zero latency, C = 64, N = $N (default 20,000) on a fresh fake server. The diagnostic modes
switch internals off to see what they cost; only ``default`` and ``nocache`` are what users
run. Run modes alternately, several rounds each: the machine's speed drifts between minutes.
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import polars as pl

import polars_llm
from polars_llm import cache, engine, shared
from polars_llm.testing import spawn_server


def _switch_off(modes: set[str]) -> None:
    if "nowriter" in modes:

        def no_writer(self: Any) -> None:
            return None

        def no_flush(self: Any, owner: object = None) -> None:
            return None

        cache.ResultCache._ensure_writer = no_writer  # type: ignore[method-assign]
        cache.ResultCache.flush = no_flush  # type: ignore[method-assign]
    if "nogate" in modes:
        engine.Batch._claims = lambda self: None  # type: ignore[method-assign]
    if "nosolo" in modes:
        shared.SqliteState._begin_alone = lambda self, db: False  # type: ignore[method-assign]


def _thread_cpu() -> dict[str, float]:
    """Seconds of CPU per thread of this process, by thread name (from /proc)."""
    names = {t.native_id: t.name.replace("polars-llm-", "") for t in threading.enumerate()}
    tick = os.sysconf("SC_CLK_TCK")
    seconds: dict[str, float] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        name = names.get(int(tid), "other")
        seconds[name] = seconds.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return {k: round(v, 2) for k, v in seconds.items() if v >= 0.1}


def run_s2(n: int, cache: bool = True) -> tuple[float, float]:
    """S2 once, through the public API on a fresh server: req/s, and client CPU in ms per
    request (every thread of this process)."""
    with spawn_server() as server, tempfile.TemporaryDirectory() as tmp:
        settings = polars_llm.Settings(
            base_url=server.base_url,
            api_key="k",
            model="m",
            concurrency=64,
            cache_dir=Path(tmp) / "cache",
            cache=cache,
            progress=False,
        )
        df = pl.DataFrame({"q": [f"p{i}" for i in range(n)]})
        cpu, start = time.process_time(), time.perf_counter()
        df.with_columns(a=pl.col("q").llm.complete("Say {q}", settings=settings))
        cpu, wall = time.process_time() - cpu, time.perf_counter() - start
    return n / wall, 1000 * cpu / n


def main() -> None:
    mode = sys.argv[1] if len(sys.argv) > 1 else "default"
    modes = set(mode.split(","))
    _switch_off(modes)
    rate, cpu = run_s2(int(os.environ.get("N", 20_000)), cache="nocache" not in modes)
    print(f"{mode:22} {rate:,.0f} req/s, {cpu:.3f} ms/req  {_thread_cpu()}")


if __name__ == "__main__":
    main()
