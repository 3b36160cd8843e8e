"""What a batch did, and how it shows while it runs: a bar, log lines, or nothing.

``Progress`` is the one counter type of every kind of work (chat, embeddings, pipelines). The
engine loop updates it; the waiting caller reads it to draw a bar on a terminal, a ``tqdm.auto``
bar in a notebook, or, when stderr is not a terminal (Airflow, cron, a notebook kernel's log),
lines through the ``polars_llm`` logger about every ten seconds. Work that ends within a few
seconds shows nothing.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

logger = logging.getLogger("polars_llm")

# Seconds before anything shows: short batches stay quiet.
SHOW_AFTER = 3.0
# Seconds between two log lines.
LOG_EVERY = 10.0


@dataclass
class Progress:
    """Counters of a batch. ``done`` counts unique requests answered or failed, not rows."""

    done: int = 0
    cached: int = 0
    failed: int = 0
    calls: int = 0  # HTTP requests sent, retries and hedges included
    retries: int = 0
    hedges: int = 0  # extra requests sent because one hung (see endpoint.py)
    prompt_tokens: int = 0  # paid for by this run
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0  # served from the cache: not paid again
    cached_completion_tokens: int = 0

    def add(self, other: Progress) -> None:
        """Add ``other``'s counts to these."""
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


def _in_notebook() -> bool:
    shell = sys.modules.get("IPython")
    if shell is None or "ipykernel" not in sys.modules:
        return False
    get = getattr(shell, "get_ipython", None)
    return get is not None and get() is not None


class Display:
    """Shows a running count of ``total`` units, fed by ``counts() -> (done, cached, failed)``."""

    def __init__(
        self,
        total: int,
        counts: Callable[[], tuple[int, int, int]],
        *,
        show: bool | None,
        unit: str = "req",
        desc: str = "polars-llm",
    ) -> None:
        self.total = total
        self.counts = counts
        self.unit = unit
        self.desc = desc
        self.t0 = time.monotonic()
        self._last_log = self.t0
        self._bar: Any = None
        # Asked for explicitly, it shows at once; otherwise short work stays quiet.
        self._delay = 0.0 if show is True else SHOW_AFTER
        if show is False or total == 0:
            self.mode = "off"
        elif show is True or sys.stderr.isatty():
            self.mode = "bar"
        elif _in_notebook():
            self.mode = "notebook"
        else:
            self.mode = "log"

    def update(self) -> None:
        """Redraw: called by the waiting caller a few times a second."""
        if self.mode == "off":
            return
        now = time.monotonic()
        if now - self.t0 < self._delay:
            return
        done, cached, failed = self.counts()
        if self.mode == "log":
            if now - self._last_log >= LOG_EVERY:
                self._last_log = now
                logger.info(self._line(done, cached, failed, now))
            return
        if self._bar is None:
            if self.mode == "notebook":
                from tqdm.auto import tqdm
            else:
                from tqdm import tqdm
            self._bar = tqdm(total=self.total, unit=self.unit, desc=self.desc, leave=False)
        self._bar.n = done
        self._bar.set_postfix(cached=cached, failed=failed, refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        """Final redraw; a log line closes a run that logged anything."""
        if self._bar is not None or (self.mode in ("bar", "notebook") and self._delay == 0):
            self.update()
            self._bar.close()
            self._bar = None
        elif self.mode == "log" and self._last_log > self.t0:
            done, cached, failed = self.counts()
            logger.info(self._line(done, cached, failed, time.monotonic()))

    def _line(self, done: int, cached: int, failed: int, now: float) -> str:
        pct = 100.0 * done / self.total if self.total else 100.0
        return (
            f"{self.desc}: {done}/{self.total} {self.unit} ({pct:.0f}%), {cached} cached, "
            f"{failed} failed, {now - self.t0:.0f} s"
        )
