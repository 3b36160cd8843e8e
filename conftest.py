"""Shared fixtures: a real fake server on loopback and settings pointed at it."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import polars_llm
from polars_llm.settings import Settings
from polars_llm.testing import FakeServer

# The operator needs Airflow, which has a virtualenv of its own (.venv-airflow): its doctests are
# not collected here, and tests/test_airflow.py runs it under that virtualenv's `airflow` command.
collect_ignore = ["polars_llm/airflow.py"]


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Every test starts with no endpoint in the environment, a private cache and default settings."""
    for name in ("OPENAI_BASE_URL", "OPENAI_API_KEY", "POLARS_LLM_CACHE", "POLARS_LLM_SHARED_URL"):
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


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server on a free loopback port (scripts/test.sh installs it); yields its URL."""
    binary = shutil.which("redis-server")
    assert binary is not None, "redis-server is missing: run scripts/test.sh, which installs it"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    folder = tmp_path_factory.mktemp("redis")
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        cwd=folder,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert process.poll() is None, "redis-server exited at start"
                assert time.monotonic() < deadline, "redis-server did not listen within 30 s"
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
def redis_url(redis_server: str) -> str:
    """The session's redis-server, emptied for this test."""
    import redis

    client = redis.Redis.from_url(redis_server)
    client.flushdb()
    client.close()
    return redis_server
