"""Summarize a py-spy profile: each thread's share of the samples, then one thread's hottest frames.

Record with ``--threads`` and the raw format, then summarize::

    py-spy record --threads -f raw -r 250 -o s2.txt -- python scripts/profile_s2.py
    python scripts/flame.py s2.txt --thread polars-llm-engine --top 25

Inclusive is the share of the thread's samples with the frame anywhere on the stack; self, with
the frame on top (where the time is spent).
"""

from __future__ import annotations

import argparse
import collections
import re
from pathlib import Path

_FRAME = re.compile(r"(.*) \((.*?)(?::\d+)?\)$")


def _name(frame: str) -> str:
    match = _FRAME.match(frame)
    if match is None:
        return frame
    function, path = match.groups()
    return f"{function} ({path.split('site-packages/')[-1]})"


def summarize(path: Path, thread: str, top: int) -> str:
    """The summary as text: thread shares, then inclusive and self shares within ``thread``."""
    threads: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = chosen = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        frames = stack.split(";")
        total += n
        threads[frames[0]] += n
        if thread not in frames[0]:
            continue
        chosen += n
        names = [_name(f) for f in frames[1:]]
        for name in set(names):
            inclusive[name] += n
        if names:
            own[names[-1]] += n
    lines = [f"{total} samples"]
    lines += [f"{100 * n / total:5.1f} %  {name}" for name, n in threads.most_common(8)]
    for title, counter in (("inclusive", inclusive), ("self", own)):
        lines.append(f"-- {thread}: {title} ({chosen} samples) --")
        lines += [
            f"{100 * n / max(1, chosen):5.1f} %  {name}" for name, n in counter.most_common(top)
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("profile", type=Path, help="py-spy record --threads -f raw output")
    parser.add_argument("--thread", default="polars-llm-engine", help="a part of the thread name")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    print(summarize(args.profile, args.thread, args.top))


if __name__ == "__main__":
    main()
