"""The distribution: ``python -m build`` makes a wheel and an sdist that install and run."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sdist and the wheel built from it, as `python -m build` makes them (offline)."""
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    return out


def test_wheel_is_named_apart_from_the_unrelated_pypi_project(dist: Path) -> None:
    """The wheel's distribution is polars-llm-enrich with the documented extras and command."""
    (wheel,) = dist.glob("polars_llm_enrich-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        info = next(n for n in names if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(zf.read(info).decode())
        entry = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        scripts = zf.read(entry).decode()
    assert meta["Name"] == "polars-llm-enrich"
    assert {"local", "s3", "gcs", "azure", "dev"} <= set(meta.get_all("Provides-Extra") or [])
    assert "polars-llm = polars_llm.cli:main" in scripts
    # Only the package and its metadata: no tests, scripts or caches in the wheel.
    assert all(n.startswith(("polars_llm/", "polars_llm_enrich-")) for n in names), names
    assert "polars_llm/py.typed" in names


def test_sdist_carries_the_tests_and_docs(dist: Path) -> None:
    """The sdist has what it takes to run the tests: the conftest, tests, docs and dataset."""
    (sdist,) = dist.glob("polars_llm_enrich-*.tar.gz")
    with tarfile.open(sdist) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    assert {"conftest.py", "pyproject.toml", "README.md", "docs/cli.md"} <= names
    assert "datasets/stdlib_docs.parquet" in names
    assert not any(".venv" in n or "__pycache__" in n for n in names)


def test_installed_wheel_imports_and_runs_the_command(dist: Path, tmp_path: Path) -> None:
    """The wheel installed on its own gives `import polars_llm` and `polars-llm --help`."""
    (wheel,) = dist.glob("polars_llm_enrich-*.whl")
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-index",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    # The target comes first on the path, ahead of the editable checkout (and the cwd is not
    # the checkout, which `python -c` would put first).
    env = {**os.environ, "PYTHONPATH": str(target)}
    where = subprocess.run(
        [sys.executable, "-c", "import polars_llm; print(polars_llm.__file__)"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        check=True,
    )
    assert Path(where.stdout.strip()).is_relative_to(target)
    helped = subprocess.run(
        [str(target / "bin" / "polars-llm"), "--help"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert helped.returncode == 0, helped.stderr
    assert "Usage: polars-llm" in helped.stdout and "enrich" in helped.stdout


def test_demo_announces_the_build_and_shows_pips_progress() -> None:
    """scripts/demo.sh says how many minutes the build takes, then lets pip show its progress."""
    lines = (ROOT / "scripts" / "demo.sh").read_text().splitlines()
    install = next(i for i, line in enumerate(lines) if "install" in line and "[local]" in line)
    assert "--quiet" not in lines[install]
    announced = [line for line in lines[:install] if line.lstrip().startswith("echo")]
    assert any("minutes" in line for line in announced), announced
