#!/usr/bin/env bash
# Creates .venv (CPU torch 2.13.0 first, then the package with its test and docs extras) unless it is already up to date.
# Sourced by scripts/demo.sh and scripts/test.sh; leaves the venv activated.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.installed-$(sha256sum "$root/pyproject.toml" | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "setting up $venv (first run takes a few minutes)..."
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet "torch==2.13.0"
  "$venv/bin/python" -m pip install --quiet -e "$root[test,docs]"
  rm -f "$venv"/.installed-* && touch "$stamp"
fi
# shellcheck disable=SC1091
source "$venv/bin/activate"
