#!/usr/bin/env bash
# The main job on the embedded toy corpus: train, save, reload, translate. Extra arguments go to scripts/demo.py.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup_env.sh"
cd "$root"
python scripts/demo.py --overwrite_output_dir "$@"
