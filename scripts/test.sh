#!/usr/bin/env bash
# Lint, build the docs site strictly, then the test suite (CPU; slow and GPU tests deselected). Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup_env.sh"
cd "$root"
ruff check .
ruff format --check .
site="$(mktemp -d -t hf_attention-site-XXXXXX)" && trap 'rm -rf "$site"' EXIT
NO_MKDOCS_2_WARNING=1 mkdocs build --strict --quiet --site-dir "$site"  # a broken link or docstring fails the run
status=0
python -m pytest "$@" || status=$?
if [ "$status" -eq 5 ]; then
  echo "error: pytest collected no tests" >&2
fi
exit "$status"
