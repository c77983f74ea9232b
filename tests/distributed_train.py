"""Runs the training job (any launcher) and saves every process's final parameters as rank{N}.safetensors, and
what preprocessing work the process did (tokenizer trainings, `map` results written) as work{N}.json.

Used by the tests: `accelerate launch ... tests/distributed_train.py OUTPUT_DIR [train.py arguments]`.
"""

import json
import os
import sys
from pathlib import Path

from datasets import arrow_dataset
from safetensors.torch import save_file
from transformers import TrainerCallback

from hf_attention import run_translation
from hf_attention.run_translation import parse_arguments, run

WORK = {"tokenizer_trainings": 0, "map_results_written": 0}


class CountingWriter(arrow_dataset.ArrowWriter):  # `Dataset.map` writes what it computes through one
    def __init__(self, *args, **kwargs):
        WORK["map_results_written"] += 1
        super().__init__(*args, **kwargs)


def counting_train_tokenizer(*args, **kwargs):
    WORK["tokenizer_trainings"] += 1
    return train_tokenizer(*args, **kwargs)


class SaveParametersOnEveryRank(TrainerCallback):
    def __init__(self, folder: Path):
        self.folder = folder

    def on_train_end(self, args, state, control, model=None, **kwargs):
        parameters = {name: tensor.detach().cpu().clone() for name, tensor in model.state_dict().items()}
        self.folder.mkdir(parents=True, exist_ok=True)
        save_file(parameters, self.folder / f"rank{args.process_index}.safetensors")
        (self.folder / f"work{args.process_index}.json").write_text(json.dumps(WORK))


if __name__ == "__main__":
    train_tokenizer = run_translation.train_tokenizer
    run_translation.train_tokenizer = counting_train_tokenizer
    arrow_dataset.ArrowWriter = CountingWriter
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    run(*parse_arguments(sys.argv[2:]), callbacks=[SaveParametersOnEveryRank(Path(sys.argv[1]))])
