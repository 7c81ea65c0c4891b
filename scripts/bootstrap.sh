#!/usr/bin/env bash
# Creates .venv and installs loopbot with what it needs, once; later runs return in a second.
# llama-cpp-python is compiled from source with portable CPU flags (see README, "Portable
# build"): a native build on a CPU that reports AMX segfaults in ggml's AMX matmul with Q8_0
# models, and a native binary breaks when the image moves to another CPU.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "loopbot needs Python 3.11 or newer (found: $("$PYTHON" --version 2>&1))." >&2
  exit 1
fi
for tool in cc c++ cmake; do
  if ! command -v "$tool" >/dev/null; then
    echo "loopbot builds llama-cpp-python from source and needs '$tool':" >&2
    echo "  Debian/Ubuntu: sudo apt-get install build-essential cmake python3-dev python3-venv" >&2
    exit 1
  fi
done

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi

# shellcheck source=portable-flags.sh
source scripts/portable-flags.sh
export CMAKE_ARGS="${CMAKE_ARGS:-$PORTABLE}"

extras=${LOOPBOT_EXTRAS:-dev,bench}
stamp=".venv/.loopbot-installed"
want="$(cat pyproject.toml | sha256sum | cut -c1-16) $extras $CMAKE_ARGS"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "Installing loopbot[$extras] into .venv (llama-cpp-python compiles from source:"
  echo "about 4-5 minutes on 2 cores the first time; CMAKE_ARGS=$CMAKE_ARGS)"
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e ".[$extras]"
  echo "$want" > "$stamp"
fi
