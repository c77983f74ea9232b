"""The data a training run reads, prepared before anything is written: corpora, the tokenizer (trained once and
cached), tokenised training and held-out splits, in memory or streamed."""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset
from datasets import config as datasets_config
from datasets.distributed import split_dataset_by_node
from transformers import (
    AutoTokenizer,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging

from ..checkpoint_io_hf_attention import replacing_folder
from ..data import LengthReport, tokenize_pairs
from ..data.batching import TokenBatchStream, token_lengths
from ..data.preprocessing import tokenize_stream
from ..data.sources import CorpusRequest, load_corpus
from ..data.subword_regularization import check_bpe_dropout
from ..data.tokenization import check_tokenizer_source, train_tokenizer
from .arguments import DataArguments, ModelArguments, PaperTrainingArguments, Phases, TrainingArgumentError

logger = logging.get_logger(__name__)


def corpus_request(model_args: ModelArguments, data_args: DataArguments, seed: int) -> CorpusRequest:
    return CorpusRequest(
        **{name: getattr(data_args, name) for name in DATA_SOURCE_FLAGS},
        max_train_samples=data_args.max_train_samples or 0,
        max_eval_samples=data_args.max_eval_samples or 0,
        max_predict_samples=data_args.max_predict_samples or 0,
        cache_dir=model_args.cache_dir,
        token=model_args.token,
        seed=seed,
    )


DATA_SOURCE_FLAGS = ("source_lang", "target_lang", "dataset_name", "dataset_config_name", "train_file",
                     "validation_file", "test_file", "source_column", "target_column", "validation_split_percentage",
                     "toy_corpus", "toy_train_size", "toy_eval_size", "streaming", "guided_alignment")  # fmt: skip


def load_tokenizer(
    model_args: ModelArguments, train_corpus: Dataset | None, data_args: DataArguments, training_args
) -> PreTrainedTokenizerBase:
    """The tokenizer of --tokenizer_name / --model_name_or_path, or one trained on the training pairs.

    A trained tokenizer is kept in the datasets cache under a key of the training data's fingerprint and the
    tokenizer's settings: the main process trains it once, the others (and later runs on the same data) load it.
    """
    flag = "--tokenizer_name" if model_args.tokenizer_name else "--model_name_or_path"
    name = model_args.tokenizer_name or model_args.model_name_or_path
    if name:
        try:
            check_tokenizer_source(flag, name)
        except ValueError as error:
            raise TrainingArgumentError(str(error)) from None
        revision = model_args.model_revision if name == model_args.model_name_or_path else "main"
        return AutoTokenizer.from_pretrained(
            name, cache_dir=model_args.cache_dir, revision=revision, token=model_args.token,
            trust_remote_code=model_args.trust_remote_code,
        )  # fmt: skip
    languages = (data_args.source_lang, data_args.target_lang)
    if data_args.tokenizer_train_samples and data_args.tokenizer_train_samples < len(train_corpus):
        train_corpus = train_corpus.select(range(data_args.tokenizer_train_samples))
    settings = [train_corpus._fingerprint, model_args.vocab_size, model_args.tokenizer_model, *languages]
    folder = Path(model_args.cache_dir or datasets_config.HF_DATASETS_CACHE) / "hf_attention_tokenizers"
    folder /= hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:16]
    with training_args.main_process_first(local=False, desc="training the tokenizer"):
        redo = data_args.overwrite_cache and training_args.process_index == 0  # the others load what it made
        if folder.is_dir() and not redo:
            tokenizer = AutoTokenizer.from_pretrained(folder)
        else:
            texts = (
                pair[lang]
                for rows in train_corpus.iter(batch_size=1000)  # a batch at a time: the corpus may not fit in memory
                for pair in rows["translation"]
                for lang in languages
            )
            trained = train_tokenizer(texts, vocab_size=model_args.vocab_size, model=model_args.tokenizer_model)
            with replacing_folder(folder) as staging:
                trained.save_pretrained(staging)
            tokenizer = AutoTokenizer.from_pretrained(folder)  # as later runs load it: the same preprocessing cache
    if len(tokenizer) > model_args.vocab_size:
        raise TrainingArgumentError(
            f"--vocab_size {model_args.vocab_size}: the training text alone needs {len(tokenizer)} entries (its "
            f"characters and 4 special tokens); use at least {len(tokenizer)}."
        )
    return tokenizer


@dataclass
class PreparedData:
    """Everything the run reads, checked and tokenised before anything is written (None: a split not used)."""

    tokenizer: PreTrainedTokenizerBase
    train_dataset: Dataset | None
    eval_dataset: Dataset | None
    length_report: LengthReport | str | None
    scored_split: str | None  # the held-out split scored at the end: test, else validation
    scored_sources: list[str]
    scored_references: list[str]
    bpe_dropout: float = 0.0  # the training pairs keep their text, to be segmented anew in each batch
    max_lengths: tuple[int, int] = (0, 0)  # the most source and target tokens per pair, </s> included


def needed_splits(phases: Phases) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(splits the run cannot do without, splits it uses when the data has them)."""
    if phases.train:
        test = ("test",)
        return ("train", "validation", *(test if phases.test_required else ())), () if phases.test_required else test
    return tuple(split for split, wanted in (("validation", phases.evaluate), ("test", phases.predict)) if wanted), ()


def prepare_data(
    model_args: ModelArguments, data_args: DataArguments, training_args: PaperTrainingArguments, phases: Phases
) -> PreparedData:
    """Read the corpora, load or train the tokenizer, tokenise the training and validation pairs (cached)."""
    needed, optional = needed_splits(phases)
    request = corpus_request(model_args, data_args, training_args.seed)
    corpus = load_corpus(request, needed, optional)
    if data_args.streaming:
        return prepare_stream(corpus, model_args, data_args, training_args)
    tokenizer = load_tokenizer(model_args, corpus.get("train"), data_args, training_args)
    check_subword_regularization(tokenizer, data_args)
    label_pad = -100 if data_args.ignore_pad_token_for_loss else tokenizer.pad_token_id
    options = {"source_prefix": data_args.source_prefix, "pad_to_max_length": data_args.pad_to_max_length,
               "label_pad_token_id": label_pad, "num_proc": data_args.preprocessing_num_workers,
               "load_from_cache_file": not data_args.overwrite_cache}  # fmt: skip
    languages = (data_args.source_lang, data_args.target_lang)
    train_dataset = length_report = None
    with training_args.main_process_first(local=False, desc="tokenizing the data"):
        if "train" in corpus:
            train_dataset, length_report = tokenize_pairs(
                corpus["train"], tokenizer, *languages, max_length=data_args.max_source_length,
                too_long=data_args.too_long, max_target_length=data_args.max_target_length,
                keep_text=data_args.bpe_dropout > 0, **options,
            )  # fmt: skip
            if len(train_dataset) == 0:
                raise TrainingArgumentError(
                    f"--max_source_length {data_args.max_source_length} / --max_target_length "
                    f"{data_args.max_target_length}: every training pair is longer ({length_report}); raise them or "
                    "pass --too_long truncate."
                )
            logger.warning(f"Training data: {length_report}.")
            check_max_tokens(training_args.max_tokens, train_dataset)
        return held_out_data(corpus, tokenizer, train_dataset, length_report, data_args, options)


def check_subword_regularization(tokenizer: PreTrainedTokenizerBase, data_args: DataArguments) -> None:
    """--bpe_dropout needs a BPE tokenizer of the `tokenizers` library."""
    try:
        check_bpe_dropout(tokenizer, data_args.bpe_dropout)
    except ValueError as error:
        raise TrainingArgumentError(str(error)) from None


def check_max_tokens(max_tokens: int | None, train_dataset: Dataset) -> None:
    """--max_tokens must hold the longest kept pair, or that pair would fit in no batch."""
    if not max_tokens:
        return
    longest = max(int(token_lengths(train_dataset, column).max()) for column in ("input_ids", "labels"))
    if longest > max_tokens:
        raise TrainingArgumentError(
            f"--max_tokens {max_tokens}: the longest kept training pair has {longest} tokens on one side; raise "
            f"--max_tokens to at least {longest}, or lower --max_source_length / --max_target_length."
        )


def prepare_stream(
    corpus, model_args: ModelArguments, data_args: DataArguments, training_args: PaperTrainingArguments
) -> PreparedData:
    """--streaming: the training pairs stay a stream, shuffled in a buffer, tokenised on the fly and split across
    processes; the tokenizer is trained on a sample, and the (small) validation and test splits are read whole."""
    languages = (data_args.source_lang, data_args.target_lang)
    held_out = {split: Dataset.from_list(list(corpus[split])) for split in ("validation", "test") if split in corpus}
    tokenizer_sample = None
    if "train" in corpus and not (model_args.tokenizer_name or model_args.model_name_or_path):
        samples = data_args.tokenizer_train_samples or DEFAULT_STREAMING_TOKENIZER_SAMPLES
        tokenizer_sample = Dataset.from_list(list(corpus["train"].take(samples)))
    tokenizer = load_tokenizer(model_args, tokenizer_sample, data_args, training_args)
    check_subword_regularization(tokenizer, data_args)
    label_pad = -100 if data_args.ignore_pad_token_for_loss else tokenizer.pad_token_id
    options = {"source_prefix": data_args.source_prefix, "pad_to_max_length": data_args.pad_to_max_length,
               "label_pad_token_id": label_pad}  # fmt: skip
    train_dataset = None
    if "train" in corpus:
        stream = corpus["train"].shuffle(seed=training_args.seed, buffer_size=data_args.shuffle_buffer_size)
        train_dataset = tokenize_stream(
            stream, tokenizer, *languages, max_length=data_args.max_source_length, too_long=data_args.too_long,
            max_target_length=data_args.max_target_length, keep_text=data_args.bpe_dropout > 0, **options,
        )  # fmt: skip
        train_dataset = split_dataset_by_node(
            train_dataset, rank=training_args.process_index, world_size=training_args.world_size
        )
        if training_args.max_tokens:  # each process cuts its own part into token batches, a pool at a time
            train_dataset = TokenBatchStream(
                train_dataset, training_args.max_tokens, data_args.shuffle_buffer_size, training_args.seed
            )
    return held_out_data(held_out, tokenizer, train_dataset, STREAMED, data_args, options)


def held_out_data(
    splits, tokenizer, train_dataset, length_report, data_args: DataArguments, options: dict
) -> PreparedData:
    """The prepared data, with the validation pairs tokenised and the split to score at the end (test, else
    validation) kept as text."""
    languages = (data_args.source_lang, data_args.target_lang)
    eval_dataset = None
    if "validation" in splits:
        eval_dataset, _ = tokenize_pairs(
            splits["validation"], tokenizer, *languages, max_length=data_args.max_source_length,
            max_target_length=data_args.val_max_target_length or data_args.max_target_length, **options,
        )  # fmt: skip
    scored_split = "test" if "test" in splits else "validation" if "validation" in splits else None
    scored_pairs = splits[scored_split]["translation"] if scored_split else []
    return PreparedData(
        tokenizer=tokenizer,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        length_report=length_report,
        scored_split=scored_split,
        scored_sources=[data_args.source_prefix + pair[languages[0]] for pair in scored_pairs],
        scored_references=[pair[languages[1]] for pair in scored_pairs],
        bpe_dropout=data_args.bpe_dropout,
        max_lengths=(data_args.max_source_length, data_args.max_target_length or data_args.max_source_length),
    )


DEFAULT_STREAMING_TOKENIZER_SAMPLES = 100_000


STREAMED = "streamed: pairs not counted"
