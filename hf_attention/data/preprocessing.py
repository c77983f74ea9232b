"""Tokenisation of `{"translation": ...}` rows into model inputs and labels, with a report on over-long pairs."""

from dataclasses import dataclass

from datasets import Dataset, IterableDataset
from transformers import PreTrainedTokenizerBase

from .alignments import subword_links
from .subword_regularization import SOURCE_TEXT, TARGET_TEXT


@dataclass
class LengthReport:
    """What `tokenize_pairs` did about pairs longer than the maximum length."""

    kept: int
    too_long: int
    policy: str

    def __str__(self) -> str:
        action = "truncated" if self.policy == "truncate" else "dropped"
        return f"{self.kept} pairs kept, {self.too_long} longer than the maximum length {action}"


def tokenize_pairs(
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    source_lang: str,
    target_lang: str,
    max_length: int,
    too_long: str = "truncate",
    max_target_length: int | None = None,
    source_prefix: str = "",
    pad_to_max_length: bool = False,
    label_pad_token_id: int = -100,
    num_proc: int | None = None,
    load_from_cache_file: bool = True,
    keep_text: bool = False,
) -> tuple[Dataset, LengthReport]:
    """Source ids, mask and target `labels` (via `text_target`) for Seq2SeqTrainer, cached by `datasets`; with an
    `alignment` column (Moses word links, `--guided_alignment`), also the pairs' subword links.

    Args:
        max_length: most source tokens, `</s>` included (run_translation's `max_source_length`); also the most
            target tokens unless `max_target_length` is given.
        too_long: `"truncate"` pairs with a side beyond its maximum, or `"drop"` them.
        source_prefix: text put before every source sentence (run_translation's `--source_prefix`, for T5-style
            task prefixes).
        pad_to_max_length: pad every row to the maximum lengths (labels with `label_pad_token_id`) instead of
            padding each batch to its longest row.
        num_proc: processes for `Dataset.map`; `load_from_cache_file=False` redoes cached work.
        keep_text: keep each pair's text (prefixed source, target) as `SOURCE_TEXT` and `TARGET_TEXT`, for
            `BpeDropoutCollator` to segment anew.

    Returns:
        The tokenized dataset and how many pairs were too long.
    """
    if too_long not in ("truncate", "drop"):
        raise ValueError(f"`too_long` must be 'truncate' or 'drop', got {too_long!r}.")
    tokenize = _tokenize_function(
        tokenizer, source_lang, target_lang, max_length, max_target_length, source_prefix, pad_to_max_length,
        label_pad_token_id, keep_text,
    )  # fmt: skip
    tokenized = dataset.map(
        tokenize,
        batched=True,
        remove_columns=dataset.column_names,
        num_proc=num_proc,
        load_from_cache_file=load_from_cache_file,
        desc="Tokenizing",
    )
    too_long_count = sum(tokenized["too_long"])
    if too_long == "drop" and too_long_count:
        tokenized = tokenized.filter(
            lambda too_long_rows: [not row for row in too_long_rows],
            input_columns="too_long",
            batched=True,
            num_proc=num_proc,
            load_from_cache_file=load_from_cache_file,
            desc="Dropping over-long pairs",
        )
    report = LengthReport(kept=len(tokenized), too_long=too_long_count, policy=too_long)
    return tokenized.remove_columns("too_long"), report


def _tokenize_function(
    tokenizer: PreTrainedTokenizerBase,
    source_lang: str,
    target_lang: str,
    max_length: int,
    max_target_length: int | None = None,
    source_prefix: str = "",
    pad_to_max_length: bool = False,
    label_pad_token_id: int = -100,
    keep_text: bool = False,
):
    """The batched `map` function of `tokenize_pairs` and `tokenize_stream`; it marks over-long pairs `too_long`."""
    limits = {"input_ids": max_length, "attention_mask": max_length, "labels": max_target_length or max_length}
    pads = {"input_ids": tokenizer.pad_token_id, "attention_mask": 0, "labels": label_pad_token_id}

    def tokenize(batch: dict) -> dict:
        sources = [source_prefix + pair[source_lang] for pair in batch["translation"]]
        targets = [pair[target_lang] for pair in batch["translation"]]
        encoding = tokenizer(sources, text_target=targets)
        encoded = dict(encoding)
        if keep_text:
            encoded[SOURCE_TEXT], encoded[TARGET_TEXT] = sources, targets
        if "alignment" in batch:  # word links -> subword links (`data.alignments`)
            target_encoding = tokenizer(text_target=targets)
            prefix_words = len(source_prefix.split())
            encoded["alignment"] = [
                subword_links(line, [None if w is None else w - prefix_words for w in encoding.word_ids(row)],
                              target_encoding.word_ids(row))
                for row, line in enumerate(batch["alignment"])
            ]  # fmt: skip
        encoded["too_long"] = [
            len(source) > limits["input_ids"] or len(target) > limits["labels"]
            for source, target in zip(encoded["input_ids"], encoded["labels"], strict=True)
        ]
        if "alignment" in encoded:  # links into the part a cut to the limit removes go with it
            encoded["alignment"] = [
                [v for t, s in zip(flat[::2], flat[1::2], strict=True) if t < limits["labels"] - 1
                 and s < limits["input_ids"] - 1 for v in (t, s)]
                for flat in encoded["alignment"]
            ]  # fmt: skip
        for key, limit in limits.items():  # cut to the limit, keeping the final </s>
            encoded[key] = [ids[: limit - 1] + ids[-1:] if len(ids) > limit else ids for ids in encoded[key]]
            if pad_to_max_length:
                encoded[key] = [ids + [pads[key]] * (limit - len(ids)) for ids in encoded[key]]
        return encoded

    return tokenize


def tokenize_stream(
    dataset: IterableDataset,
    tokenizer: PreTrainedTokenizerBase,
    source_lang: str,
    target_lang: str,
    max_length: int,
    too_long: str = "truncate",
    **options,
) -> IterableDataset:
    """`tokenize_pairs` for a stream (`--streaming`): tokenised on the fly as rows are read; nothing is counted or
    cached, so over-long pairs are dropped (or truncated) silently.

    Args:
        options: `max_target_length`, `source_prefix`, `pad_to_max_length`, `label_pad_token_id`, `keep_text`, as
            for `tokenize_pairs`.
    """
    if too_long not in ("truncate", "drop"):
        raise ValueError(f"`too_long` must be 'truncate' or 'drop', got {too_long!r}.")
    tokenize = _tokenize_function(tokenizer, source_lang, target_lang, max_length, **options)
    tokenized = dataset.map(tokenize, batched=True, remove_columns=["translation"])
    if too_long == "drop":
        tokenized = tokenized.filter(lambda rows: [not row for row in rows], input_columns="too_long", batched=True)
    return tokenized.remove_columns("too_long")
