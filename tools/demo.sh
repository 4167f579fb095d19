#!/usr/bin/env bash
# Set everything up (idempotent), then the main job: start llmsup on the catalog's
# instruction-tuned model (SmolLM2 135M Instruct: the default Gemma 3 270M is a base model
# and makes a poor chat partner), list the models, stream a completion and chat answers
# through it (the last one continues from the prefix cache) and one through the OpenAI HTTP
# API, show the workers and the cache, stop it.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/tools/setup.sh"
llmsup() { "${LLMSUP_VENV:-$root/.venv}/bin/llmsup" "$@"; }
export LLMSUP_STATE_DIR=${LLMSUP_STATE_DIR:-/tmp/llmsup-demo-$(id -u)}

run() { printf '\n$ llmsup %s\n' "$*"; llmsup "$@"; }
port=${LLMSUP_DEMO_HTTP_PORT:-8089}
run start --model smollm2-135m-instruct --http "127.0.0.1:$port"
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
run tokenize "Hello, llmsup"
run status
run top --once
run stop
trap - EXIT
