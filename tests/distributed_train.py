"""Runs the training job (any launcher) and saves every process's final parameters as rank{N}.safetensors, and
what preprocessing work the process did (tokenizer trainings, `map` results written), how its model was sharded and
the steps at which its epochs ended as work{N}.json.

Used by the tests: `accelerate launch ... tests/distributed_train.py OUTPUT_DIR [train.py arguments]`.

With HF_ATTENTION_FSDP_ON_CPU=1, an `accelerate launch --use_fsdp` run shards the model on CPU processes (gloo).
accelerate turns FSDP on only for GPU-like devices, though torch's `fully_shard` runs on CPU too; the switch below
makes accelerate treat a CPU run as it would a GPU one, so the job's FSDP path (Trainer, accelerate, torch) runs
unchanged on a machine without GPUs.
"""

import json
import os
import sys
from pathlib import Path

import torch.distributed
from accelerate import state
from accelerate.utils import DistributedType
from datasets import arrow_dataset
from safetensors.torch import save_file
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from transformers import TrainerCallback

from hf_attention.training import prepare
from hf_attention.training.arguments import parse_arguments
from hf_attention.training.job import run

WORK = {"tokenizer_trainings": 0, "map_results_written": 0, "epoch_end_steps": []}


def fsdp_on_cpu_processes():
    accelerator_state_init = state.AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        accelerator_state_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        # Each `AcceleratorState()` copies the process state (MULTI_CPU) in again: switch back every time.
        fsdp_plugin = fsdp_plugin or self.__dict__.get("fsdp_plugin")
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, fsdp_plugin

    state.AcceleratorState.__init__ = init


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

    def on_epoch_end(self, args, state, control, **kwargs):
        WORK["epoch_end_steps"].append(state.global_step)  # where each process's epochs end: the same, or out of step

    def on_train_end(self, args, state, control, model=None, **kwargs):
        WORK["sharded_modules"] = sorted({type(m).__name__ for m in model.modules() if isinstance(m, FSDPModule)})
        WORK["local_parameters"] = sum(
            (p.to_local() if isinstance(p, DTensor) else p).numel() for p in model.parameters()
        )
        parameters = {  # a sharded parameter is gathered whole (every process takes part)
            name: (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().cpu().clone()
            for name, tensor in model.state_dict().items()
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        save_file(parameters, self.folder / f"rank{args.process_index}.safetensors")
        (self.folder / f"work{args.process_index}.json").write_text(json.dumps(WORK))


def clock_ahead_on_the_second_process(seconds: float) -> None:
    """The second process's wall clock reads `seconds` more than the main process's: its --max_train_minutes would
    run out that much earlier, were it its own clock that decided."""
    from hf_attention.training.trainer import WallClockCallback

    on_train_begin = WallClockCallback.on_train_begin

    def ahead(self, args, state, control, **kwargs):
        on_train_begin(self, args, state, control, **kwargs)
        if args.process_index == 1:
            self.started -= seconds

    WallClockCallback.on_train_begin = ahead


def record_the_last_collective_before_leaving(folder: Path) -> None:
    """Writes left{N}.json as the process leaves its process group: the collective it called last before leaving
    (a barrier, so that gloo's workers are idle when the group is torn down; see `job.run`)."""
    last = {"collective": None}

    def recording(name: str, collective):
        def recorded(*args, **kwargs):
            last["collective"] = name
            return collective(*args, **kwargs)

        return recorded

    for name in ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast",
                 "broadcast_object_list", "barrier", "reduce_scatter_tensor"):  # fmt: skip
        setattr(torch.distributed, name, recording(name, getattr(torch.distributed, name)))
    destroy_process_group = torch.distributed.destroy_process_group

    def leave(*args, **kwargs):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"left{torch.distributed.get_rank()}.json").write_text(json.dumps(last))
        destroy_process_group(*args, **kwargs)

    torch.distributed.destroy_process_group = leave


if __name__ == "__main__":
    record_the_last_collective_before_leaving(Path(sys.argv[1]))
    if os.environ.get("HF_ATTENTION_FSDP_ON_CPU") == "1":
        fsdp_on_cpu_processes()
    if os.environ.get("HF_ATTENTION_SECOND_CLOCK_AHEAD"):
        clock_ahead_on_the_second_process(float(os.environ["HF_ATTENTION_SECOND_CLOCK_AHEAD"]))
    train_tokenizer = prepare.train_tokenizer
    prepare.train_tokenizer = counting_train_tokenizer
    arrow_dataset.ArrowWriter = CountingWriter
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    run(*parse_arguments(sys.argv[2:]), callbacks=[SaveParametersOnEveryRank(Path(sys.argv[1]))])
