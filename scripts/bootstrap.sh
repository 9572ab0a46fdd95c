#!/usr/bin/env bash
# Shared set-up for scripts/demo.sh and scripts/test.sh: a Python >= 3.11 virtualenv in .venv
# with edgefleet installed (editable) plus the given extras, and mosquitto when we can install it.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-server}"

python=""
for candidate in python3.11 python3.12 python3.13 python3; do
  if command -v "$candidate" >/dev/null 2>&1 &&
     "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    python="$candidate"; break
  fi
done
if [ -z "$python" ]; then
  echo "error: edgefleet needs Python >= 3.11 (apt-get install python3.11 python3.11-venv)" >&2
  exit 2
fi

if [ ! -x .venv/bin/python ]; then
  if ! "$python" -m venv .venv 2>/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
      "$python" -m venv .venv
    else
      echo "error: cannot create a virtualenv; install python3-venv" >&2; exit 2
    fi
  fi
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[${extras}]"
if [ "$extras" = dev ]; then
  # Public ONNX models a pip package ships (PP-OCR), for the models-from-the-wild tests. Model
  # packages go in without their dependencies: only the .onnx files are used.
  .venv/bin/python -m pip install --quiet --no-deps "rapidocr-onnxruntime==1.4.4"
fi

# The HIL tests' system tools: nftables (netns rigs: packet loss), openssh (ssh rigs against a
# local sshd), qemu-user-static and mmdebstrap (the emulated Raspberry Pi rig); Debian's
# chromium for the dashboard's browser tests (Playwright drives it; it downloads no browser).
if [ "$extras" = dev ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  missing=""
  for pair in nft:nftables sshd:openssh-server ssh:openssh-client \
              qemu-aarch64-static:qemu-user-static mmdebstrap:mmdebstrap chromium:chromium; do
    tool="${pair%%:*}"; package="${pair##*:}"
    if ! command -v "$tool" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$tool" ]; then
      missing="$missing $package"
    fi
  done
  if [ -n "$missing" ]; then
    echo "installing$missing (apt-get)…"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends $missing >/dev/null
  fi
fi

# The embedded broker prefers mosquitto (the tests need it); iotcore is the pip fallback.
if ! command -v mosquitto >/dev/null 2>&1 && [ -x /usr/sbin/mosquitto ]; then
  export PATH="$PATH:/usr/sbin"
fi
if ! command -v mosquitto >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing mosquitto (apt-get)…"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null && apt-get install -y -qq mosquitto >/dev/null
    # Debian starts a system broker on 1883; edgefleet never uses it (it runs its own).
  else
    echo "note: mosquitto is not installed; the demo falls back to the iotcore broker" >&2
  fi
fi
