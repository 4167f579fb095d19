#!/usr/bin/env bash
# Set everything up (idempotent), then the main job: start llmsup (by default it serves the
# catalog's instruction-tuned SmolLM2 135M Instruct, and the Gemma 3 270M base model by
# name, loaded when asked for), list the models, stream a completion and chat answers
# (the last one continues from the prefix cache), one completion from Gemma 3 (its core
# group changes model) and one chat through the OpenAI HTTP API, show the workers and the
# cache, stop it.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/tools/setup.sh"
llmsup() { "${LLMSUP_VENV:-$root/.venv}/bin/llmsup" "$@"; }
export LLMSUP_STATE_DIR=${LLMSUP_STATE_DIR:-/tmp/llmsup-demo-$(id -u)}

run() { printf '\n$ llmsup %s\n' "$*"; llmsup "$@"; }
port=${LLMSUP_DEMO_HTTP_PORT:-8089}
run start --http "127.0.0.1:$port"
trap 'llmsup stop --timeout 5 >/dev/null 2>&1 || true' EXIT
run models
run generate "The three primary colors are" --max-tokens 40 --temperature 0
run chat "Name three large rivers." --max-tokens 40 --temperature 0
# The same system prompt again: its tokens come from the prefix cache ("cached" on stderr).
system="You are a geography teacher. Answer in one short sentence, and name real places only."
run chat "Name a long river in Africa." --system "$system" --max-tokens 24 --temperature 0
run chat "Name a long river in Asia." --system "$system" --max-tokens 24 --temperature 0
# The OpenAI HTTP API, as curl (or the openai SDK, Open WebUI, ...) speaks it.
printf '\n$ curl -sN http://127.0.0.1:%s/v1/chat/completions ...\n' "$port"
curl -sN "http://127.0.0.1:$port/v1/chat/completions" -H 'Content-Type: application/json' \
  -d '{"messages":[{"role":"user","content":"Name three large rivers."}],"max_tokens":24,
       "temperature":0,"stream":true,"stream_options":{"include_usage":true}}'
run generate "The three primary colors are" --model gemma3-270m --max-tokens 24 --temperature 0
run tokenize "Hello, llmsup"
run status
run top --once
run stop
trap - EXIT
