"""Runs the training job and SIGKILLs its own process at POINT.

Used by tests/test_reliability.py: `python tests/killed_during_training.py POINT [train.py arguments]`, POINT one of
step:N (after optimizer step N, between checkpoints), checkpoint:N (during the N-th checkpoint save, some files
written), final_save (the final model written, the card not yet).
"""

import os
import signal
import sys

from transformers import TrainerCallback

from hf_attention.training import job as run_translation
from hf_attention.training.arguments import parse_arguments
from hf_attention.training.job import run
from hf_attention.training.trainer import CheckpointSafeSeq2SeqTrainer


def die(*args, **kwargs) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class DieAfterStep(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            die()


def die_on_call(function, number: int):
    calls = []

    def count_then_maybe_die(*args, **kwargs):
        calls.append(1)
        if len(calls) == number:
            die()
        return function(*args, **kwargs)

    return count_then_maybe_die


if __name__ == "__main__":
    point, arguments = sys.argv[1], sys.argv[2:]
    callbacks = []
    kind, _, number = point.partition(":")
    if kind == "step":
        callbacks.append(DieAfterStep(int(number)))
    elif kind == "checkpoint":  # the RNG state is written after the weights and the optimizer
        trainer = CheckpointSafeSeq2SeqTrainer
        trainer._save_rng_state = die_on_call(trainer._save_rng_state, int(number))
    elif kind == "final_save":
        run_translation.write_model_card = die
    else:
        sys.exit(f"unknown point {point!r}")
    run(*parse_arguments(arguments), callbacks=callbacks)
    sys.exit("the run finished: the kill point was never reached")
