"""Progress in library mode: a bar in a notebook, log lines elsewhere, nothing for short work."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import nbformat
import polars as pl
import pytest
from nbclient import NotebookClient

import polars_llm
import polars_llm.progress as progress
from polars_llm.testing import FakeServer, spawn_server

ROOT = Path(__file__).resolve().parent.parent


def test_long_batches_log_lines_when_stderr_is_not_a_terminal(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Without a terminal, a batch longer than a few seconds logs its progress through the
    polars_llm logger (which Airflow's task log picks up)."""
    monkeypatch.setattr(progress, "SHOW_AFTER", 0.2)
    monkeypatch.setattr(progress, "LOG_EVERY", 0.3)
    caplog.set_level(logging.INFO, logger="polars_llm")
    with FakeServer(latency=0.1) as server:
        pl.DataFrame({"q": [f"q{i}" for i in range(40)]}).with_columns(
            a=pl.col("q").llm.complete(base_url=server.base_url, api_key="k", concurrency=4)
        )
    lines = [r.getMessage() for r in caplog.records if r.name == "polars_llm"]
    assert lines, "no progress line was logged"
    assert lines[-1].startswith("polars-llm: 40/40 req (100%)")


def test_short_batches_show_nothing(
    server: FakeServer, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    """A batch that ends within a few seconds prints and logs nothing."""
    caplog.set_level(logging.INFO, logger="polars_llm")
    pl.DataFrame({"q": ["a", "b"]}).with_columns(
        a=pl.col("q").llm.complete(base_url=server.base_url, api_key="k")
    )
    assert [r for r in caplog.records if r.name == "polars_llm"] == []
    assert capsys.readouterr().err == ""


NOTEBOOK_CELL = """
import polars as pl
import polars_llm
df = pl.DataFrame({"q": [f"q{i}" for i in range(60)]})
out = df.with_columns(a=pl.col("q").llm.complete(base_url=BASE_URL, api_key="k", concurrency=4))
print(out["a"].null_count(), out.height)
"""


@pytest.mark.timeout(240)
def test_a_notebook_shows_a_progress_bar(tmp_path: Path) -> None:
    """In a Jupyter kernel (stderr is no terminal there) a long batch draws a tqdm.auto bar."""
    with spawn_server(latency=0.3) as server:
        nb = nbformat.v4.new_notebook()
        nb.cells = [nbformat.v4.new_code_cell(f"BASE_URL = {server.base_url!r}\n{NOTEBOOK_CELL}")]
        env_before = dict(os.environ)
        os.environ["PYTHONPATH"] = str(ROOT)
        os.environ["POLARS_LLM_CACHE_DIR"] = str(tmp_path / "cache")
        try:
            NotebookClient(nb, timeout=200, kernel_name="python3").execute()
        finally:
            os.environ.clear()
            os.environ.update(env_before)
    outputs = nb.cells[0].outputs
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    widgets = [
        o for o in outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})
    ]
    assert "0 60" in text  # every row answered
    # tqdm.auto draws a widget where ipywidgets is installed, else a text bar on stderr.
    assert widgets or "polars-llm" in text, outputs
    assert polars_llm.get_settings().progress is None


@pytest.mark.parametrize(
    ("rows", "seconds", "shown"), [(2, 5.0, "0.4"), (0, 5.0, "0"), (900, 4.0, "225")]
)
def test_the_progress_line_shows_a_slow_rate_with_its_digits(
    rows: int, seconds: float, shown: str
) -> None:
    """Two rows in five seconds (the embedded model) read 0.4 rows/s, not 0 rows/s."""
    from polars_llm.enrich import _Progress
    from polars_llm.pipeline import PipelineStats

    progress = _Progress(1000, show=False, log=None)
    progress.t0 -= seconds
    line = progress.line(PipelineStats(rows=1000, rows_done=rows))
    assert line.endswith(f", {shown} rows/s")
