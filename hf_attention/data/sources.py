"""Where the sentence pairs come from: a `datasets` dataset, data files, or the embedded toy corpus.

Every source gives the same thing: a `DatasetDict` with the splits the job needs, each row
`{"translation": {source_lang: ..., target_lang: ...}}` as in wmt14, wmt16 and opus_books. A named source that does
not exist, or lacks a split, a config or a language, raises `DataSourceError` naming the flag, before the job writes
anything.

- `--dataset_name`: a Hub id or a local dataset folder (`datasets.load_dataset`), or a `save_to_disk` folder
  (`datasets.load_from_disk`); `--dataset_config_name` picks the config.
- `--train_file` / `--validation_file` / `--test_file`: `.json`, `.csv` and `.parquet` files through `load_dataset`;
  `.tsv`, `.jsonl` and `PREFIX.SRC`/`PREFIX.TGT` text through this package's readers (their errors name the line).
- Flat tables (a column per language) are read with `--source_column` / `--target_column`.
- A missing validation split is cut from the training split (`--validation_split_percentage`).
- `--streaming` gives `IterableDataset`s instead, read lazily (corpora larger than memory).
"""

import difflib
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset, DatasetDict, IterableDatasetDict, load_dataset, load_from_disk
from datasets.exceptions import DatasetNotFoundError

from .alignments import AlignmentFileError, read_alignment_file
from .readers import ParallelDataError, read_parallel_corpus, stream_parallel_corpus
from .toy import toy_translation_dataset

SPLITS = ("train", "validation", "test")
FILE_FLAGS = {"train": "--train_file", "validation": "--validation_file", "test": "--test_file"}
LOAD_DATASET_FORMATS = ("json", "csv", "parquet")  # read by `load_dataset`'s packaged builders
READER_FORMATS = ("tsv", "jsonl")  # read by `read_parallel_corpus`, as is a PREFIX of PREFIX.SRC / PREFIX.TGT


class DataSourceError(ValueError):
    """A data flag naming something that does not exist or cannot be read; the message names the flag and value."""


@dataclass
class CorpusRequest:
    """What the job asks of its data: the flags of `DataArguments` that choose and shape the corpus."""

    source_lang: str
    target_lang: str
    dataset_name: str = ""
    dataset_config_name: str = ""
    train_file: str = ""
    validation_file: str = ""
    test_file: str = ""
    source_column: str = ""
    target_column: str = ""
    validation_split_percentage: int = 5
    toy_corpus: bool = False
    toy_train_size: int = 20000
    toy_eval_size: int = 200
    max_train_samples: int = 0
    max_eval_samples: int = 0
    max_predict_samples: int = 0
    cache_dir: str | None = None
    token: str | None = None
    dataset_revision: str | None = None
    seed: int = 0
    streaming: bool = False
    guided_alignment: str = ""  # a file of word alignments, one line per training pair (`data.alignments`)

    @property
    def files(self) -> dict[str, str]:
        return {"train": self.train_file, "validation": self.validation_file, "test": self.test_file}


def _is_saved_to_disk(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in ("dataset_dict.json", "state.json"))


def _file_format(path: str) -> str:
    return Path(path).name.removesuffix(".gz").rpartition(".")[2].lower()


def _load_named_dataset(request: CorpusRequest) -> DatasetDict:
    name, config = request.dataset_name, request.dataset_config_name or None
    if _is_saved_to_disk(Path(name)):
        loaded = load_from_disk(name)
        loaded = loaded if isinstance(loaded, DatasetDict) else DatasetDict({"train": loaded})
        if request.streaming:
            return IterableDatasetDict({split: dataset.to_iterable_dataset() for split, dataset in loaded.items()})
        return loaded
    try:
        return load_dataset(
            name,
            config,
            cache_dir=request.cache_dir,
            token=request.token,
            revision=request.dataset_revision,
            streaming=request.streaming,
        )
    except (DatasetNotFoundError, FileNotFoundError) as error:  # FileNotFoundError: a local path
        reason = " ".join(str(error).split())
        raise DataSourceError(
            f"--dataset_name {name}: no such dataset on the Hub or on disk, or it is private ({reason})."
        ) from None
    except ValueError as error:  # datasets names the configs: "BuilderConfig 'x' not found. Available: [...]"
        message = " ".join(str(error).split())
        if "config" not in message.lower():
            raise
        flag = f"--dataset_config_name {config}" if config else "--dataset_config_name"
        raise DataSourceError(f"{flag}: {message}") from None


def _load_file(split: str, path: str, request: CorpusRequest) -> Dataset:
    flag = f"{FILE_FLAGS[split]} {path}"
    kind = _file_format(path)
    if kind in LOAD_DATASET_FORMATS:
        if not Path(path).is_file():
            raise DataSourceError(f"{flag}: no such file.")
        try:
            return load_dataset(
                kind, data_files={split: path}, split=split, cache_dir=request.cache_dir, streaming=request.streaming
            )
        except Exception as error:  # pyarrow and pandas raise many kinds; all mean "not a readable table"
            reason = " ".join(str(error).split())[:300]
            raise DataSourceError(f"{flag}: not a readable {kind} file ({type(error).__name__}: {reason}).") from None
    if Path(path).is_file() and kind not in READER_FORMATS:  # not a PREFIX either: PREFIX itself is no file
        known = ", ".join(f".{name}" for name in (*LOAD_DATASET_FORMATS, *READER_FORMATS))
        raise DataSourceError(f"{flag}: unknown format .{kind}; use {known}, or a PREFIX of PREFIX.SRC / PREFIX.TGT.")
    if request.streaming:
        return stream_parallel_corpus(path, request.source_lang, request.target_lang)
    return read_parallel_corpus(path, request.source_lang, request.target_lang, cache_dir=request.cache_dir)


def _as_translation_rows(dataset: Dataset, origin: str, request: CorpusRequest) -> Dataset:
    """The rows as `{"translation": {src: ..., tgt: ...}}`, from that schema or from two text columns."""
    languages = (request.source_lang, request.target_lang)
    columns = dataset.column_names
    if columns is None:  # a stream whose features are not declared: the first row tells
        columns = list(next(iter(dataset)).keys())
    if request.source_column or request.target_column:
        for flag, column in (("--source_column", request.source_column), ("--target_column", request.target_column)):
            if column not in columns:
                hint = difflib.get_close_matches(column, columns, n=1)
                close = f"; did you mean {hint[0]!r}?" if hint else ""
                raise DataSourceError(f"{flag} {column!r}: {origin} has the columns {', '.join(columns)}{close}")
        source_column, target_column = request.source_column, request.target_column
        return dataset.map(
            lambda batch: {
                "translation": [
                    {languages[0]: source, languages[1]: target}
                    for source, target in zip(batch[source_column], batch[target_column], strict=True)
                ]
            },
            batched=True,
            remove_columns=columns,
            desc="Pairing the source and target columns",
        )
    if "translation" not in columns:
        raise DataSourceError(
            f"{origin}: the rows have the columns {', '.join(columns)}, not a 'translation' column; name the text "
            "columns with --source_column and --target_column."
        )
    feature = dataset.features["translation"] if dataset.features else next(iter(dataset))["translation"]
    available = list(getattr(feature, "languages", None) or (feature.keys() if isinstance(feature, dict) else []))
    for flag, lang in (("--source_lang", languages[0]), ("--target_lang", languages[1])):
        if available and lang not in available:
            raise DataSourceError(f"{flag} {lang}: {origin} has the languages {', '.join(sorted(available))}.")
    extra = [column for column in columns if column != "translation"]
    return dataset.remove_columns(extra) if extra else dataset


def load_corpus(
    request: CorpusRequest, needed: tuple[str, ...] = SPLITS, optional: tuple[str, ...] = ()
) -> DatasetDict:
    """The splits in `needed` (of train / validation / test), and those of `optional` the data has, as translation
    rows.

    Raises:
        DataSourceError: no data given, or a named dataset, file, config, split, column or language that does not
            exist.
        ParallelDataError: a local text file that cannot be read (the message names the line).
    """
    given_files = {split: path for split, path in request.files.items() if path}
    if request.guided_alignment and (request.toy_corpus or request.streaming):
        other = "--toy_corpus" if request.toy_corpus else "--streaming"
        raise DataSourceError(
            f"--guided_alignment {request.guided_alignment}: pairs its lines with the training data's, which "
            f"{other} does not hold in a file; give --train_file or --dataset_name."
        )
    if request.toy_corpus:
        if request.dataset_name or given_files:
            raise DataSourceError("--toy_corpus: the embedded corpus replaces --dataset_name and the data files.")
        if (request.source_lang, request.target_lang) != ("en", "de"):
            raise DataSourceError(
                "--toy_corpus: the toy corpus is English->German; use --source_lang en --target_lang de."
            )
        sizes = {"train": request.toy_train_size, "validation": request.toy_eval_size, "test": request.toy_eval_size}
        seeds = {"train": request.seed, "validation": request.seed + 1, "test": request.seed + 2}
        loaded = {split: toy_translation_dataset(sizes[split], seed=seeds[split]) for split in SPLITS}
        if request.streaming:
            loaded = {split: dataset.to_iterable_dataset() for split, dataset in loaded.items()}
        return _limited(loaded, (*needed, *optional), request)
    if request.dataset_name and given_files:
        flags = ", ".join(FILE_FLAGS[split] for split in given_files)
        raise DataSourceError(f"--dataset_name {request.dataset_name}: give either a dataset or {flags}, not both.")
    if request.dataset_name:
        loaded, origin = _load_named_dataset(request), f"--dataset_name {request.dataset_name}"
    elif given_files:
        loaded = {split: _load_file(split, path, request) for split, path in given_files.items()}
        origin = None
    else:
        raise DataSourceError(
            "no data: give --dataset_name NAME, or --train_file / --validation_file / --test_file, or --toy_corpus "
            "for the embedded English->German toy corpus."
        )

    splits = {}
    for split in loaded:
        where = origin or f"{FILE_FLAGS[split]} {given_files[split]}"
        splits[split] = _as_translation_rows(loaded[split], where, request)
    if request.guided_alignment and "train" in splits:  # before any split is cut or shuffled: line i is pair i
        train = splits["train"]
        try:
            lines = read_alignment_file(request.guided_alignment, len(train))
        except AlignmentFileError as error:
            raise DataSourceError(str(error)) from None
        splits["train"] = train.add_column("alignment", lines)
    if "validation" in needed and "validation" not in splits and "train" in splits:
        splits.update(_cut_validation_split(splits["train"], request))
    for split in needed:
        if split not in splits:
            if origin:
                have = ", ".join(sorted(loaded)) or "none"
                raise DataSourceError(f"{origin}: no {split!r} split (it has: {have}).")
            raise DataSourceError(f"{FILE_FLAGS[split]}: needed for this run ({split} pairs), but not given.")
    return _limited(splits, (*needed, *optional), request)


def _limited(splits: dict, wanted: tuple[str, ...], request: CorpusRequest) -> DatasetDict | IterableDatasetDict:
    """The wanted splits the data has, cut to --max_train_samples / --max_eval_samples / --max_predict_samples."""
    limits = {"train": request.max_train_samples, "validation": request.max_eval_samples,
              "test": request.max_predict_samples}  # fmt: skip
    corpus = IterableDatasetDict() if request.streaming else DatasetDict()
    for split in SPLITS:
        if split in wanted and split in splits:
            dataset, limit = splits[split], limits[split]
            if limit and request.streaming:
                dataset = dataset.take(limit)
            elif limit:
                dataset = dataset.select(range(min(limit, len(dataset))))
            corpus[split] = dataset
    return corpus


def _cut_validation_split(train: Dataset, request: CorpusRequest) -> dict[str, Dataset]:
    percentage = request.validation_split_percentage
    flag = f"--validation_split_percentage {percentage}"
    if request.streaming:
        raise DataSourceError(
            f"{flag}: holding out a percentage needs the corpus size, which --streaming does not know; give a "
            "validation split (--validation_file, or a dataset that has one)."
        )
    if not 0 < percentage < 100:
        raise DataSourceError(f"{flag}: the data has no validation split; give a percentage between 1 and 99.")
    held_out = max(1, len(train) * percentage // 100)
    if held_out >= len(train):
        raise DataSourceError(f"{flag}: {len(train)} training pairs are too few to hold out {held_out}.")
    parts = train.train_test_split(test_size=held_out, seed=request.seed, shuffle=True)
    return {"train": parts["train"], "validation": parts["test"]}


__all__ = ["CorpusRequest", "DataSourceError", "ParallelDataError", "load_corpus"]
