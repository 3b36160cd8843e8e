"""Benchmark S2 alone, to run under a profiler: zero latency, C = 64, cache on, public API.

    py-spy record --threads -f raw -r 250 -o s2.txt -- python scripts/profile_s2.py 20000
    python scripts/flame.py s2.txt

Prints requests per second and client CPU per request (every thread of this process) to stderr.
"""

from __future__ import annotations

import sys

from s2_threads import run_s2


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    rate, cpu = run_s2(n)
    print(f"{rate:,.0f} req/s, {cpu:.3f} ms client CPU per request", file=sys.stderr)


if __name__ == "__main__":
    main()
