#!/usr/bin/env bash
# Multi30k En->De in under an hour on 2 CPU cores: the recipe of docs/multi30k.md (tokenizer, training, checkpoint
# averaging and beam-4 scoring of test_2016_flickr included). Usage: bash scripts/recipes/multi30k_en_de.sh
# [DATA_DIR (default ../shared/data/multi30k)] [OUTPUT_DIR (default runs/multi30k-en-de)] [extra train.py flags...]
# Precision follows the machine (--precision auto): bf16 where the CPU computes it (AVX512-BF16, AMX), else fp32.
# Training stops after 57 minutes (--max_train_minutes, tokenizer and data included), so that averaging and the final
# scoring end within the hour on any CPU: a faster machine trains more steps. A later flag wins.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
source "$root/scripts/setup_env.sh"
data="${1:-$root/../shared/data/multi30k}"
output="${2:-$root/runs/multi30k-en-de}"
shift $(( $# < 2 ? $# : 2 ))
python "$root/scripts/train.py" \
  --train_file "$data/train" --validation_file "$data/val" --test_file "$data/test_2016_flickr" \
  --source_lang en --target_lang de --output_dir "$output" \
  --vocab_size 8000 --preset tiny \
  --config_overrides "d_model=128,encoder_layers=4,decoder_layers=4,encoder_attention_heads=4,decoder_attention_heads=4,encoder_ffn_dim=256,decoder_ffn_dim=256,dropout=0.3,max_position_embeddings=512,normalize_before=true" \
  --max_steps 100000 --max_train_minutes 57 --warmup_steps 2000 --learning_rate 5e-3 --max_tokens 4096 \
  --test_before_training false \
  --precision auto --logging_steps 100 --eval_strategy steps --eval_steps 1000 --max_eval_samples 200 \
  --per_device_eval_batch_size 64 --save_steps 250 --save_total_limit 5 --average_last_n_checkpoints 5 --seed 0 "$@"
