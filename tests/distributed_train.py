"""Runs the training job (any launcher) and saves every process's final parameters as rank{N}.safetensors.

Used by tests/test_train.py: `accelerate launch ... tests/distributed_train.py PARAMS_DIR [train.py arguments]`.
"""

import sys
from pathlib import Path

from safetensors.torch import save_file
from transformers import TrainerCallback

from hf_attention.run_translation import parse_arguments, run


class SaveParametersOnEveryRank(TrainerCallback):
    def __init__(self, folder: Path):
        self.folder = folder

    def on_train_end(self, args, state, control, model=None, **kwargs):
        parameters = {name: tensor.detach().cpu().clone() for name, tensor in model.state_dict().items()}
        self.folder.mkdir(parents=True, exist_ok=True)
        save_file(parameters, self.folder / f"rank{args.process_index}.safetensors")


if __name__ == "__main__":
    run(*parse_arguments(sys.argv[2:]), callbacks=[SaveParametersOnEveryRank(Path(sys.argv[1]))])
