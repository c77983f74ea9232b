"""Token-based batching (`--max_tokens`): bounded padded batches, every pair once per epoch, different on each
process, deterministic for a seed, the same batches after a resume, and the padding they save."""

import numpy as np
import pytest
from transformers import TrainerCallback

from hf_attention.data.batching import TokenBatchSampler, padded_tokens
from hf_attention.training.arguments import parse_arguments
from hf_attention.training.job import main, run

rng = np.random.default_rng(0)
SOURCE = rng.integers(2, 40, size=500).tolist()
TARGET = (np.asarray(SOURCE) + rng.integers(-3, 8, size=500)).clip(2).tolist()


def test_batches_hold_at_most_max_tokens_and_every_pair_once_per_epoch():
    sampler = TokenBatchSampler(SOURCE, TARGET, max_tokens=300, seed=1)
    batches = list(sampler)
    for batch in batches:
        assert padded_tokens([SOURCE[i] for i in batch], [TARGET[i] for i in batch]) <= 300
    assert sorted(i for batch in batches for i in batch) == list(range(500)) and len(sampler) == len(batches)
    fill = np.mean([padded_tokens([SOURCE[i] for i in b], [TARGET[i] for i in b]) for b in batches]) / 300
    assert fill > 0.8  # length buckets: batches come close to the budget
    longest = [max(max(SOURCE[i], TARGET[i]) for i in batch) for batch in batches]
    assert longest != sorted(longest) and longest != sorted(longest, reverse=True)  # buckets are shuffled


def test_batches_depend_only_on_the_seed_and_the_epoch():
    first, again = TokenBatchSampler(SOURCE, TARGET, 300, seed=1), TokenBatchSampler(SOURCE, TARGET, 300, seed=1)
    assert list(first) == list(again)
    assert list(first) != list(TokenBatchSampler(SOURCE, TARGET, 300, seed=2))
    epoch_0 = list(first)
    first.set_epoch(1)
    assert list(first) != epoch_0
    first.set_epoch(0)
    assert list(first) == epoch_0


def test_each_process_gets_its_own_batches_and_the_same_number_of_them():
    whole = TokenBatchSampler(SOURCE, TARGET, 300, seed=4, num_replicas=3, rank=0).all_batches()
    shards = [list(TokenBatchSampler(SOURCE, TARGET, 300, seed=4, num_replicas=3, rank=rank)) for rank in range(3)]
    assert len({len(shard) for shard in shards}) == 1
    assert [batch for batches in zip(*shards, strict=True) for batch in batches] == whole
    assert sorted({i for shard in shards for batch in shard for i in batch}) == list(range(500))


def test_a_pair_longer_than_max_tokens_is_refused():
    with pytest.raises(ValueError, match="--max_tokens 30: the longest kept pair has"):
        TokenBatchSampler(SOURCE, TARGET, max_tokens=30)


RUN = ["--toy_corpus", "--toy_train_size", "200", "--toy_eval_size", "4", "--vocab_size", "120",
       "--generation_max_length", "8", "--generation_num_beams", "1", "--warmup_steps", "2", "--logging_steps", "1",
       "--test_before_training", "false", "--seed", "5"]  # fmt: skip


def test_a_resumed_run_sees_the_batches_of_an_uninterrupted_run(tmp_path, recorded_batches):
    """Six steps of about a fifth of an epoch each: the resumed run starts in epoch two."""
    arguments = [*RUN, "--max_tokens", "700", "--max_steps", "6", "--save_steps", "4", "--eval_strategy", "no"]
    run(*parse_arguments([*arguments, "--output_dir", str(tmp_path / "whole")]))
    uninterrupted = recorded_batches[:6]  # accelerate's loader collates one batch ahead: a 7th may follow
    for batch in uninterrupted:
        assert len(batch) * len(batch[0]) <= 700
    recorded_batches.clear()
    checkpoint = tmp_path / "whole" / "checkpoint-4"
    run(*parse_arguments([*arguments, "--output_dir", str(tmp_path / "resumed"),
                          "--resume_from_checkpoint", str(checkpoint)]))  # fmt: skip
    assert recorded_batches[:2] == uninterrupted[4:]


class LogRecorder(TrainerCallback):
    def __init__(self):
        self.history = []

    def on_train_end(self, args, state, control, **kwargs):
        self.history = list(state.log_history)


def test_padding_fraction_is_logged_and_token_batches_pad_less(tmp_path):
    fractions = {}
    for name, batching in (
        ("sentences", ["--per_device_train_batch_size", "32"]),
        ("tokens", ["--max_tokens", "400"]),
    ):
        recorder = LogRecorder()
        arguments = [
            *RUN,
            *batching,
            "--max_steps",
            "8",
            "--save_strategy",
            "no",
            "--output_dir",
            str(tmp_path / name),
        ]
        assert run(*parse_arguments(arguments), callbacks=[recorder]).steps == 8
        logged = [entry["padding_fraction"] for entry in recorder.history if "padding_fraction" in entry]
        assert len(logged) >= 6 and all(0 <= fraction < 1 for fraction in logged)
        fractions[name] = np.mean(logged)
    assert fractions["tokens"] < fractions["sentences"]


def test_max_tokens_below_the_longest_pair_stops_the_run_before_it_writes(tmp_path):
    with pytest.raises(SystemExit, match="--max_tokens 4: the longest kept training pair has .* tokens"):
        main([*RUN, "--max_tokens", "4", "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
