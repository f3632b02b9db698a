#!/usr/bin/env bash
# Train the demo NLA for the bundled SmolLM2-135M-Instruct end to end, then publish it into checkpoints/.
# Every step is resumable: rerun this script after a stop and it continues where it was (stages pass --resume
# when their run directory already holds a checkpoint). Hours on a 2-core CPU; minutes on a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
T="$PY -m talkative.cli"

# Debian corpora (no-op when present).
if ! [ -f /usr/share/dictd/gcide.dict.dz ] || ! [ -d /usr/share/doc/python3.11/html/_sources ] || ! [ -d /usr/share/games/fortunes ]; then
  SUDO=$( [ "$(id -u)" = 0 ] || echo sudo )
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dict-gcide python3.11-doc fortunes
fi

$T train chats --out data/chats.jsonl
$T train data --config configs/data-smollm2-l12.yaml --out data/smollm2-l12-main
$T train data --config configs/data-smollm2-l12-chats.yaml --out data/smollm2-l12-chats

stage() {  # stage NAME: run or resume one stage
  local name=$1 out
  out=$(grep '^out:' "configs/train-$name.yaml" | awk '{print $2}')
  if [ -f "$out/checkpoint/state.pt" ]; then
    $T train "$name" --config "configs/train-$name.yaml" --resume
  else
    $T train "$name" --config "configs/train-$name.yaml"
  fi
}
stage ar-sft
stage av-sft
stage grpo

$PY scripts/publish_demo.py runs/demo/grpo
