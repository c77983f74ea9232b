"""BPE-dropout (Provilkov et al., 2020): each batch's training pairs segmented anew, each merge skipped with
probability p, so that the model sees a word split in many ways and learns how subwords compose.

The pairs are tokenized once as usual (lengths, batching and the length report come from that segmentation) and keep
their text (`SOURCE_TEXT`, `TARGET_TEXT`); `BpeDropoutCollator` re-segments the rows that carry it just before
padding. Validation pairs, the saved tokenizer and decoding stay deterministic. The draws are the `tokenizers`
library's own, which cannot be seeded: a run with BPE-dropout is not bit-reproducible.
"""

import copy
from collections.abc import Callable

from tokenizers import models
from transformers import PreTrainedTokenizerBase

SOURCE_TEXT, TARGET_TEXT = "source_text", "target_text"


def check_bpe_dropout(tokenizer: PreTrainedTokenizerBase, dropout: float, flag: str = "--bpe_dropout") -> None:
    """Fail in one line unless `dropout` is in [0, 1) and, when positive, `tokenizer` is a fast BPE tokenizer."""
    if not 0 <= dropout < 1:
        raise ValueError(f"{flag} {dropout}: must be 0 (off), or above 0 and below 1 (the paper: 0.1).")
    if not dropout:
        return
    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = type(backend.model).__name__ if backend is not None else type(tokenizer).__name__
    if not isinstance(getattr(backend, "model", None), models.BPE):
        raise ValueError(
            f"{flag} {dropout}: the tokenizer is {model}, not a BPE tokenizer of the `tokenizers` library; train one "
            "with --tokenizer_model bpe, or leave the flag out."
        )


def dropout_tokenizer(tokenizer: PreTrainedTokenizerBase, dropout: float) -> PreTrainedTokenizerBase:
    """A copy of the fast BPE `tokenizer` that skips each merge with probability `dropout` (the original stays)."""
    check_bpe_dropout(tokenizer, dropout)
    sampling = copy.deepcopy(tokenizer)
    sampling.backend_tokenizer.model.dropout = dropout
    return sampling


class BpeDropoutCollator:
    """Re-segments the rows that carry their text with BPE-dropout, cut to the maximum lengths (keeping the final
    `</s>`), then hands them to `collator`; rows without text (validation pairs) pass as they are.

    Args:
        collator: what pads the rows into a batch (e.g. `DataCollatorForSeq2Seq`).
        tokenizer: the run's tokenizer (fast, BPE); copied, never changed.
        dropout: the probability of skipping each merge (the paper: 0.1).
        max_source_length, max_target_length: the most tokens per side, `</s>` included.
    """

    def __init__(
        self,
        collator: Callable[[list[dict]], dict],
        tokenizer: PreTrainedTokenizerBase,
        dropout: float,
        max_source_length: int,
        max_target_length: int,
    ):
        self.collator = collator
        self.tokenizer = dropout_tokenizer(tokenizer, dropout)
        self.limits = {"input_ids": max_source_length, "labels": max_target_length}

    def __call__(self, rows: list[dict]) -> dict:
        if rows and SOURCE_TEXT in rows[0]:
            rows = [dict(row) for row in rows]  # the dataset's rows stay as they were
            sources = [row.pop(SOURCE_TEXT) for row in rows]
            targets = [row.pop(TARGET_TEXT) for row in rows]
            encoding = self.tokenizer(sources, text_target=targets)
            for row, source, target in zip(rows, encoding["input_ids"], encoding["labels"], strict=True):
                row["input_ids"] = self._cut(source, "input_ids")
                row["attention_mask"] = [1] * len(row["input_ids"])
                row["labels"] = self._cut(target, "labels")
        return self.collator(rows)

    def _cut(self, ids: list[int], side: str) -> list[int]:
        limit = self.limits[side]
        return ids[: limit - 1] + ids[-1:] if len(ids) > limit else ids
