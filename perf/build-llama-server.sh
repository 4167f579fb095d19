#!/usr/bin/env bash
# Build llama.cpp's llama-server from the llama.cpp source vendored in the llama-cpp-python
# sdist that llmsup uses (same version, same CPU flags), into the user's cache. Never
# committed. Prints the binary's path; a second run only prints it.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
version=$(grep -o 'llama-cpp-python==[0-9.]*' "$root/setup.cfg" | cut -d= -f3)
flags=$(bash "$root/tools/cmake-flags.sh")
key=$(printf '%s %s' "$version" "$flags" | sha256sum | cut -c1-16)
dest=${XDG_CACHE_HOME:-$HOME/.cache}/llmsup/llama-server/$key
if [[ -x $dest/llama-server ]]; then
  echo "$dest/llama-server"
  exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "build-llama-server: llama.cpp from llama-cpp-python $version (a few minutes)" >&2
python3 -m pip download -q --no-deps --no-binary :all: -d "$work" "llama-cpp-python==$version" >&2
tar xzf "$work"/llama_cpp_python-*.tar.gz -C "$work"
src=$(echo "$work"/llama_cpp_python-*/vendor/llama.cpp)
# shellcheck disable=SC2086  # $flags is a list of -D options
cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_CURL=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON $flags >&2
cmake --build "$work/build" --target llama-server -j "$(nproc)" >&2
mkdir -p "$dest"
cp "$work/build/bin/llama-server" "$dest/"
echo "$dest/llama-server"
