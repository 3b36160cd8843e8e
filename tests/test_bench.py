"""The bench's ceiling: the share of the bound that an ideal client reaches (scripts/bench.py)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import bench


@pytest.mark.parametrize(("n", "c"), [(3_000, 256), (8_000, 1_024), (5_000, 64), (100, 256)])
def test_at_a_fixed_latency_the_ceiling_is_the_share_of_the_last_round_filled(n: int, c: int):
    # Every round takes exactly L: the run takes ceil(N / C) of them, the bound counts N / C.
    assert bench.ceiling(n, c, 0.2, 0.0) == pytest.approx((n / c) / math.ceil(n / c))


def test_jitter_lowers_the_ceiling_of_a_short_run_and_hardly_a_long_one():
    # The last round waits for its slowest answer: with a quarter of L of jitter, a run of
    # eight rounds loses several points more than at a fixed latency whose rounds fill.
    assert bench.ceiling(8_192, 1_024, 1.0, 0.25) < 0.95 < bench.ceiling(8_192, 1_024, 1.0, 0.0)
    assert bench.ceiling(50_000, 16, 0.2, 0.05) > 0.995


def test_the_ceiling_follows_the_servers_draws():
    # Same seed, same latencies: the same ceiling; another seed, other latencies.
    first = bench.ceiling(5_000, 256, 0.2, 0.05, seed=0)
    assert bench.ceiling(5_000, 256, 0.2, 0.05, seed=0) == first
    assert bench.ceiling(5_000, 256, 0.2, 0.05, seed=1) != first
