"""One cold polars-llm run of S1 or S9 in this process, from a given checkout: its share of the
bound and, where the fake server keeps a timeline, where the wall time went.

    python scripts/cold_start.py ROOT C N LATENCY [JITTER]

ROOT is a checkout of polars-llm (this one, or a ``git worktree`` of another commit), so that two
commits can be measured alternately in one sitting: the machine's speed drifts between minutes.
The server's jitter is JITTER times LATENCY, a quarter unless given, as in S1 (C=256, N=5,000,
0.2) and S9 (C=1,024, N=8,000, 1.0); 0 gives the fixed latency of issue #15's scenarios. ``BENCH_OPENING=K`` lets in K connections at a time instead of OPENING.
"""

from __future__ import annotations

import os
import sys

root = os.path.abspath(sys.argv[1])
sys.path[:0] = [root, os.path.join(root, "scripts")]

import bench  # noqa: E402  (from ROOT, with the polars_llm beside it)

import polars_llm  # noqa: E402

if "BENCH_OPENING" in os.environ:
    import polars_llm.transport

    polars_llm.transport.OPENING = int(os.environ["BENCH_OPENING"])

assert polars_llm.__file__.startswith(root), f"polars_llm came from {polars_llm.__file__}"
c, n, latency = int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
jitter = latency * (float(sys.argv[5]) if len(sys.argv) > 5 else 0.25)
bound = bench.bound_rate(c, latency, None)
run = bench.run_polars(
    {"latency": latency, "jitter": jitter},
    bench._questions(f"cold{os.getpid()}", n),
    c,
    reached=False,
)
pace = {k: round(v, 1) for k, v in getattr(run, "pace", {}).items()}
print(f"{root}: {n / run.wall_s / bound:.3f} of the bound", pace)
