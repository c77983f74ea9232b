"""Checkpoint averaging, the paper's finishing step (§6.1): "a single model obtained by averaging the last 5
checkpoints, which were written at 10-minute intervals".

`scripts/average_checkpoints.py --inputs RUN [--num_checkpoints 5] --output_dir OUT` (console script
`hf-attention-average`) averages checkpoints saved by the training job (`RUN/checkpoint-N`) or any saved
model folders of one architecture; the training job's `--average_last_n_checkpoints N` does the same as its last step.
"""

import json
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForSeq2SeqLM, HfArgumentParser, PreTrainedModel

from ..checkpoint_io_hf_attention import is_inside, replacing_folder

CHECKPOINT = re.compile(r"checkpoint-(\d+)")
# Config entries that differ between checkpoints of one model without changing what the weights mean.
NOT_ARCHITECTURE = {"transformers_version", "dtype", "torch_dtype", "_name_or_path", "custom_pipelines", "auto_map"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "source.spm", "target.spm")  # fmt: skip


class CheckpointAveragingError(ValueError):
    """Checkpoints that cannot be averaged: missing, too few, or of different architectures."""


def find_checkpoints(inputs: list[str | Path], num_checkpoints: int | None = None) -> list[Path]:
    """The checkpoint folders to average: each input is a checkpoint (or model) folder, or a run folder whose
    `checkpoint-N` folders (in older runs `checkpoints/checkpoint-N`) are taken, newest last; then the last
    `num_checkpoints`.

    Raises:
        CheckpointAveragingError: an input is missing, or fewer checkpoints exist than asked for.
    """
    found = []
    for name in map(Path, inputs):
        run = name / "checkpoints" if (name / "checkpoints").is_dir() else name
        steps = sorted((int(m.group(1)), p) for p in run.glob("checkpoint-*") if (m := CHECKPOINT.fullmatch(p.name)))
        if steps:  # a run (its final model, if any, is not one of its checkpoints)
            found += [path for _, path in steps]
        elif (name / "config.json").is_file():
            found.append(name)
        else:
            raise CheckpointAveragingError(f"--inputs {name}: neither a checkpoint folder nor a run with checkpoints.")
    if num_checkpoints is not None:
        if num_checkpoints < 1 or num_checkpoints > len(found):
            raise CheckpointAveragingError(
                f"--num_checkpoints {num_checkpoints}: there are {len(found)} checkpoints "
                f"({', '.join(p.name for p in found)}); choose 1 to {len(found)}."
            )
        found = found[-num_checkpoints:]
    return found


def _architecture(checkpoint: Path) -> dict:
    config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    return {key: value for key, value in config.items() if key not in NOT_ARCHITECTURE}


def average_state_dicts(checkpoints: list[Path], weights_file: str = "model.safetensors") -> dict[str, torch.Tensor]:
    """The element-wise mean of the checkpoints' weights (accumulated in float64, returned in each tensor's dtype),
    or of another file of weights each holds (`weights_file`: the moving averages of --ema_decay).

    Raises:
        CheckpointAveragingError: the checkpoints' configs describe different architectures, or their tensors differ.
    """
    reference = _architecture(checkpoints[0])
    for checkpoint in checkpoints[1:]:
        other = _architecture(checkpoint)
        differing = sorted(key for key in reference.keys() | other.keys() if reference.get(key) != other.get(key))
        if differing:
            key = differing[0]
            raise CheckpointAveragingError(
                f"{checkpoint} and {checkpoints[0]} are different architectures ({key}: {other.get(key)!r} vs "
                f"{reference.get(key)!r}); only checkpoints of one model can be averaged."
            )
    total, first = None, None
    for checkpoint in checkpoints:
        if not (checkpoint / weights_file).is_file():
            raise CheckpointAveragingError(f"{checkpoint} holds no {weights_file}.")
        weights = load_file(checkpoint / weights_file)
        if total is None:
            first = weights
            total = {name: tensor.to(torch.float64) for name, tensor in weights.items()}
            continue
        if weights.keys() != total.keys():
            raise CheckpointAveragingError(f"{checkpoint} holds other tensors than {checkpoints[0]}.")
        for name, tensor in weights.items():
            total[name] += tensor.to(torch.float64)
    return {name: (summed / len(checkpoints)).to(first[name].dtype) for name, summed in total.items()}


def average_into_model(
    model: PreTrainedModel, checkpoints: list[Path], weights_file: str = "model.safetensors"
) -> None:
    """Load the average of `checkpoints` (their `weights_file`) into `model` (which has their architecture), in
    place."""
    averaged = average_state_dicts(checkpoints, weights_file)
    missing = missing_weights(model, set(averaged))
    unexpected = sorted(set(averaged) - set(model.state_dict()))
    if missing or unexpected:
        raise CheckpointAveragingError(
            f"The checkpoints' tensors do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}."
        )
    model.load_state_dict(averaged, strict=False)  # strict would ask for every name of a tied tensor
    model.tie_weights()


def missing_weights(model: torch.nn.Module, present: set[str]) -> list[str]:
    """The names of `model`'s tensors that `present` lacks; a tied tensor (one storage, several names, saved once)
    counts as present when any of its names is."""
    names_by_storage: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        key = tensor.data_ptr() if tensor.numel() else id(tensor)
        names_by_storage.setdefault(key, []).append(name)
    return sorted(name for names in names_by_storage.values() if not present.intersection(names) for name in names)


def average_checkpoints(checkpoints: list[Path], output_dir: str | Path) -> PreTrainedModel:
    """Average `checkpoints` into a model saved in `output_dir` with the newest checkpoint's config, generation
    config and tokenizer; the folder appears only once complete (nothing is written if the checks fail)."""
    model = AutoModelForSeq2SeqLM.from_pretrained(checkpoints[-1])
    average_into_model(model, checkpoints)
    with replacing_folder(output_dir, carry_over=False) as staging:
        model.save_pretrained(staging)
        for name in TOKENIZER_FILES:
            if (checkpoints[-1] / name).is_file():
                shutil.copy2(checkpoints[-1] / name, staging / name)
        (staging / "averaged_checkpoints.json").write_text(json.dumps([str(p) for p in checkpoints], indent=2) + "\n")
    return model


@dataclass
class AveragingArguments:
    inputs: list[str] = field(
        metadata={"help": "Checkpoint folders, or a run folder whose checkpoint-N folders are taken in order."}
    )
    output_dir: str = field(metadata={"help": "Folder for the averaged model (created or replaced when complete)."})
    num_checkpoints: int | None = field(
        default=None, metadata={"help": "Average only the last N checkpoints (the paper: 5); default all."}
    )
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace what output_dir already holds."})


def main(argv: list[str] | None = None) -> None:
    """`average_checkpoints.py --inputs RUN_OR_CHECKPOINT... [--num_checkpoints N] --output_dir OUT`."""
    (args,) = HfArgumentParser(AveragingArguments, description=__doc__.splitlines()[0]).parse_args_into_dataclasses(
        args=argv
    )
    output_dir = Path(args.output_dir)
    try:
        if output_dir.is_dir() and any(output_dir.iterdir()) and not args.overwrite_output_dir:
            raise CheckpointAveragingError(
                f"--output_dir {output_dir} holds files; pass --overwrite_output_dir to replace them."
            )
        for name in args.inputs:
            if is_inside(name, output_dir):
                raise CheckpointAveragingError(
                    f"--output_dir {output_dir} holds --inputs {name}: replacing it would delete the checkpoints "
                    "being averaged; choose another output folder."
                )
        checkpoints = find_checkpoints(args.inputs, args.num_checkpoints)
        average_checkpoints(checkpoints, output_dir)
    except (CheckpointAveragingError, OSError) as error:
        sys.exit(f"error: {error}")
    print(f"averaged {len(checkpoints)} checkpoints ({', '.join(p.name for p in checkpoints)}) into {output_dir}")
