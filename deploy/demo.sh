#!/usr/bin/env bash
# The main job, for a newcomer on a fresh machine: set up, build, make a small random-weight
# Llama model in the Hugging Face layout, validate and describe it, round-trip text through its
# tokenizer and chat template, and generate from it with SPEED off and on (text, timings and
# KV bytes of each), then benchmark both depths against this machine's roofline.
set -euo pipefail
cd "$(dirname "$0")/.."

deploy/setup.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build -j2 >/dev/null
speedctl=build/bin/speedctl
model=build/demo/tiny-llama

show() { # prints a command as one would type it
  local a out='$'
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:,=+-]+$ ]]; then out+=" $a"; else out+=" '${a//\'/\'\\\'\'}'"; fi
  done
  printf '\n%s\n' "$out"
}
step() { show "$@"; "$@"; }

step $speedctl make-tiny-model $model --layers 8 --hidden 256 --heads 8 --kv-heads 2 --ffn 704 --dtype bf16 --seed 1
step $speedctl inspect $model --prefill-layers 0.75
text='SPEED: shallow prefill, deep decode. Ünïcödé and emoji 🚀 too!'
ids=$($speedctl tokenize --model $model --text "$text")
show $speedctl tokenize --model $model --text "$text"
echo "$ids"
step $speedctl tokenize --model $model --decode "${ids// /,}"
step $speedctl tokenize --model $model --chat 'What does SPEED change?' --system 'You are concise.'

# Generation: the weights are random, so the text is gibberish; what matters is that SPEED
# (--prefill-layers below the model's 8 layers) changes the cost, not the plumbing.
prompt='Shallow prefill, deep decode: the prompt runs through the lower layers only, while every generated token runs through all of them.'
step $speedctl generate --model $model --prompt "$prompt" --max-tokens 24
step $speedctl generate --model $model --prompt "$prompt" --max-tokens 24 --prefill-layers 0.5
step $speedctl generate --model $model --chat 'What does SPEED change?' --max-tokens 8 --temperature 0.8 --seed 7 --json --top-logprobs 2
step $speedctl bench --model $model --prompt-tokens 512 --gen-tokens 16 --prefill-layers 0.75 --compare --repeat 3 --roofline-mib 256

llama3=${SPEED_TEST_DATA:-../shared/data}/tokenizers/llama3
if [ -f "$llama3/tokenizer.json" ]; then
  step $speedctl make-tiny-model build/demo/tiny-llama3-vocab --layers 2 --hidden 64 --heads 4 --kv-heads 2 --ffn 160 --tokenizer "$llama3"
  step $speedctl tokenize --model build/demo/tiny-llama3-vocab --text "$text" --json
fi
