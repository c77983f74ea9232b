"""Saves a new model (gelu) over FOLDER and SIGKILLs its own process at POINT of the save.

Used by tests/test_reliability.py: `python tests/killed_during_save.py FOLDER POINT`, POINT one of
config (config.json written, no weights yet), weights (half of model.safetensors written), before_swap (every file
written, not yet in place), after_swap (in place, the old contents not yet deleted).
"""

import os
import signal
import sys

import transformers.modeling_utils

from hf_attention import HfAttentionConfig, HfAttentionForConditionalGeneration, checkpoint_io_hf_attention


def die(*args, **kwargs) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def then_die(function):
    def wrapper(*args, **kwargs):
        function(*args, **kwargs)
        die()

    return wrapper


def write_half_then_die(tensors, filename, metadata=None):
    save_file(tensors, filename, metadata=metadata)
    os.truncate(filename, os.path.getsize(filename) // 2)
    die()


if __name__ == "__main__":
    folder, point = sys.argv[1], sys.argv[2]
    save_file = transformers.modeling_utils.safe_save_file
    if point == "config":
        HfAttentionConfig.save_pretrained = then_die(HfAttentionConfig.save_pretrained)
    elif point == "weights":
        transformers.modeling_utils.safe_save_file = write_half_then_die
    elif point == "before_swap":
        checkpoint_io_hf_attention.swap_into_place = die
    elif point == "after_swap":
        checkpoint_io_hf_attention.swap_into_place = then_die(checkpoint_io_hf_attention.swap_into_place)
    else:
        sys.exit(f"unknown point {point!r}")
    config = HfAttentionConfig.from_preset("tiny", vocab_size=100, activation_function="gelu")
    HfAttentionForConditionalGeneration(config).save_pretrained(folder)
    sys.exit("the save finished: the kill point was never reached")
