"""Shared fixtures: a real fake server on loopback and settings pointed at it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import polars_llm
from polars_llm.settings import Settings
from polars_llm.testing import FakeServer


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Every test starts with no endpoint in the environment, a private cache and default settings."""
    for name in ("OPENAI_BASE_URL", "OPENAI_API_KEY", "POLARS_LLM_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("POLARS_LLM_CACHE_DIR", str(tmp_path / "cache"))
    saved = polars_llm.get_settings()
    polars_llm.configure(Settings())
    yield
    polars_llm.configure(saved)


@pytest.fixture
def server() -> Iterator[FakeServer]:
    with FakeServer() as srv:
        yield srv


@pytest.fixture
def use(server: FakeServer) -> Settings:
    """Point the process-wide settings at the fake server; returns them."""
    return polars_llm.configure(base_url=server.base_url, api_key="test-key", backoff_base=0.01)
