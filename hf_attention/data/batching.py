"""Token-based batches (fairseq's `--max-tokens`, OpenNMT-py's `batch_type: tokens`) and the padding they save.

The paper trains on batches of about 25,000 source and 25,000 target tokens (§5.1), not a number of sentences: a
batch of short sentences then holds more of them, and a batch of long ones fewer, so that every step does about the
same work and little of it is padding.
"""

import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import pyarrow.compute as pc
import torch
from datasets import Dataset
from torch.utils.data import IterableDataset, Sampler
from transformers import TrainerCallback


def token_lengths(dataset: Dataset, column: str) -> np.ndarray:
    """The length of every row's `column` (a list of ids), read from the Arrow data without building Python lists."""
    return pc.list_value_length(dataset.with_format("arrow")[column]).to_numpy()


def padded_tokens(source_lengths: Sequence[int], target_lengths: Sequence[int]) -> int:
    """Tokens of one padded batch on its longer side: rows × the longest row (what `--max_tokens` bounds)."""
    return len(source_lengths) * max(max(source_lengths), max(target_lengths))


def cut_into_batches(
    longer_side: Sequence[int] | np.ndarray,
    max_tokens: int | None,
    generator: np.random.Generator | None = None,
    max_rows: int | None = None,
    longest_first: bool = False,
) -> list[list[int]]:
    """Indices of `longer_side` (each pair's longer side, in tokens) in batches of at most `max_tokens` padded tokens
    and at most `max_rows` rows: shuffled (when a `generator` is given, so that it breaks ties between equal lengths),
    sorted by length (`longest_first` for translating, so that the slowest batch shows first), cut greedily, and the
    batches shuffled when there is a generator, so that neighbouring training steps see different lengths. A pair
    longer than `max_tokens` goes alone. The one batch cutter of the package: training's token batches and
    `translate.py`'s batches both come from here."""
    longer_side = np.asarray(longer_side)
    order = generator.permutation(len(longer_side)) if generator is not None else np.arange(len(longer_side))
    order = order[np.argsort(-longer_side[order] if longest_first else longer_side[order], kind="stable")]
    batches, current, longest = [], [], 0
    for index in order.tolist():
        length = int(longer_side[index])
        too_many_tokens = max_tokens is not None and max(longest, length) * (len(current) + 1) > max_tokens
        if current and (too_many_tokens or (max_rows is not None and len(current) >= max_rows)):
            batches.append(current)
            current, longest = [], 0
        current.append(index)
        longest = max(longest, length)
    if current:
        batches.append(current)
    if generator is not None:
        batches = [batches[position] for position in generator.permutation(len(batches))]
    return batches


class TokenBatchSampler(Sampler[list[int]]):
    """Batches of at most `max_tokens` tokens on either side, padding included, from length-sorted pairs.

    Each epoch, the pairs are shuffled, sorted by length (the shuffle breaks ties), and cut into batches greedily;
    the batches are then shuffled, so that neighbouring steps see different lengths. Under data parallelism each
    process takes every `num_replicas`-th batch (starting at its `rank`), and every process gets the same number
    of batches. The order depends only on `seed` and the epoch (`set_epoch`), so a resumed run sees the batches an
    uninterrupted run would.

    Args:
        source_lengths, target_lengths: tokens of each pair's source and target (`</s>` included).
        max_tokens: most tokens of a padded batch on its source side and on its target side.
        seed: the shuffles' seed; the same on every process.
        num_replicas, rank: data-parallel processes, and this one's index.

    Raises:
        ValueError: a pair longer than `max_tokens` (it fits in no batch).
    """

    def __init__(
        self,
        source_lengths: Sequence[int],
        target_lengths: Sequence[int],
        max_tokens: int,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
    ):
        self.source_lengths = np.asarray(source_lengths, dtype=np.int64)
        self.target_lengths = np.asarray(target_lengths, dtype=np.int64)
        longest = int(np.maximum(self.source_lengths, self.target_lengths).max(initial=0))
        if longest > max_tokens:
            raise ValueError(f"--max_tokens {max_tokens}: the longest kept pair has {longest} tokens on one side.")
        self.max_tokens, self.seed, self.shuffle = max_tokens, seed, shuffle
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0
        self._cache: tuple[int, list[list[int]]] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def all_batches(self) -> list[list[int]]:
        """This epoch's batches of every process, in order (process r takes items r, r + N, ...)."""
        if self._cache is not None and self._cache[0] == self.epoch:
            return self._cache[1]
        generator = np.random.default_rng([self.seed, self.epoch]) if self.shuffle else None
        batches = cut_into_batches(np.maximum(self.source_lengths, self.target_lengths), self.max_tokens, generator)
        if len(batches) % self.num_replicas:  # every process takes the same number of steps
            batches += batches[: self.num_replicas - len(batches) % self.num_replicas]
        self._cache = (self.epoch, batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.all_batches()[self.rank :: self.num_replicas]

    def __len__(self) -> int:
        return math.ceil(len(self.all_batches()) / self.num_replicas)


class TokenBatchStream(IterableDataset):
    """`--max_tokens` for a stream (`--streaming`): token batches cut from pools of `pool_size` pairs at a time.

    A stream's lengths are not known ahead, so, as OpenNMT-py does with its pools and fairseq with buffered
    iterators, each pool of pairs read is sorted by length and cut into batches (`cut_into_batches`), which are
    yielded in a shuffled order. Each item is one batch: a list of tokenised pairs, for the data collator. The order
    depends only on the stream, `seed` and the epoch, so a resumed run that skips the batches it did sees the batches
    an uninterrupted run would. Under data parallelism each process batches its own part of the stream.

    Args:
        stream: tokenised pairs (`input_ids`, `labels`), each side at most `max_tokens` tokens long.
        max_tokens: most tokens of a padded batch on its source side and on its target side.
        pool_size: pairs sorted together (`--shuffle_buffer_size`).
        seed: the shuffles' seed.
    """

    def __init__(self, stream, max_tokens: int, pool_size: int, seed: int = 0):
        self.stream, self.max_tokens, self.pool_size, self.seed = stream, max_tokens, pool_size, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.stream, "set_epoch"):
            self.stream.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[dict]]:
        generator = np.random.default_rng([self.seed, self.epoch])
        pool = []
        for pair in self.stream:
            pool.append(pair)
            if len(pool) == self.pool_size:
                yield from self._batches(pool, generator)
                pool = []
        if pool:
            yield from self._batches(pool, generator)

    def _batches(self, pool: list[dict], generator: np.random.Generator) -> Iterator[list[dict]]:
        longer_side = np.array([max(len(pair["input_ids"]), len(pair["labels"])) for pair in pool])
        longest = int(longer_side.max())
        if longest > self.max_tokens:
            raise ValueError(f"--max_tokens {self.max_tokens}: a streamed pair has {longest} tokens on one side.")
        for batch in cut_into_batches(longer_side, self.max_tokens, generator):
            yield [pool[index] for index in batch]


class SentenceBatchStream(IterableDataset):
    """A stream's pairs in lists of `batch_size` (the last list may be shorter, unless `drop_last`): the sentence-
    count batches of `--streaming` without `--max_tokens`, as items, like `TokenBatchStream`'s."""

    def __init__(self, stream, batch_size: int, drop_last: bool = False):
        self.stream, self.batch_size, self.drop_last = stream, batch_size, drop_last

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.stream, "set_epoch"):
            self.stream.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[dict]]:
        batch = []
        for pair in self.stream:
            batch.append(pair)
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        if batch and not self.drop_last:
            yield batch


class EvenBatchesAcrossProcesses(IterableDataset):
    """Each data-parallel process's batches of a stream, cut so that every process yields the same number per epoch.

    Streamed parts differ between processes (`split_dataset_by_node`), and so do the batches cut from them: one
    process would end its epoch while another is still training, and their collectives (gradient reductions, an
    epoch's evaluation and save) would pair up wrongly or hang. Before each batch the processes agree (an all-reduce
    of "I have one", a minimum) whether all have another; the epoch ends on every process at the first that has none.
    The longer parts' last few batches are left out of that epoch, as `drop_last` leaves a remainder out; the next
    epoch reshuffles. The agreement is a collective, so it runs in the training process (`--dataloader_num_workers 0`).

    Args:
        batches: this process's batches (`TokenBatchStream`, `SentenceBatchStream`).
        device: where the agreement's one-number tensor lives (the process group's device: cpu for gloo).
    """

    def __init__(self, batches: IterableDataset, device: torch.device | str = "cpu"):
        self.batches, self.device = batches, device

    def set_epoch(self, epoch: int) -> None:
        self.batches.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[dict]]:
        if torch.utils.data.get_worker_info() is not None:
            raise RuntimeError(
                "EvenBatchesAcrossProcesses agrees across processes: iterate it in the training process."
            )
        iterator = iter(self.batches)
        while True:
            batch = next(iterator, None)
            every_process_has_one = torch.tensor([batch is not None], dtype=torch.int32, device=self.device)
            torch.distributed.all_reduce(every_process_has_one, op=torch.distributed.ReduceOp.MIN)
            if not every_process_has_one.item():
                return
            yield batch


class PaddingCounter:
    """Wraps a data collator to count the real and padded tokens of the batches it builds.

    `padding_fraction` is the share of padding among the source and target tokens since the last `reset`.
    (Counts are kept in the process that collates: with `--dataloader_num_workers 0`, the trainer's.)
    """

    def __init__(self, collator: Callable, pad_token_id: int, label_pad_token_id: int = -100):
        self.collator, self.pad_token_id, self.label_pad_token_id = collator, pad_token_id, label_pad_token_id
        self.reset()

    def reset(self) -> None:
        self.real_tokens = self.total_tokens = 0

    def __call__(self, features: list[dict]) -> dict:
        batch = self.collator(features)
        for key, pad in (("input_ids", self.pad_token_id), ("labels", self.label_pad_token_id)):
            ids = batch.get(key)
            if isinstance(ids, torch.Tensor):
                self.real_tokens += int(ids.ne(pad).sum())
                self.total_tokens += ids.numel()
        return batch

    @property
    def padding_fraction(self) -> float | None:
        return 1 - self.real_tokens / self.total_tokens if self.total_tokens else None


class PaddingFractionCallback(TrainerCallback):
    """Adds `padding_fraction` (since the previous log) to each training log entry."""

    def __init__(self, counter: PaddingCounter):
        self.counter = counter

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs and self.counter.padding_fraction is not None:
            fraction = round(self.counter.padding_fraction, 4)
            logs["padding_fraction"] = state.log_history[-1]["padding_fraction"] = fraction
            self.counter.reset()
