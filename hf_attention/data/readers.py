"""Readers for local parallel text, into `datasets.Dataset` rows `{"translation": {src: ..., tgt: ...}}`.

Two aligned plain-text files (one sentence per line, `PREFIX.SRC` / `PREFIX.TGT`, optionally gzipped), TSV
(source<TAB>target) and JSON Lines with a `translation` field. Problems are reported with the file and line: a
whole-file problem (missing, empty, misaligned, not UTF-8, malformed) raises `ParallelDataError`; pairs with an empty
side are dropped, counted and logged. The rows are written once to an Arrow file in the `datasets` cache (keyed by
the files' paths, sizes and modification times), so a corpus is not held in Python lists and a second run reads the
cached copy.
"""

import gzip
import json
import zlib
from collections.abc import Iterator
from itertools import zip_longest
from pathlib import Path

from datasets import Dataset, Features, IterableDataset, Value
from datasets.exceptions import DatasetGenerationError
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
    """The files' lines in lockstep, one pair in memory at a time; files of different lengths raise at the end
    (with both line counts), before a reader of the pairs has finished."""
    source_count = target_count = 0
    for source, target in zip_longest(_lines(_existing(source_file)), _lines(_existing(target_file))):
        source_count += source is not None
        target_count += target is not None
        if source is not None and target is not None:
            yield f"{source_file}/{target_file.name}", source[0], source[1], target[1]
    if source_count != target_count:
        raise ParallelDataError(
            f"{source_file} has {source_count} lines but {target_file} has {target_count}: "
            "the files must be aligned line by line."
        )


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


def _source_files(path: Path, source_lang: str, target_lang: str) -> list[Path]:
    """The file(s) a corpus path names: one .tsv/.jsonl file, or PREFIX.SRC and PREFIX.TGT (each maybe gzipped)."""
    if _kind(path) in ("tsv", "jsonl"):
        return [path]
    files = []
    for lang in (source_lang, target_lang):
        plain, gzipped = Path(f"{path}.{lang}"), Path(f"{path}.{lang}.gz")
        files.append(gzipped if gzipped.is_file() and not plain.is_file() else plain)
    return files


def _kind(path: Path) -> str:
    return path.name.removesuffix(".gz").rpartition(".")[2]


def _rows(first_file: str, second_file: str, signature: str, source_lang: str, target_lang: str) -> Iterator[dict]:
    """Kept rows of the corpus, logging the dropped ones. `signature` (sizes, times) only keys the cache.

    Plain strings, not lists: `from_generator` would shard a list argument across workers.
    """
    paths = [Path(file) for file in (first_file, second_file) if file]
    kind = _kind(paths[0])
    if kind == "tsv":
        pairs = _pairs_from_tsv(paths[0])
    elif kind == "jsonl":
        pairs = _pairs_from_jsonl(paths[0], source_lang, target_lang)
    else:
        pairs = _pairs_from_files(*paths)
    kept, dropped = 0, []
    for where, number, source, target in pairs:
        source, target = source.strip(), target.strip()
        if source and target:
            kept += 1
            yield {"translation": {source_lang: source, target_lang: target}}
        else:
            dropped.append(f"{where}:{number}")
    if dropped:
        logger.warning(
            f"Dropped {len(dropped)} pair(s) with an empty side, e.g. {', '.join(dropped[:3])} ({kept} pairs kept)."
        )


def read_parallel_corpus(
    path: str | Path, source_lang: str, target_lang: str, cache_dir: str | None = None
) -> Dataset:
    """Read aligned sentence pairs into rows `{"translation": {source_lang: ..., target_lang: ...}}`.

    Args:
        path: a `.tsv` or `.jsonl` file (optionally `.gz`), or a prefix P naming the files P.{source_lang} and
            P.{target_lang} (or P.{lang}.gz).
        cache_dir: the `datasets` cache to keep the Arrow copy in (default: `HF_DATASETS_CACHE`).

    Raises:
        ParallelDataError: a missing or empty file, misaligned files, bytes that are not UTF-8, a malformed line.
    """
    path = Path(path)
    files = [_existing(file) for file in _source_files(path, source_lang, target_lang)]
    signature = [(file.stat().st_size, file.stat().st_mtime_ns) for file in files]
    features = Features({"translation": {source_lang: Value("string"), target_lang: Value("string")}})
    try:
        dataset = Dataset.from_generator(
            _rows,
            features=features,
            cache_dir=cache_dir,
            gen_kwargs={
                "first_file": str(files[0].resolve()),
                "second_file": str(files[1].resolve()) if len(files) > 1 else "",
                "signature": json.dumps(signature),
                "source_lang": source_lang,
                "target_lang": target_lang,
            },
        )
    except DatasetGenerationError as error:
        if isinstance(error.__cause__, ParallelDataError):
            raise error.__cause__ from None
        raise
    except ValueError as error:  # datasets: 'Instruction "train" corresponds to no data!'
        if "no data" not in str(error):
            raise
        dataset = None
    if dataset is None or len(dataset) == 0:
        raise ParallelDataError(f"{path}: no sentence pairs (the file is empty or every pair has an empty side).")
    return dataset


def stream_parallel_corpus(path: str | Path, source_lang: str, target_lang: str) -> IterableDataset:
    """`read_parallel_corpus` as a stream (`--streaming`): rows are read lazily, nothing is cached or held."""
    path = Path(path)
    files = [_existing(file) for file in _source_files(path, source_lang, target_lang)]
    features = Features({"translation": {source_lang: Value("string"), target_lang: Value("string")}})
    return IterableDataset.from_generator(
        _rows,
        features=features,
        gen_kwargs={
            "first_file": str(files[0]),
            "second_file": str(files[1]) if len(files) > 1 else "",
            "signature": "",
            "source_lang": source_lang,
            "target_lang": target_lang,
        },
    )
