#!/usr/bin/env bash
# Builds llama.cpp's `llama-server` from the llama.cpp source that the installed
# llama-cpp-python sdist vendors, once, and caches the binary outside the repository:
#   ~/.cache/loopbot/llama-server-<llama-cpp-python version>/llama-server
# Same llama.cpp and the same portable CPU flags as the in-process backend (see bootstrap.sh),
# so the remote path scores with the same code. Prints the binary's path on stdout.
# Used by the tests of the remote backend and by `deploy/` users who have no llama-server.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
version=$("$PYTHON" -c 'import llama_cpp; print(llama_cpp.__version__)')
cache=${LOOPBOT_CACHE:-$HOME/.cache/loopbot}
dest="$cache/llama-server-$version"
if [ -x "$dest/llama-server" ]; then
  echo "$dest/llama-server"
  exit 0
fi

# shellcheck source=portable-flags.sh
source scripts/portable-flags.sh

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "building llama-server from llama-cpp-python $version's vendored llama.cpp (a few minutes)" >&2
"$PYTHON" -m pip download --quiet --no-deps --no-binary :all: \
  "llama-cpp-python==$version" -d "$work" >&2
tar -xzf "$work"/llama_cpp_python-*.tar.gz -C "$work"
src=$(echo "$work"/llama_cpp_python-*/vendor/llama.cpp)
# shellcheck disable=SC2086  # PORTABLE is a list of flags
cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_CURL=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  $PORTABLE >&2
cmake --build "$work/build" --target llama-server -j "$(nproc)" >&2
mkdir -p "$dest"
cp "$work/build/bin/llama-server" "$dest/llama-server.tmp"
mv "$dest/llama-server.tmp" "$dest/llama-server"
echo "$dest/llama-server"
