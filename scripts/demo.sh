#!/usr/bin/env bash
# Set up (virtualenv, packages, mosquitto) and run `edgefleet demo` on embedded defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh server,litert
export PATH="$PATH:/usr/sbin"
# The TFLite converter toolchain (onnx2tf + TensorFlow, pinned, in its own virtualenv).
export EDGEFLEET_TOOLCHAIN_DIR="${EDGEFLEET_TOOLCHAIN_DIR:-$PWD/.toolchains}"
.venv/bin/edgefleet toolchain install tflite
exec .venv/bin/edgefleet demo "$@"
