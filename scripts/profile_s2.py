"""Benchmark S2 alone, to run under a profiler: zero latency, C = 64, cache on, public API.

    py-spy record --threads -f raw -r 250 -o s2.txt -- python scripts/profile_s2.py 20000
    python scripts/flame.py s2.txt

Prints requests per second and client CPU per request (every thread of this process) to stderr.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import polars as pl

import polars_llm
from polars_llm.testing import spawn_server


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    with spawn_server() as server, tempfile.TemporaryDirectory() as tmp:
        settings = polars_llm.Settings(
            base_url=server.base_url,
            api_key="k",
            model="m",
            concurrency=64,
            cache_dir=Path(tmp) / "cache",
            progress=False,
        )
        df = pl.DataFrame({"q": [f"p{i}" for i in range(n)]})
        cpu, start = time.process_time(), time.perf_counter()
        df.with_columns(a=pl.col("q").llm.complete("Say {q}", settings=settings))
        cpu, wall = time.process_time() - cpu, time.perf_counter() - start
    print(f"{n / wall:,.0f} req/s, {1000 * cpu / n:.3f} ms client CPU per request", file=sys.stderr)


if __name__ == "__main__":
    main()
