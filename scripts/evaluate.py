"""Score a saved model on a parallel test set with BLEU and chrF (sacreBLEU) and write a JSON report (see --help)."""

import sys
from pathlib import Path

# Python puts this folder first on sys.path, where scripts/evaluate.py would shadow the `evaluate` library.
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]

from hf_attention.evaluation import main  # noqa: E402

if __name__ == "__main__":
    main()
