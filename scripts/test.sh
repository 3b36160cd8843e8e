#!/usr/bin/env bash
# Set up a virtualenv with everything the project needs, then lint and run the tests.
# The first run builds llama.cpp from source (a few minutes); pip caches the wheel after that.
set -euo pipefail
cd "$(dirname "$0")/.."
# The shared-state tests run a real redis-server on a loopback port.
if ! command -v redis-server >/dev/null; then
    apt-get update -qq && apt-get install -y -qq redis-server >/dev/null
fi
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --quiet --upgrade pip
.venv/bin/python -m pip install --quiet --quiet -e '.[local,dev,ray]'
# Airflow 3 in a virtualenv of its own (it pins ~250 packages): tests/test_airflow.py drives its
# `airflow` command. The version is pinned so that a new release cannot break CI unannounced.
python3 -m venv .venv-airflow
.venv-airflow/bin/python -m pip install --quiet --quiet --upgrade pip
.venv-airflow/bin/python -m pip install --quiet --quiet -e '.[airflow]' 'apache-airflow==3.3.2'
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/pytest "$@"
