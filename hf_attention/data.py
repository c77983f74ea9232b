"""Parallel text as `datasets.Dataset` rows `{"translation": {src: ..., tgt: ...}}`, and the embedded toy corpus.

Readers for local files: two aligned plain-text files (one sentence per line, `PREFIX.SRC` / `PREFIX.TGT`, optionally
gzipped), TSV (source<TAB>target) and JSON Lines with a `translation` field. Problems are reported with the file and
line: a whole-file problem (missing, empty, misaligned, not UTF-8, malformed) raises `ParallelDataError`; pairs with
an empty side are dropped, counted and logged.
"""

import gzip
import json
import random
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset
from transformers import PreTrainedTokenizerBase
from transformers.utils import logging

logger = logging.get_logger(__name__)


class ParallelDataError(ValueError):
    """Parallel text that cannot be read as aligned sentence pairs; the message names the file and line."""


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text without the newline), decoding UTF-8 line by line to name the line that is not."""
    opener = gzip.open if path.suffix == ".gz" else open
    number = 0
    with opener(path, "rb") as handle:
        try:
            for number, raw in enumerate(handle, start=1):
                try:
                    yield number, raw.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError as error:
                    message = f"{path}:{number}: not UTF-8 text ({error.reason} at byte {error.start})."
                    raise ParallelDataError(message) from None
        except (OSError, EOFError, zlib.error) as error:  # a damaged or truncated .gz
            raise ParallelDataError(f"{path}:{number + 1}: cannot be decompressed ({error}).") from None


def _existing(path: Path) -> Path:
    if not path.is_file():
        raise ParallelDataError(f"{path}: no such file.")
    return path


def _pairs_from_files(source_file: Path, target_file: Path) -> Iterator[tuple[str, int, str, str]]:
    source_lines, target_lines = list(_lines(_existing(source_file))), list(_lines(_existing(target_file)))
    if len(source_lines) != len(target_lines):
        raise ParallelDataError(
            f"{source_file} has {len(source_lines)} lines but {target_file} has {len(target_lines)}: "
            "the files must be aligned line by line."
        )
    for (number, source), (_, target) in zip(source_lines, target_lines, strict=True):
        yield f"{source_file}/{target_file.name}", number, source, target


def _pairs_from_tsv(path: Path) -> Iterator[tuple[str, int, str, str]]:
    for number, line in _lines(_existing(path)):
        fields = line.split("\t")
        if len(fields) != 2:
            raise ParallelDataError(f"{path}:{number}: expected 2 tab-separated fields, found {len(fields)}.")
        yield str(path), number, fields[0], fields[1]


def _pairs_from_jsonl(path: Path, source_lang: str, target_lang: str) -> Iterator[tuple[str, int, str, str]]:
    for number, line in _lines(_existing(path)):
        if not line.strip():
            continue
        try:
            translation = json.loads(line)["translation"]
            sides = translation[source_lang], translation[target_lang]
        except json.JSONDecodeError as error:
            raise ParallelDataError(f"{path}:{number}: not JSON ({error.msg}).") from None
        except (KeyError, TypeError):
            raise ParallelDataError(
                f'{path}:{number}: expected {{"translation": {{"{source_lang}": ..., "{target_lang}": ...}}}}.'
            ) from None
        for lang, side in zip((source_lang, target_lang), sides, strict=True):
            if not isinstance(side, str):
                raise ParallelDataError(f'{path}:{number}: the "{lang}" side must be text, got {json.dumps(side)}.')
        yield str(path), number, *sides


def read_parallel_corpus(path: str | Path, source_lang: str, target_lang: str) -> Dataset:
    """Read aligned sentence pairs into rows `{"translation": {source_lang: ..., target_lang: ...}}`.

    Args:
        path: a `.tsv` or `.jsonl` file (optionally `.gz`), or a prefix P naming the files P.{source_lang} and
            P.{target_lang} (or P.{lang}.gz).

    Raises:
        ParallelDataError: a missing or empty file, misaligned files, bytes that are not UTF-8, a malformed line.
    """
    path = Path(path)
    kind = path.name.removesuffix(".gz").rpartition(".")[2]
    if kind == "tsv":
        pairs = _pairs_from_tsv(path)
    elif kind == "jsonl":
        pairs = _pairs_from_jsonl(path, source_lang, target_lang)
    else:
        files = []
        for lang in (source_lang, target_lang):
            plain, gzipped = Path(f"{path}.{lang}"), Path(f"{path}.{lang}.gz")
            files.append(gzipped if gzipped.is_file() and not plain.is_file() else plain)
        pairs = _pairs_from_files(*files)

    rows, dropped = [], []
    for where, number, source, target in pairs:
        source, target = source.strip(), target.strip()
        if source and target:
            rows.append({"translation": {source_lang: source, target_lang: target}})
        else:
            dropped.append(f"{where}:{number}")
    if dropped:
        logger.warning(
            f"Dropped {len(dropped)} pair(s) with an empty side, e.g. {', '.join(dropped[:3])} "
            f"({len(rows)} pairs kept)."
        )
    if not rows:
        raise ParallelDataError(f"{path}: no sentence pairs (the file is empty or every pair has an empty side).")
    return Dataset.from_list(rows)


_EN_UNITS = "zero one two three four five six seven eight nine".split()
_EN_TEENS = "ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split()
_EN_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_DE_UNITS = "null eins zwei drei vier fünf sechs sieben acht neun".split()
_DE_TEENS = "zehn elf zwölf dreizehn vierzehn fünfzehn sechzehn siebzehn achtzehn neunzehn".split()
_DE_TENS = "_ _ zwanzig dreißig vierzig fünfzig sechzig siebzig achtzig neunzig".split()
_SUBJECTS = [("i", "ich", ""), ("we", "wir", "en"), ("they", "sie", "en")]
_VERBS = [("see", "seh"), ("buy", "kauf"), ("count", "zähl"), ("sell", "verkauf"), ("paint", "mal")]
_NOUNS = [("cats", "katzen"), ("dogs", "hunde"), ("houses", "häuser"), ("books", "bücher"), ("trees", "bäume")]


def number_in_english(number: int) -> str:
    """1..9999 in English words: 4321 -> "four thousand three hundred twenty one"."""
    words = []
    thousands, rest = divmod(number, 1000)
    hundreds, below_hundred = divmod(rest, 100)
    if thousands:
        words += [_EN_UNITS[thousands], "thousand"]
    if hundreds:
        words += [_EN_UNITS[hundreds], "hundred"]
    tens, units = divmod(below_hundred, 10)
    if tens == 1:
        words.append(_EN_TEENS[units])
    else:
        words += ([_EN_TENS[tens]] if tens else []) + ([_EN_UNITS[units]] if units else [])
    return " ".join(words)


def number_in_german(number: int) -> str:
    """1..9999 in German words, units before tens as German says them: 4321 -> "vier tausend drei hundert ein und
    zwanzig"."""
    words = []
    thousands, rest = divmod(number, 1000)
    hundreds, below_hundred = divmod(rest, 100)
    if thousands:
        words += ["ein" if thousands == 1 else _DE_UNITS[thousands], "tausend"]
    if hundreds:
        words += ["ein" if hundreds == 1 else _DE_UNITS[hundreds], "hundert"]
    tens, units = divmod(below_hundred, 10)
    if tens == 1:
        words.append(_DE_TEENS[units])
    elif tens and units:
        words += ["ein" if units == 1 else _DE_UNITS[units], "und", _DE_TENS[tens]]
    else:
        words += ([_DE_TENS[tens]] if tens else []) + ([_DE_UNITS[units]] if units else [])
    return " ".join(words)


def toy_translation_corpus(size: int, seed: int = 0) -> list[dict[str, dict[str, str]]]:
    """A deterministic English->German corpus with structure to learn: verb agreement and German number order.

    "we buy four hundred twenty one dogs" -> "wir kaufen vier hundert ein und zwanzig hunde"
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(size):
        subject_en, subject_de, ending = rng.choice(_SUBJECTS)
        verb_en, verb_de = rng.choice(_VERBS)
        noun_en, noun_de = rng.choice(_NOUNS)
        number = rng.choice([rng.randint(2, 99), rng.randint(100, 999), rng.randint(1000, 9999)])
        verb_de += ending or "e"
        english = f"{subject_en} {verb_en} {number_in_english(number)} {noun_en}"
        german = f"{subject_de} {verb_de} {number_in_german(number)} {noun_de}"
        rows.append({"translation": {"en": english, "de": german}})
    return rows


def toy_translation_dataset(size: int, seed: int = 0) -> Dataset:
    return Dataset.from_list(toy_translation_corpus(size, seed))


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
) -> tuple[Dataset, LengthReport]:
    """Source ids, mask and target `labels` (via `text_target`) for Seq2SeqTrainer.

    Args:
        max_length: most tokens per side, `</s>` included.
        too_long: `"truncate"` pairs with a side beyond `max_length`, or `"drop"` them.

    Returns:
        The tokenized dataset and how many pairs were too long.
    """
    if too_long not in ("truncate", "drop"):
        raise ValueError(f"`too_long` must be 'truncate' or 'drop', got {too_long!r}.")

    def tokenize(batch: dict) -> dict:
        sources = [pair[source_lang] for pair in batch["translation"]]
        targets = [pair[target_lang] for pair in batch["translation"]]
        encoded = tokenizer(sources, text_target=targets)
        encoded["too_long"] = [
            len(source) > max_length or len(target) > max_length
            for source, target in zip(encoded["input_ids"], encoded["labels"], strict=True)
        ]
        for key in ("input_ids", "attention_mask", "labels"):
            encoded[key] = [ids[: max_length - 1] + ids[-1:] if len(ids) > max_length else ids for ids in encoded[key]]
        return encoded

    tokenized = dataset.map(tokenize, batched=True, remove_columns=dataset.column_names)
    too_long_count = sum(tokenized["too_long"])
    if too_long == "drop":
        tokenized = tokenized.filter(lambda row: not row["too_long"])
    report = LengthReport(kept=len(tokenized), too_long=too_long_count, policy=too_long)
    return tokenized.remove_columns("too_long"), report
