#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one go (CI has none): the `gpu`-marked tests (bf16 and SDPA against eager,
# generation on the GPU equal to the CPU's, decoding steps that never wait for the GPU, compiled static-cache decoding
# with CUDA graphs, the training job in bf16, the translate command), then scripts/benchmark_generate.py on CUDA.
#   bash scripts/gpu_checks.sh [OUTPUT_DIR]      # logs and the benchmark's JSON go to OUTPUT_DIR (runs/gpu-checks)
# PYTHON picks the interpreter (default: python); TESTS_TIMEOUT / BENCHMARK_TIMEOUT bound each part (seconds).
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
out="${1:-runs/gpu-checks}"
python="${PYTHON:-python}"
mkdir -p "$out"
"$python" -c "import torch, transformers; assert torch.cuda.is_available(), 'no CUDA device'; \
print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'transformers', transformers.__version__)" || exit 1
status=0
timeout "${TESTS_TIMEOUT:-420}" "$python" -m pytest -m gpu tests/test_gpu.py -v -p no:cacheprovider 2>&1 \
  | tee "$out/gpu-tests.log" || status=1
timeout "${BENCHMARK_TIMEOUT:-420}" "$python" scripts/benchmark_generate.py --device cuda \
  --engines marian,fp32,bf16,bf16+compile --rounds 2 --json "$out/benchmark-cuda.json" 2>&1 \
  | tee "$out/benchmark-cuda.log" || status=1
exit $status
