"""End to end on the embedded model: no endpoint configured, real SmolLM2 output through the API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = """
import json, sys
import polars as pl
import polars_llm
from polars_llm import local

df = pl.read_parquet(sys.argv[1]).head(3)
expr = pl.col("doc").llm.complete(
    "In a few words, what is this module for? {doc}", max_tokens=16, details=True
)
first = df.with_columns(a=expr).unnest("a")
second = df.with_columns(a=expr).unnest("a")
labels = df.with_columns(
    k=pl.col("doc").llm.classify(["networking", "text", "data", "system", "other"], max_tokens=16)
)["k"]
print(json.dumps({
    "values": first["value"].to_list(),
    "errors": first["error"].to_list(),
    "cached_first": first["cached"].to_list(),
    "cached_second": second["cached"].to_list(),
    "same": first["value"].to_list() == second["value"].to_list(),
    "labels": labels.cast(pl.String).to_list(),
    "server_pid": local._server.process.pid,
}))
"""


def test_enrichment_on_the_embedded_model(tmp_path: Path) -> None:
    """With no endpoint, real model text fills each row, labels stay in the set, a rerun hits the cache, and the server exits with us."""
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_BASE_URL", "OPENAI_API_KEY")}
    env["POLARS_LLM_CACHE_DIR"] = str(tmp_path / "cache")
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(ROOT / "datasets" / "stdlib_docs.parquet")],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["errors"] == [None, None, None]
    assert all(isinstance(v, str) and v.strip() for v in result["values"])
    assert not any(v.startswith("echo:") for v in result["values"])
    assert result["cached_first"] == [False, False, False]
    assert result["cached_second"] == [True, True, True]
    assert result["same"]
    # llama.cpp's grammar holds the model to the label set (classify raises otherwise).
    assert set(result["labels"]) <= {"networking", "text", "data", "system", "other"}
    assert proc.stderr.count("using the embedded model") == 1
    deadline = time.monotonic() + 10
    while psutil.pid_exists(result["server_pid"]) and time.monotonic() < deadline:
        try:
            if psutil.Process(result["server_pid"]).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.1)
    alive = psutil.pid_exists(result["server_pid"])
    assert not alive or psutil.Process(result["server_pid"]).status() == psutil.STATUS_ZOMBIE
