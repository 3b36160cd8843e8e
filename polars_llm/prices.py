"""What tokens cost: a small table of USD prices per million tokens, which users can override.

The table covers a few common OpenAI models and the embedded model (free). Prices change and
differ between providers, so a run's cost is only as right as this table: give your own with
``polars-llm enrich --prices FILE`` or ``$POLARS_LLM_PRICES``, a JSON file mapping model names
to ``{"input": USD per 1M prompt tokens, "output": USD per 1M completion tokens}``::

    {"gpt-4o-mini": {"input": 0.15, "output": 0.60}, "my-vllm-model": {"input": 0, "output": 0}}

Entries of the file replace or add to the table. A model found in neither has an unknown cost,
shown as "unknown", never as zero. A dated name (``gpt-4o-mini-2024-07-18``) takes the price of
its undated one.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

from .errors import ConfigError

# USD per million tokens (input, output); checked against OpenAI's price page, 2026-11.
PRICES: dict[str, tuple[float, float]] = {
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4o": (2.50, 10.00),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
    "local": (0.0, 0.0),
}
ENV_VAR = "POLARS_LLM_PRICES"
_DATED = re.compile(r"-\d{4}-\d{2}-\d{2}$")


def load_prices(path: str | os.PathLike[str] | None = None) -> dict[str, tuple[float, float]]:
    """The price table, with the entries of ``path`` (else ``$POLARS_LLM_PRICES``) on top."""
    table = dict(PRICES)
    source = path if path is not None else os.environ.get(ENV_VAR) or None
    if source is None:
        return table
    try:
        data = json.loads(Path(source).read_text())
    except OSError as e:
        raise ConfigError(f"cannot read the price file {source}: {e.strerror or e}") from e
    except json.JSONDecodeError as e:
        raise ConfigError(f"the price file {source} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"the price file {source} must map model names to prices")
    for model, entry in data.items():
        table[model] = _entry(source, model, entry)
    return table


def _entry(source: object, model: str, entry: object) -> tuple[float, float]:
    if isinstance(entry, Mapping) and set(entry) == {"input", "output"}:
        prices = (entry["input"], entry["output"])
        if all(isinstance(p, int | float) and not isinstance(p, bool) and p >= 0 for p in prices):
            return float(prices[0]), float(prices[1])
    raise ConfigError(
        f"the price file {source}: {model!r} must be "
        '{"input": USD per 1M prompt tokens, "output": USD per 1M completion tokens}, '
        f"got {entry!r}"
    )


def price(
    model: str, table: Mapping[str, tuple[float, float]] | None = None
) -> tuple[float, float] | None:
    """USD per million (prompt, completion) tokens of ``model``; None when unknown."""
    table = PRICES if table is None else table
    found = table.get(model)
    if found is None:
        found = table.get(_DATED.sub("", model))
    return found


def cost(
    model: str,
    prompt_tokens: int,
    completion_tokens: int,
    table: Mapping[str, tuple[float, float]] | None = None,
) -> float | None:
    """USD for these tokens of ``model``; None when its price is unknown."""
    found = price(model, table)
    if found is None:
        return None
    return (prompt_tokens * found[0] + completion_tokens * found[1]) / 1e6
