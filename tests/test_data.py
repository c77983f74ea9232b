"""The embedded toy corpus and dataset tokenisation."""

import gzip
import json

import pytest
from transformers.testing_utils import CaptureLogger

from hf_attention.data import (
    ParallelDataError,
    number_in_english,
    number_in_german,
    read_parallel_corpus,
    readers,
    tokenize_pairs,
    toy_translation_dataset,
)

from .helpers import toy_tokenizer


@pytest.mark.parametrize(
    "number, english, german",
    [
        (7, "seven", "sieben"),
        (13, "thirteen", "dreizehn"),
        (40, "forty", "vierzig"),
        (21, "twenty one", "ein und zwanzig"),
        (305, "three hundred five", "drei hundert fünf"),
        (1121, "one thousand one hundred twenty one", "ein tausend ein hundert ein und zwanzig"),
        (9999, "nine thousand nine hundred ninety nine", "neun tausend neun hundert neun und neunzig"),
    ],
)
def test_numbers_are_written_out_in_both_languages(number, english, german):
    assert number_in_english(number) == english
    assert number_in_german(number) == german


def test_toy_corpus_is_deterministic_and_varied():
    first, again = toy_translation_dataset(300, seed=3), toy_translation_dataset(300, seed=3)
    assert first["translation"] == again["translation"]
    assert first["translation"] != toy_translation_dataset(300, seed=4)["translation"]
    assert len({pair["en"] for pair in first["translation"]}) > 290
    for pair in first["translation"]:
        assert pair["de"].split()[0] in {"ich", "wir", "sie"} and pair["en"].split()[0] in {"i", "we", "they"}


def test_pairs_are_tokenized_with_eos_terminated_labels():
    dataset = toy_translation_dataset(50)
    tokenizer = toy_tokenizer(vocab_size=120, pairs=50)
    tokenized, report = tokenize_pairs(dataset, tokenizer, "en", "de", max_length=6)
    assert set(tokenized.column_names) == {"input_ids", "attention_mask", "labels"}
    assert all(len(ids) <= 6 and ids[-1] == tokenizer.eos_token_id for ids in tokenized["input_ids"])
    assert all(labels[-1] == tokenizer.eos_token_id for labels in tokenized["labels"])
    assert report.kept == 50 and report.too_long > 0 and "truncated" in str(report)


def test_too_long_pairs_are_dropped_and_counted():
    dataset = toy_translation_dataset(50)
    tokenizer = toy_tokenizer(vocab_size=120, pairs=50)
    full, _ = tokenize_pairs(dataset, tokenizer, "en", "de", max_length=1000)
    longest = [max(len(s), len(t)) for s, t in zip(full["input_ids"], full["labels"], strict=True)]
    limit = sorted(longest)[25]
    kept, report = tokenize_pairs(dataset, tokenizer, "en", "de", max_length=limit, too_long="drop")
    assert report.too_long == sum(length > limit for length in longest) and len(kept) == 50 - report.too_long
    assert "dropped" in str(report)
    with pytest.raises(ValueError, match="`too_long` must be"):
        tokenize_pairs(dataset, tokenizer, "en", "de", max_length=8, too_long="cut")


PAIRS = [("a small house", "ein kleines haus"), ("two dogs", "zwei hunde"), ("thank you", "danke")]


def write_pair_files(prefix, pairs=PAIRS, compress=False):
    for index, lang in enumerate(("en", "de")):
        text = "".join(f"{pair[index]}\n" for pair in pairs).encode()
        path = prefix.parent / f"{prefix.name}.{lang}{'.gz' if compress else ''}"
        path.write_bytes(gzip.compress(text) if compress else text)


@pytest.mark.parametrize("kind", ["files", "gzipped files", "tsv", "jsonl"])
def test_every_format_reads_into_translation_rows(tmp_path, kind):
    if kind.endswith("files"):
        path = tmp_path / "train"
        write_pair_files(path, compress=kind.startswith("gzip"))
    elif kind == "tsv":
        path = tmp_path / "train.tsv"
        path.write_text("".join(f"{en}\t{de}\n" for en, de in PAIRS), encoding="utf-8")
    else:
        path = tmp_path / "train.jsonl"
        rows = [{"translation": {"en": en, "de": de}} for en, de in PAIRS]
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    dataset = read_parallel_corpus(path, "en", "de")
    assert dataset["translation"] == [{"en": en, "de": de} for en, de in PAIRS]


def test_pairs_with_an_empty_side_are_dropped_counted_and_located(tmp_path):
    write_pair_files(tmp_path / "train", PAIRS[:1] + [("", "leer")] + PAIRS[1:] + [("  ", " ")])
    with CaptureLogger(readers.logger) as captured:
        dataset = read_parallel_corpus(tmp_path / "train", "en", "de")
    assert len(dataset) == 3
    assert "Dropped 2 pair(s) with an empty side" in captured.out and "train.de:2" in captured.out


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda d: None, r"train\.en: no such file"),
        (lambda d: ((d / "train.en").write_text(""), (d / "train.de").write_text("")), "no sentence pairs"),
        (
            lambda d: ((d / "train.en").write_text("a\nb\nc\n"), (d / "train.de").write_text("x\ny\n")),
            r"train\.en has 3 lines but .*train\.de has 2: the files must be aligned",
        ),
        (
            lambda d: ((d / "train.en").write_bytes(b"ok\nbad \xff byte\n"), (d / "train.de").write_text("a\nb\n")),
            r"train\.en:2: not UTF-8 text",
        ),
    ],
    ids=["missing", "empty", "misaligned", "not-utf8"],
)
def test_unreadable_pair_files_are_named_with_the_line(tmp_path, setup, message):
    setup(tmp_path)
    with pytest.raises(ParallelDataError, match=message):
        read_parallel_corpus(tmp_path / "train", "en", "de")


def test_malformed_tsv_and_jsonl_lines_are_named(tmp_path):
    (tmp_path / "bad.tsv").write_text("a\tb\nonly one field\n")
    with pytest.raises(ParallelDataError, match=r"bad\.tsv:2: expected 2 tab-separated fields, found 1"):
        read_parallel_corpus(tmp_path / "bad.tsv", "en", "de")
    (tmp_path / "bad.jsonl").write_text('{"translation": {"en": "a", "de": "b"}}\n{"translation": {"en": "a"}}\n')
    with pytest.raises(ParallelDataError, match=r"bad\.jsonl:2: expected"):
        read_parallel_corpus(tmp_path / "bad.jsonl", "en", "de")
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(ParallelDataError, match=r"broken\.jsonl:1: not JSON"):
        read_parallel_corpus(tmp_path / "broken.jsonl", "en", "de")
