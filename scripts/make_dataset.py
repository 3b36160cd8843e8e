"""Build ``datasets/stdlib_docs.parquet``: one row per standard-library module and its summary.

The text is the first paragraph of each module's docstring, as shipped with the Python
running this script: real English prose that nobody on this project wrote, small enough to
commit, and rebuildable anywhere with ``python scripts/make_dataset.py``.

Columns: ``module`` (str) and ``doc`` (str), sorted by module. The output depends only on the
Python version and platform (some modules exist only on some platforms), both of which are
recorded in ``datasets/README.md``.
"""

from __future__ import annotations

import inspect
import json
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import polars as pl

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "datasets" / "stdlib_docs.parquet"

MIN_CHARS = 40
MAX_CHARS = 600

# Modules whose import does something visible (opens a browser, prints, starts a GUI) or that
# are not documentation of a library (the IDLE application, CPython's own test suite).
SKIP = {"antigravity", "this", "idlelib", "tkinter", "test"}
SKIP_PREFIXES = ("turtle", "_")

# Run in a fresh interpreter per module so that a module that misbehaves on import cannot
# affect the others or this script. ``-I -S`` keeps site-packages off sys.path, so that
# nothing installed (setuptools replaces ``distutils`` through a .pth file, for one) can
# change what a stdlib name resolves to.
CHILD = """
import inspect, json, sys, warnings
warnings.simplefilter("ignore")
module = __import__(sys.argv[1])
sys.stdout.write(json.dumps(inspect.getdoc(module)))
"""


def wanted(name: str) -> bool:
    """Whether a standard-library module name is one whose docstring we try to read."""
    if name in SKIP or name.startswith(SKIP_PREFIXES):
        return False
    return not (name.endswith("test") or name.endswith("tests"))


def module_doc(name: str, workdir: str) -> str | None:
    """The docstring of module ``name`` via a throwaway interpreter, or None if it fails."""
    try:
        proc = subprocess.run(
            [sys.executable, "-I", "-S", "-c", CHILD, name],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
            cwd=workdir,
        )
    except subprocess.TimeoutExpired:
        return None
    if proc.returncode != 0:
        return None
    # Modules may print on import; the JSON document is whatever came last.
    try:
        return json.loads(proc.stdout.splitlines()[-1]) if proc.stdout else None
    except json.JSONDecodeError:
        return None


def first_paragraph(doc: str) -> str:
    """The text up to the first blank line, with runs of whitespace collapsed to one space."""
    paragraph = re.split(r"\n\s*\n", inspect.cleandoc(doc).strip(), maxsplit=1)[0]
    return " ".join(paragraph.split())


def build() -> pl.DataFrame:
    """Collect the summaries of every importable stdlib module, sorted by module name."""
    names = sorted(n for n in sys.stdlib_module_names if wanted(n))
    with tempfile.TemporaryDirectory() as workdir, ThreadPoolExecutor(max_workers=4) as pool:
        docs = list(pool.map(lambda n: module_doc(n, workdir), names))
    rows = []
    for name, doc in zip(names, docs, strict=True):
        if not doc:
            continue
        text = first_paragraph(doc)
        if MIN_CHARS <= len(text) <= MAX_CHARS:
            rows.append((name, text))
    return pl.DataFrame(rows, schema={"module": pl.String, "doc": pl.String}, orient="row")


def main() -> None:
    """Write the dataset and say how many rows it has and which Python produced it."""
    df = build()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    # No statistics and a fixed compression so that rebuilding gives byte-identical output.
    df.write_parquet(OUT, compression="zstd", statistics=False)
    version = ".".join(map(str, sys.version_info[:3]))
    print(f"wrote {OUT.relative_to(ROOT)}: {df.height} rows (Python {version}, {sys.platform})")


if __name__ == "__main__":
    main()
