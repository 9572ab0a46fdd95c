#!/usr/bin/env bash
# Set up (virtualenv, packages, mosquitto) and run `edgefleet demo` on embedded defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh server
export PATH="$PATH:/usr/sbin"
exec .venv/bin/edgefleet demo "$@"
