#!/usr/bin/env bash
# The inference and training tests as an AVX2-only CPU runs them, on any x86 CPU: PyTorch's, oneDNN's, MKL's, fbgemm's
# and CTranslate2's kernels limited to AVX2, and hf_attention's capability map masked to AVX2 (hf_attention.hardware), so
# every choice (precision, int8 kernel, compile) is the one an AVX2 machine makes. Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup_env.sh"
cd "$root"
export ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 CT2_FORCE_CPU_ISA=AVX2
export FBGEMM_ENABLE_INSTRUCTIONS=AVX2  # torch's int8 kernels (fbgemm) choose their own instructions otherwise
export HF_ATTENTION_CPU_CAPABILITY=avx2
# inductor's cache of compiled steps does not tell AVX2 from AVX-512 builds: a step compiled unmasked and reused
# masked crashed (segmentation fault, torch 2.13). The masked run compiles into a cache of its own.
TORCHINDUCTOR_CACHE_DIR="$(mktemp -d -t hf_attention-inductor-avx2-XXXXXX)"
export TORCHINDUCTOR_CACHE_DIR
trap 'rm -rf "$TORCHINDUCTOR_CACHE_DIR"' EXIT
python -c "from hf_attention import hardware; print('as an AVX2 machine:', hardware.describe())"
python -m pytest "$@" tests/test_hardware.py tests/test_inference.py tests/test_generation.py tests/test_translate.py \
  tests/test_train.py tests/test_training_speed_options.py tests/test_benchmark_generate.py
