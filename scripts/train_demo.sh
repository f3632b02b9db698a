#!/usr/bin/env bash
# Train a demo NLA for the bundled SmolLM2-135M-Instruct end to end, then publish it into checkpoints/.
#
#   scripts/train_demo.sh        the second demo (v2): modern text written by the subject, explanations in the
#                                checkable sentence language (docs/demo-model.md), published to
#                                checkpoints/smollm2-135m-l12-v2
#   scripts/train_demo.sh v1     the first demo (8 tokens of raw context), published to checkpoints/smollm2-135m-l12
#
# Every step is resumable: rerun this script after a stop and it continues where it was (the corpus generation
# skips documents already written, extraction skips finished chunks, stages pass --resume when their run directory
# holds a checkpoint and are skipped when it holds their last step, publication is skipped when its reports exist).
# Hours on a 2-core CPU; minutes on a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
T="$PY -m talkative.cli"
VERSION=${1:-v2}

# Debian corpora (no-op when present).
if ! [ -f /usr/share/dictd/gcide.dict.dz ] || ! [ -d /usr/share/doc/python3.11/html/_sources ] || ! [ -d /usr/share/games/fortunes ]; then
  SUDO=$( [ "$(id -u)" = 0 ] || echo sudo )
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dict-gcide python3.11-doc fortunes
fi

data() {  # data CONFIG OUT: extract (resumes by chunk; a finished dataset has its dataset.json)
  [ -f "$2/dataset.json" ] || $T train data --config "$1" --out "$2"
}

stage() {  # stage NAME CONFIG: run, resume, or skip a finished stage
  local name=$1 config=$2 out steps
  out=$(grep '^out:' "$config" | awk '{print $2}')
  steps=$(grep '^steps:' "$config" | awk '{print $2}')
  if [ -f "$out/checkpoint/state.pt" ]; then
    if $PY -c "import sys, torch; sys.exit(torch.load('$out/checkpoint/state.pt', weights_only=True)['step'] < $steps)"; then
      echo "$name: done ($steps steps)"
      return
    fi
    $T train "$name" --config "$config" --resume
  else
    $T train "$name" --config "$config"
  fi
}

if [ "$VERSION" = v1 ]; then
  $T train chats --out data/chats.jsonl
  data configs/data-smollm2-l12.yaml data/smollm2-l12-main
  data configs/data-smollm2-l12-chats.yaml data/smollm2-l12-chats
  stage ar-sft configs/train-ar-sft.yaml
  stage av-sft configs/train-av-sft.yaml
  stage grpo configs/train-grpo.yaml
  # the first demo's own page; docs/demo-model.md is the page of both demos now
  $PY scripts/publish_demo.py runs/demo/grpo --out checkpoints/smollm2-135m-l12 --doc docs/demo-model-v1.md
  exit 0
fi

$T train modern --out data/modern.jsonl --batch 32
data configs/data-smollm2-l12-modern.yaml data/smollm2-l12-modern
data configs/data-smollm2-l12-main-v2.yaml data/smollm2-l12-main-v2
stage ar-sft configs/train-ar-sft-v2.yaml
stage av-sft configs/train-av-sft-v2.yaml
stage grpo configs/train-grpo-v2.yaml
stage grpo configs/train-grpo-claims-v2.yaml
# which contents carry the activation, on the full datasets (the measurement that chose the explanation form was
# made on a first sample of the corpus; docs/demo-model.md): after training, which does not depend on it
[ -f docs/figures/explanation-contents.json ] || $PY scripts/explanation_contents.py \
  --data data/smollm2-l12-modern data/smollm2-l12-main-v2 --out docs/figures/explanation-contents.json
$PY scripts/publish_demo.py runs/demo-v2/grpo-claims --out checkpoints/smollm2-135m-l12-v2 --skip-done --grammar sentence --make-default \
  --heldout data/smollm2-l12-modern/heldout data/smollm2-l12-main-v2/heldout -n 256 --kl-samples 64
