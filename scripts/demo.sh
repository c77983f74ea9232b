#!/usr/bin/env bash
# The main job on the embedded toy corpus: train a tokenizer and a small model, score BLEU before and after, write
# the model card and curves, translate examples. Extra arguments go to scripts/train.py (see --help).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup_env.sh"
cd "$root"
python scripts/train.py \
  --toy_corpus --output_dir runs/demo --overwrite_output_dir \
  --vocab_size 400 --max_steps 1000 --warmup_steps 150 --learning_rate_scale 2 \
  --per_device_train_batch_size 64 --eval_strategy steps --eval_steps 250 --save_steps 500 --logging_steps 50 \
  --seed 0 "$@"
