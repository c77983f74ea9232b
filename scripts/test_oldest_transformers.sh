#!/usr/bin/env bash
# The tests that lean on transformers' internals (generate()'s hooks and custom_generate, the Trainer's checkpoint
# hooks, loading, the pipelines, transformers' own common model tests) against the oldest transformers the package
# allows (pyproject's lower bound), in .venv-oldest; scripts/test.sh runs them against the newest. Extra arguments
# go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
oldest="$(sed -n 's/.*"transformers>=\([0-9.]*\),.*/\1/p' pyproject.toml)"
venv="$root/.venv-oldest"
stamp="$venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "setting up $venv with transformers $oldest (first run takes a few minutes)..."
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet "torch==2.13.0"
  "$venv/bin/python" -m pip install --quiet -e "$root[test]" "transformers==$oldest"
  rm -f "$venv"/.installed-* && touch "$stamp"
fi
"$venv/bin/python" -c "import transformers; print('against the oldest supported transformers:', transformers.__version__)"
"$venv/bin/python" -m pytest "$@" tests/test_generation.py tests/test_constraints.py tests/test_ensemble.py \
  tests/test_pipelines.py tests/test_transformers_common.py tests/test_reliability.py tests/test_modeling.py \
  tests/test_checkpoint_averaging.py tests/test_inference.py tests/test_translate.py tests/test_transformers_internals.py
