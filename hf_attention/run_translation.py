"""The main job: train (or fine-tune) a translation Transformer on parallel text, evaluate it, document it.

Reads local parallel text (or generates the embedded toy corpus), trains a joint subword tokenizer, trains with
`Seq2SeqTrainer` and the paper's recipe (`PaperTrainingArguments`), scores BLEU/chrF before and after, and writes the
model, tokenizer, loss/BLEU curves, a results JSON and a model card into `--output_dir`. Runs unchanged on one
process or many (`accelerate launch`, `torchrun`).
"""

import dataclasses
import difflib
import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from datasets import Dataset
from datasets import config as datasets_config
from datasets.distributed import split_dataset_by_node
from huggingface_hub.errors import HFValidationError, StrictDataclassError
from huggingface_hub.utils import validate_repo_id
from transformers import (
    AutoConfig,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    HfArgumentParser,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TrainerCallback,
    set_seed,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import logging

from . import hardware
from .checkpoint_averaging import find_checkpoints
from .checkpoint_io_hf_attention import replacing_folder
from .configuration_hf_attention import PRESETS, HfAttentionConfig
from .data import LengthReport, ParallelDataError, tokenize_pairs
from .data.batching import PaddingCounter, PaddingFractionCallback, TokenBatchStream, token_lengths
from .data.preprocessing import tokenize_stream
from .data.sources import CorpusRequest, DataSourceError, load_corpus
from .evaluation import build_compute_metrics, score_translations, translate
from .model_card import ModelCardFacts, write_model_card
from .modeling_hf_attention import HfAttentionForConditionalGeneration
from .plots import plot_training_curves
from .publishing import PublishArguments, publish
from .run_folder import OutputFolderError, RunFolder, plan_run_folder
from .tokenization import check_tokenizer_source, train_tokenizer
from .training import (
    CheckpointSafeSeq2SeqTrainer,
    FsdpUnsupportedError,
    PaperTrainingArguments,
    WallClockCallback,
    unsupported_speed_options,
)

logger = logging.get_logger(__name__)


@dataclass
class ModelArguments:
    """The model and tokenizer: run_translation's flags, plus the sizes of a model trained from scratch."""

    model_name_or_path: str = field(
        default="", metadata={"help": "Fine-tune this checkpoint (folder or Hub id); empty: train from scratch."}
    )
    config_name: str = field(
        default="", metadata={"help": "From scratch: start from this config (folder or Hub id) instead of --preset."}
    )
    preset: str = field(default="tiny", metadata={"help": "From scratch: model size, tiny, base or big (Table 3)."})
    config_overrides: str = field(
        default="", metadata={"help": "From scratch: config fields, e.g. 'd_model=128,encoder_layers=3,dropout=0.2'."}
    )
    tokenizer_name: str = field(default="", metadata={"help": "Use this saved tokenizer instead of training one."})
    vocab_size: int = field(default=8000, metadata={"help": "Subwords in the trained joint vocabulary."})
    tokenizer_model: str = field(default="bpe", metadata={"help": "Subword model to train: bpe or unigram."})
    cache_dir: str | None = field(
        default=None, metadata={"help": "Where downloaded models and datasets and the preprocessed data are cached."}
    )
    model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of the model to load."})
    token: str | None = field(default=None, metadata={"help": "Hub token for private models and datasets."})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow a Hub model's own code to run (for models transformers lacks)."}
    )
    use_fast_tokenizer: bool = field(
        default=True, metadata={"help": "Accepted for run_translation compatibility; tokenizers here are fast."}
    )
    dtype: str = field(
        default="auto", metadata={"help": "Weights' dtype when loading: auto, float32, bfloat16 or float16."}
    )
    attn_implementation: str | None = field(
        default=None, metadata={"help": "Attention kernel: eager, sdpa, flex_attention (or flash where installed)."}
    )


@dataclass
class DataArguments:
    """The data: run_translation's flags, plus the toy corpus, flat tables and the model card's facts."""

    source_lang: str = field(default="en", metadata={"help": "Source language code (a key of 'translation')."})
    target_lang: str = field(default="de", metadata={"help": "Target language code (a key of 'translation')."})
    dataset_name: str = field(
        default="", metadata={"help": "A datasets dataset: Hub id, local dataset folder or save_to_disk folder."}
    )
    dataset_config_name: str = field(default="", metadata={"help": "The dataset's config, e.g. de-en for wmt14."})
    train_file: str = field(
        default="",
        metadata={"help": "A .json, .jsonl, .csv, .parquet or .tsv file, or a prefix P of P.SRC / P.TGT text files."},
    )
    validation_file: str = field(default="", metadata={"help": "Like train_file; scored during training."})
    test_file: str = field(default="", metadata={"help": "Like train_file; scored at the end (--do_predict)."})
    source_column: str = field(default="", metadata={"help": "Flat tables: the column holding the source text."})
    target_column: str = field(default="", metadata={"help": "Flat tables: the column holding the target text."})
    validation_split_percentage: int = field(
        default=5, metadata={"help": "Percent of the training pairs held out when the data has no validation split."}
    )
    toy_corpus: bool = field(
        default=False, metadata={"help": "Train on the embedded English->German toy corpus (the demo)."}
    )
    streaming: bool = field(
        default=False,
        metadata={
            "help": "Read and tokenise the data lazily as training goes (corpora larger than memory); needs "
            "--max_steps and a validation split."
        },  # fmt: skip
    )
    shuffle_buffer_size: int = field(
        default=10000,
        metadata={
            "help": "--streaming: pairs held to shuffle the stream (datasets' buffer_size); with --max_tokens, also "
            "the pairs sorted by length together to cut token batches from."
        },  # fmt: skip
    )
    tokenizer_train_samples: int | None = field(
        default=None,
        metadata={
            "help": "Train the tokenizer on the first N training pairs (default: all; 100000 with --streaming)."
        },
    )
    overwrite_cache: bool = field(default=False, metadata={"help": "Redo the cached preprocessing."})
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes that tokenize the data (datasets' num_proc)."}
    )
    max_source_length: int = field(default=128, metadata={"help": "Most source tokens per pair, </s> included."})
    max_target_length: int = field(default=128, metadata={"help": "Most target tokens per pair, </s> included."})
    val_max_target_length: int | None = field(
        default=None,
        metadata={
            "help": "Most target tokens of validation and test pairs, and generation's default maximum "
            "(default: --max_target_length)."
        },  # fmt: skip
    )
    pad_to_max_length: bool = field(
        default=False, metadata={"help": "Pad every pair to the maximum lengths rather than each batch's longest."}
    )
    too_long: str = field(default="drop", metadata={"help": "Training pairs beyond the maximum: drop or truncate."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training pairs."})
    max_eval_samples: int | None = field(
        default=500, metadata={"help": "Validation pairs scored during training (0 or None: all)."}
    )
    max_predict_samples: int | None = field(default=None, metadata={"help": "Use only the first N test pairs."})
    num_beams: int | None = field(
        default=None, metadata={"help": "Beams for evaluation and prediction (default: --generation_num_beams)."}
    )
    ignore_pad_token_for_loss: bool = field(
        default=True, metadata={"help": "Pad labels with -100 so that padding does not count in the loss."}
    )
    source_prefix: str = field(default="", metadata={"help": "Text put before every source sentence (T5-style)."})
    forced_bos_token: str = field(
        default="", metadata={"help": "A token forced as the first generated one (a target-language tag)."}
    )
    toy_train_size: int = field(default=20000, metadata={"help": "Toy corpus: training pairs."})
    toy_eval_size: int = field(default=200, metadata={"help": "Toy corpus: validation and test pairs each."})
    test_before_training: bool = field(
        default=True,
        metadata={"help": "Score the test set before training too (an untrained model decodes slowly: minutes)."},
    )
    data_terms: str = field(default="", metadata={"help": "The data's licence or terms of use, for the model card."})
    license: str = field(
        default="",
        metadata={"help": "The model's licence for the model card (default: apache-2.0; 'other' for Multi30k)."},
    )


@dataclass
class RunSummary:
    output_dir: str
    parameters: int
    train_pairs: int | None  # None: streamed, not counted
    steps: int
    seconds: float
    scored_split: str  # test, or validation when the data has no test split
    test_sentences: int
    example_source: str
    bleu_before: float | None
    bleu_after: float
    chrf_after: float
    bleu_signature: str
    chrf_signature: str
    length_report: str


ARGUMENTS_FILE_SUFFIXES = (".json", ".yaml", ".yml")


class ArgumentParser(HfArgumentParser):
    """`HfArgumentParser` whose errors are one line: the flag, the value and what is allowed, without the usage of
    every training argument above it."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> ArgumentParser:
    return ArgumentParser((ModelArguments, DataArguments, PaperTrainingArguments))


def _closest_flag(parser: ArgumentParser, flag: str) -> str:
    options = [option for action in parser._actions for option in action.option_strings if option.startswith("--")]
    close = difflib.get_close_matches(flag, options, n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else "; see --help"


def parse_arguments(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, PaperTrainingArguments]:
    """Flags as run_translation.py takes them, or a single .json / .yaml file of them (`train.py args.json`).

    An unknown flag exits with the closest valid one named.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if len(argv) == 1 and argv[0].lower().endswith(ARGUMENTS_FILE_SUFFIXES):
        path = Path(argv[0])
        if not path.is_file():
            parser.error(f"{argv[0]}: no such arguments file.")
        parse = parser.parse_json_file if path.suffix.lower() == ".json" else parser.parse_yaml_file
        try:
            return parse(path, allow_extra_keys=False)
        except ValueError as error:  # "Some keys are not used by the HfArgumentParser: ['lerning_rate']"
            unknown = str(error).partition(": ")[2].strip("[]'\" ")
            if not unknown or "not used" not in str(error):
                parser.error(f"{path}: {error}")
            key = unknown.split("'")[0]
            parser.error(f"{path}: unknown key {key!r}{_closest_flag(parser, '--' + key).replace('--', '')}")
    argv = bf16_auto_as_precision(argv)
    try:
        *parsed, unknown = parser.parse_args_into_dataclasses(
            args=argv, return_remaining_strings=True, look_for_args_file=False
        )
    except ValueError as error:  # a value a dataclass refused while it was built, e.g. --precision
        parser.error(str(error).strip().splitlines()[0])
    if unknown:
        flag = unknown[0].partition("=")[0]
        parser.error(f"unrecognized argument {flag}{_closest_flag(parser, flag)}")
    return tuple(parsed)


def bf16_auto_as_precision(argv: list[str]) -> list[str]:
    """`--bf16 auto` (or `--bf16=auto`) is `--precision auto`: transformers' --bf16 is a yes/no flag."""
    rewritten = []
    for index, argument in enumerate(argv):
        if argument == "--bf16=auto":
            rewritten += ["--precision", "auto"]
        elif argument == "auto" and index and argv[index - 1] == "--bf16":
            rewritten[-1:] = ["--precision", "auto"]
        else:
            rewritten.append(argument)
    return rewritten


class TrainingArgumentError(ValueError):
    """A flag whose value the run cannot honour; the message names the flag, the value and what is allowed."""


ATTENTION_KERNELS = ["eager", *(name for name in ALL_ATTENTION_FUNCTIONS if "|" not in name)]
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Phases:
    """What the job does: run_translation's --do_train / --do_eval / --do_predict (all three when none is given)."""

    train: bool
    evaluate: bool
    predict: bool
    test_required: bool  # --do_predict needs a test split; the whole job scores validation when there is none


def requested_phases(training_args: PaperTrainingArguments) -> Phases:
    """The phases asked for. transformers sets `do_eval` itself whenever `--eval_strategy` is not "no", so
    `do_eval` alone asks for an evaluation-only run only with `--eval_strategy no`."""
    explicit_eval = training_args.do_eval and training_args.eval_strategy == "no"
    if not (training_args.do_train or training_args.do_predict or explicit_eval):
        return Phases(train=True, evaluate=False, predict=True, test_required=False)  # the whole job
    return Phases(
        train=training_args.do_train,
        evaluate=training_args.do_eval,
        predict=training_args.do_predict,
        test_required=training_args.do_predict,
    )


# Config fields the job sets from the tokenizer; `--config_overrides` may not set them.
TOKENIZER_FIELDS = ("vocab_size", "decoder_vocab_size", "pad_token_id", "bos_token_id", "eos_token_id",
                    "decoder_start_token_id")  # fmt: skip


def validate_arguments(
    model_args: ModelArguments, data_args: DataArguments, training_args: PaperTrainingArguments
) -> None:
    """Check every flag the job itself interprets, before anything is read or written."""
    validate_averaging(training_args)
    choices = {
        "--preset": (model_args.preset, sorted(PRESETS)),
        "--tokenizer_model": (model_args.tokenizer_model, ["bpe", "unigram"]),
        "--too_long": (data_args.too_long, ["drop", "truncate"]),
    }
    for flag, (value, allowed) in choices.items():
        if value not in allowed:
            raise TrainingArgumentError(f"{flag} {value!r}: choose one of {', '.join(allowed)}.")
    if model_args.attn_implementation is not None:
        choices["--attn_implementation"] = (model_args.attn_implementation, ATTENTION_KERNELS)
    choices["--dtype"] = (model_args.dtype, list(DTYPES))
    for flag, (value, allowed) in choices.items():
        if value not in allowed:
            raise TrainingArgumentError(f"{flag} {value!r}: choose one of {', '.join(allowed)}.")
    minimums = {
        "--vocab_size": (model_args.vocab_size, 5, "4 special tokens and at least 1 subword"),
        "--max_source_length": (data_args.max_source_length, 2, "one token and </s>"),
        "--max_target_length": (data_args.max_target_length, 2, "one token and </s>"),
        "--toy_train_size": (data_args.toy_train_size, 1, "at least one pair"),
        "--toy_eval_size": (data_args.toy_eval_size, 1, "at least one pair"),
        "--validation_split_percentage": (data_args.validation_split_percentage, 0, "a percentage"),
    }
    optional_minimums = {
        "--val_max_target_length": (data_args.val_max_target_length, 2, "one token and </s>"),
        "--max_train_samples": (data_args.max_train_samples, 1, "at least one pair"),
        "--max_eval_samples": (data_args.max_eval_samples, 0, "0 means all"),
        "--max_predict_samples": (data_args.max_predict_samples, 1, "at least one pair"),
        "--num_beams": (data_args.num_beams, 1, "a positive number"),
        "--preprocessing_num_workers": (data_args.preprocessing_num_workers, 1, "at least one process"),
        "--max_tokens": (training_args.max_tokens, 2, "one token and </s>"),
    }
    minimums |= {flag: limit for flag, limit in optional_minimums.items() if limit[0] is not None}
    for flag in ("generation_num_beams", "generation_max_length", "per_device_train_batch_size",
                 "per_device_eval_batch_size", "generation_max_new_tokens_over_source"):  # fmt: skip
        value = getattr(training_args, flag)
        if value is not None and value < 1:
            minimums[f"--{flag}"] = (value, 1, "a positive number")
    for flag, (value, minimum, why) in minimums.items():
        if value < minimum:
            raise TrainingArgumentError(f"{flag} {value}: must be at least {minimum} ({why}).")
    if data_args.validation_split_percentage > 99:
        raise TrainingArgumentError(
            f"--validation_split_percentage {data_args.validation_split_percentage}: must be at most 99."
        )
    if training_args.push_to_hub and training_args.hub_model_id:
        try:
            validate_repo_id(training_args.hub_model_id)
        except HFValidationError as error:
            raise TrainingArgumentError(f"--hub_model_id {training_args.hub_model_id}: {error}") from None
    for problem in unsupported_speed_options(training_args):
        raise TrainingArgumentError(problem)
    if data_args.streaming:
        if training_args.max_steps <= 0:
            raise TrainingArgumentError("--streaming: the number of pairs is unknown, so give --max_steps.")
        longest = max(data_args.max_source_length, data_args.max_target_length or data_args.max_source_length)
        if training_args.max_tokens and training_args.max_tokens < longest:
            raise TrainingArgumentError(
                f"--max_tokens {training_args.max_tokens} with --streaming: a streamed pair may have up to {longest} "
                "tokens on one side (--max_source_length / --max_target_length); raise --max_tokens or lower those."
            )
        if training_args.train_sampling_strategy != "random":
            raise TrainingArgumentError(
                f"--train_sampling_strategy {training_args.train_sampling_strategy} with --streaming: a stream is "
                "read in order (shuffled in --shuffle_buffer_size); drop the flag."
            )
    if not requested_phases(training_args).train and not model_args.model_name_or_path:
        raise TrainingArgumentError(
            "--do_eval / --do_predict without --do_train evaluate a trained model: give --model_name_or_path."
        )
    parse_config_overrides(model_args.config_overrides)


def validate_averaging(training_args: PaperTrainingArguments) -> None:
    """--average_last_n_checkpoints N needs N checkpoints to exist at the end of the run, and to be kept."""
    wanted = training_args.average_last_n_checkpoints
    flag = f"--average_last_n_checkpoints {wanted}"
    if wanted < 0:
        raise TrainingArgumentError(f"{flag}: must be 0 (no averaging) or more.")
    if not wanted:
        return
    if training_args.save_strategy != "steps" and training_args.save_strategy != "epoch":
        raise TrainingArgumentError(f"{flag}: the run saves no checkpoints (--save_strategy no).")
    kept = training_args.save_total_limit
    if kept is not None and kept < wanted:
        raise TrainingArgumentError(f"{flag}: --save_total_limit {kept} keeps only {kept} checkpoints.")
    if training_args.save_strategy == "steps" and training_args.max_steps > 0:
        saved = math.ceil(training_args.max_steps / training_args.save_steps)  # the last step is saved too
        if saved < wanted:
            raise TrainingArgumentError(
                f"{flag}: --max_steps {training_args.max_steps} with --save_steps {training_args.save_steps:g} "
                f"saves {saved} checkpoints."
            )


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
                     "toy_corpus", "toy_train_size", "toy_eval_size", "streaming")  # fmt: skip


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


def parse_config_overrides(overrides: str) -> dict:
    """'d_model=128,dropout=0.2,normalize_before=true' -> typed values (JSON literals, else strings).

    Raises:
        TrainingArgumentError: an item without '=', a name that is not a config field, or a field set from the
            tokenizer.
    """
    known = {config_field.name for config_field in dataclasses.fields(HfAttentionConfig)}
    fields = {}
    for item in filter(None, (part.strip() for part in overrides.split(","))):
        name, separator, value = (part.strip() for part in item.partition("="))
        if not separator:
            raise TrainingArgumentError(f"--config_overrides {item!r}: expected name=value.")
        if name in TOKENIZER_FIELDS:
            raise TrainingArgumentError(
                f"--config_overrides {name}={value}: {name} comes from the tokenizer; use --vocab_size to size it."
            )
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f"did you mean {close[0]!r}?" if close else "see HfAttentionConfig for the fields"
            raise TrainingArgumentError(f"--config_overrides {name}={value}: no config field {name!r}; {hint}")
        try:
            fields[name] = json.loads(value)
        except json.JSONDecodeError:
            fields[name] = value
    return fields


def load_model(model_args: ModelArguments, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """The checkpoint of --model_name_or_path, or a new model from --config_name or --preset and the tokenizer."""
    loading = {"cache_dir": model_args.cache_dir, "token": model_args.token,
               "trust_remote_code": model_args.trust_remote_code}  # fmt: skip
    if model_args.attn_implementation:
        loading["attn_implementation"] = model_args.attn_implementation
    if model_args.model_name_or_path:
        model = AutoModelForSeq2SeqLM.from_pretrained(
            model_args.model_name_or_path, revision=model_args.model_revision, dtype=model_args.dtype, **loading
        )
        if model.get_input_embeddings().weight.shape[0] < len(tokenizer):  # as run_translation does
            model.resize_token_embeddings(len(tokenizer))
        return model
    token_ids = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
                 "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                 "decoder_start_token_id": tokenizer.bos_token_id}  # fmt: skip
    overrides = parse_config_overrides(model_args.config_overrides)
    try:
        if model_args.config_name:
            base = AutoConfig.from_pretrained(model_args.config_name, **loading).to_dict()
            for name in ("model_type", "transformers_version", "architectures", "auto_map", "dtype"):
                base.pop(name, None)
            config = HfAttentionConfig(**(base | token_ids | overrides))
        else:
            config = HfAttentionConfig.from_preset(model_args.preset, **token_ids, **overrides)
    except (StrictDataclassError, TypeError, ValueError) as error:
        message = " ".join(str(error).split())
        flag = f"--config_name {model_args.config_name}" if model_args.config_name else "--config_overrides"
        raise TrainingArgumentError(f"{flag} {model_args.config_overrides!r}: {message}") from None
    if model_args.attn_implementation:
        config._attn_implementation = model_args.attn_implementation
    model = HfAttentionForConditionalGeneration(config)
    dtype = DTYPES[model_args.dtype]
    return model.to(dtype) if dtype is not None else model


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
                too_long=data_args.too_long, max_target_length=data_args.max_target_length, **options,
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
    label_pad = -100 if data_args.ignore_pad_token_for_loss else tokenizer.pad_token_id
    options = {"source_prefix": data_args.source_prefix, "pad_to_max_length": data_args.pad_to_max_length,
               "label_pad_token_id": label_pad}  # fmt: skip
    train_dataset = None
    if "train" in corpus:
        stream = corpus["train"].shuffle(seed=training_args.seed, buffer_size=data_args.shuffle_buffer_size)
        train_dataset = tokenize_stream(
            stream, tokenizer, *languages, max_length=data_args.max_source_length, too_long=data_args.too_long,
            max_target_length=data_args.max_target_length, **options,
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
    )


DEFAULT_STREAMING_TOKENIZER_SAMPLES = 100_000
STREAMED = "streamed: pairs not counted"


def build_trainer(
    model: PreTrainedModel,
    data: PreparedData,
    training_args: PaperTrainingArguments,
    folder: RunFolder | None,
    callbacks: list[TrainerCallback] | None,
    started: float,
    label_pad_token_id: int = -100,
) -> CheckpointSafeSeq2SeqTrainer:
    """The trainer, writing checkpoints into the run's folder; the user's `training_args` stay as they are."""
    changes = {"push_to_hub": False}  # the job publishes the finished folder itself (see `run`)
    if folder is not None:
        changes["output_dir"] = str(folder.checkpoints_dir)
        # BLEU before training, as the curve's first point (a resumed run has it already)
        changes["eval_on_start"] = training_args.eval_on_start or (
            not folder.resume_from_checkpoint and training_args.eval_strategy != "no"
        )
    trainer_args = dataclasses.replace(training_args, **changes)
    collator = DataCollatorForSeq2Seq(data.tokenizer, model=model, label_pad_token_id=label_pad_token_id)
    padding = PaddingCounter(collator, data.tokenizer.pad_token_id, label_pad_token_id)
    return CheckpointSafeSeq2SeqTrainer(
        model=model,
        args=trainer_args,
        train_dataset=data.train_dataset,
        eval_dataset=data.eval_dataset,
        data_collator=padding,
        processing_class=data.tokenizer,
        compute_metrics=build_compute_metrics(data.tokenizer),
        callbacks=[WallClockCallback(started), PaddingFractionCallback(padding), *(callbacks or [])],
    )


def held_out_scores(model, data: PreparedData, training_args: PaperTrainingArguments) -> tuple[dict, list[str]]:
    """The same beam search before and after training, on the whole held-out split (test, else validation)."""
    beams, length = training_args.generation_num_beams or 1, training_args.generation_max_length or 128
    translations = translate(model, data.tokenizer, data.scored_sources, num_beams=beams, max_new_tokens=length)
    return score_translations(translations, data.scored_references), translations


def prediction_files(scores: dict, translations: list[str], seconds: float) -> dict[str, str]:
    """run_translation's --do_predict outputs: one translation per line, and the metrics under `predict_`."""
    metrics = {f"predict_{name}": value for name, value in scores.items()}
    metrics |= {"predict_samples": len(translations), "predict_runtime": round(seconds, 2)}
    return {
        "generated_predictions.txt": "".join(f"{line}\n" for line in translations),
        "predict_results.json": json.dumps(metrics, indent=2) + "\n",
    }


def final_evaluation(trainer: CheckpointSafeSeq2SeqTrainer) -> dict[str, str]:
    """run_translation's --do_eval output: the validation metrics (BLEU and chrF included) in eval_results.json."""
    metrics = trainer.evaluate(metric_key_prefix="eval")
    metrics["eval_samples"] = len(trainer.eval_dataset)
    return {"eval_results.json": json.dumps(metrics, indent=2) + "\n"}


def write_report(
    final_dir: Path,
    summary: RunSummary,
    data: PreparedData,
    translations: list[str],
    trainer: CheckpointSafeSeq2SeqTrainer,
    model: PreTrainedModel,
    model_args: ModelArguments,
    data_args: DataArguments,
) -> list[tuple[str, str, str]]:
    """results.json (with the card's facts, for publishing), the training curves and the model card."""
    examples = list(zip(data.scored_sources, translations, data.scored_references, strict=True))[:5]
    facts = ModelCardFacts.from_run(summary, model_args, data_args, trainer.args, model.config)
    results = {**asdict(summary), "examples": examples, "model_card": asdict(facts)}
    (final_dir / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    plot_training_curves(trainer.state.log_history, final_dir / "training_curves.png")
    write_model_card(final_dir, facts)
    return examples


def set_decoding_defaults(model: PreTrainedModel, data_args: DataArguments, training_args, tokenizer) -> None:
    """§6.1's decoding (beam search with a length penalty, outputs at most the source length + 50 tokens), and
    run_translation's --num_beams, --val_max_target_length and --forced_bos_token, in the generation config."""
    if data_args.num_beams is not None:
        training_args.generation_num_beams = data_args.num_beams
    if training_args.generation_max_length is None:
        training_args.generation_max_length = data_args.val_max_target_length or data_args.max_target_length
    generation_config = model.generation_config
    generation_config.max_length = training_args.generation_max_length
    generation_config.num_beams = training_args.generation_num_beams
    if generation_config.num_beams and generation_config.num_beams > 1:  # transformers refuses it for greedy search
        generation_config.length_penalty = training_args.generation_length_penalty
    generation_config.max_new_tokens_over_source = training_args.generation_max_new_tokens_over_source
    if data_args.forced_bos_token:
        token_id = tokenizer.convert_tokens_to_ids(data_args.forced_bos_token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise TrainingArgumentError(f"--forced_bos_token {data_args.forced_bos_token}: not in the vocabulary.")
        generation_config.forced_bos_token_id = model.config.forced_bos_token_id = token_id


def evaluate_only(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: PaperTrainingArguments,
    phases: Phases,
    started: float,
) -> None:
    """--do_eval / --do_predict without --do_train: score --model_name_or_path; write run_translation's result files
    into --output_dir, replacing earlier ones only with --overwrite_output_dir."""
    data = prepare_data(model_args, data_args, training_args, phases)
    output_dir = Path(training_args.output_dir)
    names = (["eval_results.json"] if phases.evaluate else []) + (
        ["generated_predictions.txt", "predict_results.json"] if phases.predict else []
    )
    existing = [name for name in names if (output_dir / name).exists()]
    if existing and not training_args.overwrite_output_dir:
        raise OutputFolderError(
            f"--output_dir {output_dir} already holds {', '.join(existing)}; pass --overwrite_output_dir to replace."
        )
    model = load_model(model_args, data.tokenizer)
    set_decoding_defaults(model, data_args, training_args, data.tokenizer)
    files = {}
    if phases.evaluate:
        files |= final_evaluation(build_trainer(model, data, training_args, None, None, started))
    if phases.predict and training_args.process_index == 0:
        began = time.perf_counter()
        scores, translations = held_out_scores(model, data, training_args)
        files |= prediction_files(scores, translations, time.perf_counter() - began)
    if training_args.process_index == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():  # each file appears whole, or not at all
            staging = output_dir / f".{name}.writing"
            staging.write_text(text, encoding="utf-8")
            staging.replace(output_dir / name)
            logger.warning(f"Wrote {output_dir / name}.")


def run(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: PaperTrainingArguments,
    callbacks: list[TrainerCallback] | None = None,
) -> RunSummary | None:
    """Train and evaluate; returns the summary on the main process (None on the others, and without --do_train).

    Args:
        callbacks: extra `TrainerCallback`s for the trainer (e.g. to inspect every process's parameters).
    """
    started = time.perf_counter()
    validate_arguments(model_args, data_args, training_args)
    phases = requested_phases(training_args)
    if not phases.train:
        evaluate_only(model_args, data_args, training_args, phases, started)
        return None
    inputs = {
        "--train_file": data_args.train_file,
        "--validation_file": data_args.validation_file,
        "--test_file": data_args.test_file,
        "--dataset_name": data_args.dataset_name if Path(data_args.dataset_name).exists() else "",
        "--model_name_or_path": model_args.model_name_or_path if Path(model_args.model_name_or_path).exists() else "",
        "--tokenizer_name": model_args.tokenizer_name if Path(model_args.tokenizer_name).exists() else "",
    }
    folder = plan_run_folder(
        training_args.output_dir, training_args.overwrite_output_dir, training_args.resume_from_checkpoint, inputs
    )
    if training_args.process_index == 0:
        logger.warning(f"{hardware.describe()}; training in {training_args.precision_used}"
                       f"{' (--precision auto)' if training_args.precision == 'auto' else ''}.")  # fmt: skip
    set_seed(training_args.seed)
    data = prepare_data(model_args, data_args, training_args, phases)
    model = load_model(model_args, data.tokenizer)
    training_args.resolve_learning_rate(model.config.d_model)
    set_decoding_defaults(model, data_args, training_args, data.tokenizer)

    # Every input is valid: from here on the run writes, into its own folder (see run_folder.py).
    with training_args.main_process_first(local=False):
        if training_args.process_index == 0:
            folder.clear_unfinished_replacement()
    label_pad = -100 if data_args.ignore_pad_token_for_loss else data.tokenizer.pad_token_id
    trainer = build_trainer(model, data, training_args, folder, callbacks, started, label_pad)
    if training_args.average_last_n_checkpoints and trainer.saves_sharded_checkpoints:
        raise TrainingArgumentError(
            f"--average_last_n_checkpoints {training_args.average_last_n_checkpoints}: averaging reads whole "
            "weights, but FSDP saves one shard per process; set fsdp_state_dict_type: FULL_STATE_DICT in the "
            "accelerate config (or state_dict_type in --fsdp_config), or pass --average_last_n_checkpoints 0."
        )
    resume = folder.resume_from_checkpoint
    bleu_before = (
        held_out_scores(model, data, training_args)[0]["bleu"]
        if trainer.is_world_process_zero() and not resume and data_args.test_before_training
        else None
    )
    train_result = trainer.train(resume_from_checkpoint=resume)
    # Every process takes part in averaging, evaluating and gathering the weights; then the main process alone.
    if training_args.average_last_n_checkpoints:  # §6.1: the final model averages the last checkpoints
        trainer.average_checkpoints_into_model(
            find_checkpoints([folder.checkpoints_dir], training_args.average_last_n_checkpoints)
        )
    files = final_evaluation(trainer) if phases.evaluate else {}
    model = trainer.whole_model()
    if model is None:  # not the main process: its part is done
        # Leaving the process group now, not at interpreter exit, where tearing gloo down can abort the process.
        trainer.accelerator.end_training()
        return None

    # Saved as max_new_tokens, so callers that pass max_new_tokens (pipelines do) get no max_length clash.
    generation_config = model.generation_config
    generation_config.max_new_tokens, generation_config.max_length = training_args.generation_max_length, None
    # The final model, tokenizer, results, curves and card appear together, or not at all.
    with replacing_folder(folder.work_dir) as final_dir:
        trainer.save_whole_model(model, final_dir)
        began = time.perf_counter()
        scores, translations = held_out_scores(model, data, training_args)
        if phases.predict:
            files |= prediction_files(scores, translations, time.perf_counter() - began)
        for name, text in files.items():
            (final_dir / name).write_text(text, encoding="utf-8")
        summary = RunSummary(
            output_dir=str(folder.output_dir),
            parameters=model.num_parameters(),
            train_pairs=None if data_args.streaming else len(data.train_dataset),
            steps=train_result.global_step,
            seconds=round(time.perf_counter() - started, 1),
            scored_split=data.scored_split,
            test_sentences=len(data.scored_sources),
            example_source=data.scored_sources[0],
            bleu_before=bleu_before,
            bleu_after=scores["bleu"],
            chrf_after=scores["chrf"],
            bleu_signature=scores["bleu_signature"],
            chrf_signature=scores["chrf_signature"],
            length_report=str(data.length_report),
        )
        examples = write_report(final_dir, summary, data, translations, trainer, model, model_args, data_args)
    folder.finish()
    trainer.accelerator.end_training()
    if training_args.push_to_hub:  # what scripts/push_to_hub.py publishes: no checkpoints, no pickles, one commit
        repo_id = training_args.hub_model_id or folder.output_dir.name
        publish(
            PublishArguments(
                folder=str(folder.output_dir), repo_id=repo_id, private=bool(training_args.hub_private_repo)
            ),
            token=training_args.hub_token,
        )
        logger.warning(f"Published {folder.output_dir} to the Hub as {repo_id}.")
    for source, translation, reference in examples:
        print(f"\n  {data_args.source_lang}:  {source}\n  model:  {translation}\n  ref:    {reference}")
    return summary


def describe(summary: RunSummary) -> str:
    before = "not scored" if summary.bleu_before is None else f"{summary.bleu_before:.1f}"
    return (
        f"\n{summary.parameters / 1e6:.2f}M parameters, {summary.steps} steps on "
        f"{'a stream of' if summary.train_pairs is None else summary.train_pairs} pairs "
        f"({summary.length_report}), {summary.seconds:.0f}s in all\n"
        f"{summary.scored_split} BLEU {before} -> {summary.bleu_after:.1f}, chrF {summary.chrf_after:.1f}\n"
        f"  {summary.bleu_signature}\n  {summary.chrf_signature}\n"
        f"model, tokenizer, model card, curves and results in {summary.output_dir}"
    )


def main(argv: list[str] | None = None) -> None:
    model_args, data_args, training_args = parse_arguments(argv)
    try:
        summary = run(model_args, data_args, training_args)
    except (
        DataSourceError,
        FsdpUnsupportedError,
        OutputFolderError,
        ParallelDataError,
        TrainingArgumentError,
    ) as error:
        sys.exit(f"error: {error}")
    if summary is not None:
        print(describe(summary))
