"""Training: the job's flags (`arguments`), the data a run reads (`prepare`), the trainer whose checkpoints appear only
once complete (`trainer`), the job itself (`job`: `hf-attention-train`, `scripts/train.py`), run folders and
checkpoint averaging."""

from .arguments import PaperTrainingArguments, paper_learning_rate
from .checkpoint_averaging import average_checkpoints
from .job import main, run
from .trainer import CheckpointSafeSeq2SeqTrainer

__all__ = ["CheckpointSafeSeq2SeqTrainer", "PaperTrainingArguments", "average_checkpoints", "main",
           "paper_learning_rate", "run"]  # fmt: skip


def __getattr__(name: str):
    """The names of the former `hf_attention.training` module (the trainer and the paper's arguments)."""
    from . import arguments, trainer

    for module in (trainer, arguments):
        if hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
