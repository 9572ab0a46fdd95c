#!/usr/bin/env bash
# Set up (virtualenv, packages, mosquitto) and run the whole test suite, slow tests included.
# Database tests run on SQLite, and on PostgreSQL too when EDGEFLEET_TEST_POSTGRES_URL is set.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh dev
export PATH="$PATH:/usr/sbin"
# The TFLite converter toolchain (onnx2tf + TensorFlow, pinned, in its own virtualenv).
export EDGEFLEET_TOOLCHAIN_DIR="${EDGEFLEET_TOOLCHAIN_DIR:-$PWD/.toolchains}"
.venv/bin/edgefleet toolchain install tflite
echo "lint: ruff, mypy --strict"
.venv/bin/ruff check --quiet .
.venv/bin/ruff format --check --quiet .
.venv/bin/mypy
# Three workers on two cores: much of a test's time is agents, brokers and rigs waiting.
# Slow tests are collected first (tests/conftest.py) and handed out one at a time, so the long
# ones start early and the run does not end on one long test while the other workers idle.
exec .venv/bin/python -m pytest -p no:cacheprovider -ra -n 3 --dist load --maxschedchunk 1 \
  --durations=15 "$@"
