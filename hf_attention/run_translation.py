"""The main job: train (or fine-tune) a translation Transformer on parallel text, evaluate it, document it.

Reads local parallel text (or generates the embedded toy corpus), trains a joint subword tokenizer, trains with
`Seq2SeqTrainer` and the paper's recipe (`PaperTrainingArguments`), scores BLEU/chrF before and after, and writes the
model, tokenizer, loss/BLEU curves, a results JSON and a model card into `--output_dir`. Runs unchanged on one
process or many (`accelerate launch`, `torchrun`).
"""

import dataclasses
import difflib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from datasets import Dataset
from huggingface_hub.errors import StrictDataclassError
from transformers import (
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    HfArgumentParser,
    PreTrainedTokenizerBase,
    TrainerCallback,
    set_seed,
)
from transformers.utils import logging

from .checkpoint_averaging import average_into_model, find_checkpoints
from .checkpoint_io_hf_attention import replacing_folder
from .configuration_hf_attention import PRESETS, HfAttentionConfig
from .data import LengthReport, ParallelDataError, read_parallel_corpus, tokenize_pairs, toy_translation_dataset
from .evaluation import build_compute_metrics, score_translations, translate
from .model_card import ModelCardFacts, write_model_card
from .modeling_hf_attention import HfAttentionForConditionalGeneration
from .plots import plot_training_curves
from .run_folder import OutputFolderError, RunFolder, plan_run_folder
from .tokenization import check_tokenizer_source, train_tokenizer
from .training import CheckpointSafeSeq2SeqTrainer, PaperTrainingArguments, WallClockCallback

logger = logging.get_logger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default="", metadata={"help": "Fine-tune this checkpoint (folder or Hub id); empty: train from scratch."}
    )
    preset: str = field(default="tiny", metadata={"help": "From scratch: model size, tiny, base or big (Table 3)."})
    config_overrides: str = field(
        default="", metadata={"help": "From scratch: config fields, e.g. 'd_model=128,encoder_layers=3,dropout=0.2'."}
    )
    tokenizer_name: str = field(default="", metadata={"help": "Use this saved tokenizer instead of training one."})
    vocab_size: int = field(default=8000, metadata={"help": "Subwords in the trained joint vocabulary."})
    tokenizer_model: str = field(default="bpe", metadata={"help": "Subword model to train: bpe or unigram."})


@dataclass
class DataArguments:
    train_file: str = field(
        default="",
        metadata={"help": "A .tsv or .jsonl file, or a prefix P of P.SRC / P.TGT; empty: the embedded toy corpus."},
    )
    validation_file: str = field(default="", metadata={"help": "Like train_file; scored during training."})
    test_file: str = field(default="", metadata={"help": "Like train_file; scored before and after training."})
    source_lang: str = field(default="en", metadata={"help": "Source language code."})
    target_lang: str = field(default="de", metadata={"help": "Target language code."})
    max_length: int = field(default=128, metadata={"help": "Most tokens per side, </s> included."})
    too_long: str = field(default="drop", metadata={"help": "Training pairs beyond max_length: drop or truncate."})
    toy_train_size: int = field(default=20000, metadata={"help": "Toy corpus: training pairs."})
    toy_eval_size: int = field(default=200, metadata={"help": "Toy corpus: validation and test pairs each."})
    max_eval_samples: int = field(default=500, metadata={"help": "Validation pairs scored during training (0: all)."})
    test_before_training: bool = field(
        default=True,
        metadata={"help": "Score the test set before training too (an untrained model decodes slowly: minutes)."},
    )
    dataset_name: str = field(default="", metadata={"help": "Dataset name for the model card."})
    data_terms: str = field(default="", metadata={"help": "The data's licence or terms of use, for the model card."})
    license: str = field(
        default="",
        metadata={"help": "The model's licence for the model card (default: apache-2.0; 'other' for Multi30k)."},
    )


@dataclass
class RunSummary:
    output_dir: str
    parameters: int
    train_pairs: int
    steps: int
    seconds: float
    test_sentences: int
    example_source: str
    bleu_before: float | None
    bleu_after: float
    chrf_after: float
    bleu_signature: str
    chrf_signature: str
    length_report: str


def parse_arguments(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, PaperTrainingArguments]:
    parser = HfArgumentParser((ModelArguments, DataArguments, PaperTrainingArguments))
    return parser.parse_args_into_dataclasses(args=argv)


class TrainingArgumentError(ValueError):
    """A flag whose value the run cannot honour; the message names the flag, the value and what is allowed."""


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
    minimums = {
        "--vocab_size": (model_args.vocab_size, 5, "4 special tokens and at least 1 subword"),
        "--max_length": (data_args.max_length, 2, "one token and </s>"),
        "--toy_train_size": (data_args.toy_train_size, 1, "at least one pair"),
        "--toy_eval_size": (data_args.toy_eval_size, 1, "at least one pair"),
        "--max_eval_samples": (data_args.max_eval_samples, 0, "0 means all"),
    }
    for flag in ("generation_num_beams", "generation_max_length", "per_device_train_batch_size",
                 "per_device_eval_batch_size", "generation_max_new_tokens_over_source"):  # fmt: skip
        value = getattr(training_args, flag)
        if value is not None and value < 1:
            minimums[f"--{flag}"] = (value, 1, "a positive number")
    for flag, (value, minimum, why) in minimums.items():
        if value < minimum:
            raise TrainingArgumentError(f"{flag} {value}: must be at least {minimum} ({why}).")
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


def load_corpora(data_args: DataArguments, seed: int) -> dict:
    """train / validation / test `Dataset`s of `{"translation": {...}}` rows, from files or the toy corpus."""
    corpora = {}
    for split, path, toy_size, toy_seed in (
        ("train", data_args.train_file, data_args.toy_train_size, seed),
        ("validation", data_args.validation_file, data_args.toy_eval_size, seed + 1),
        ("test", data_args.test_file, data_args.toy_eval_size, seed + 2),
    ):
        if path:
            corpora[split] = read_parallel_corpus(path, data_args.source_lang, data_args.target_lang)
        elif data_args.train_file:
            raise ParallelDataError(f"--train_file is given, so --{split}_file must be given too.")
        else:
            corpora[split] = toy_translation_dataset(toy_size, seed=toy_seed)
            if (data_args.source_lang, data_args.target_lang) != ("en", "de"):
                raise ParallelDataError("The toy corpus is English->German: use --source_lang en --target_lang de.")
    return corpora


def load_tokenizer(model_args: ModelArguments, train_corpus, data_args: DataArguments) -> PreTrainedTokenizerBase:
    flag = "--tokenizer_name" if model_args.tokenizer_name else "--model_name_or_path"
    name = model_args.tokenizer_name or model_args.model_name_or_path
    if name:
        try:
            check_tokenizer_source(flag, name)
        except ValueError as error:
            raise TrainingArgumentError(str(error)) from None
        return AutoTokenizer.from_pretrained(name)
    languages = (data_args.source_lang, data_args.target_lang)
    texts = (pair[lang] for pair in train_corpus["translation"] for lang in languages)
    tokenizer = train_tokenizer(texts, vocab_size=model_args.vocab_size, model=model_args.tokenizer_model)
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


def load_model(model_args: ModelArguments, tokenizer: PreTrainedTokenizerBase) -> HfAttentionForConditionalGeneration:
    if model_args.model_name_or_path:
        return AutoModelForSeq2SeqLM.from_pretrained(model_args.model_name_or_path)
    try:
        config = HfAttentionConfig.from_preset(
            model_args.preset,
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.bos_token_id,
            **parse_config_overrides(model_args.config_overrides),
        )
    except (StrictDataclassError, TypeError, ValueError) as error:
        message = " ".join(str(error).split())
        raise TrainingArgumentError(f"--config_overrides {model_args.config_overrides!r}: {message}") from None
    return HfAttentionForConditionalGeneration(config)


@dataclass
class PreparedData:
    """Everything the run reads, checked and tokenised before anything is written."""

    tokenizer: PreTrainedTokenizerBase
    train_dataset: Dataset
    eval_dataset: Dataset
    length_report: LengthReport
    test_sources: list[str]
    test_references: list[str]


def prepare_data(model_args: ModelArguments, data_args: DataArguments, seed: int) -> PreparedData:
    """Read the corpora, load or train the tokenizer, tokenise training and validation pairs."""
    corpora = load_corpora(data_args, seed)
    tokenizer = load_tokenizer(model_args, corpora["train"], data_args)
    languages = (data_args.source_lang, data_args.target_lang)
    train_dataset, length_report = tokenize_pairs(
        corpora["train"], tokenizer, *languages, max_length=data_args.max_length, too_long=data_args.too_long
    )
    if len(train_dataset) == 0:
        raise TrainingArgumentError(
            f"--max_length {data_args.max_length}: every training pair is longer ({length_report}); raise it or "
            "pass --too_long truncate."
        )
    validation = corpora["validation"]
    if data_args.max_eval_samples:
        validation = validation.select(range(min(data_args.max_eval_samples, len(validation))))
    eval_dataset, _ = tokenize_pairs(validation, tokenizer, *languages, max_length=data_args.max_length)
    logger.warning(f"Training data: {length_report}.")
    test_pairs = corpora["test"]["translation"]
    return PreparedData(
        tokenizer=tokenizer,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        length_report=length_report,
        test_sources=[pair[data_args.source_lang] for pair in test_pairs],
        test_references=[pair[data_args.target_lang] for pair in test_pairs],
    )


def build_trainer(
    model: HfAttentionForConditionalGeneration,
    data: PreparedData,
    training_args: PaperTrainingArguments,
    folder: RunFolder,
    callbacks: list[TrainerCallback] | None,
    started: float,
) -> CheckpointSafeSeq2SeqTrainer:
    """The trainer, writing checkpoints into the run's folder; the user's `training_args` stay as they are."""
    trainer_args = dataclasses.replace(
        training_args,
        output_dir=str(folder.checkpoints_dir),
        # BLEU before training, as the curve's first point (a resumed run has it already)
        eval_on_start=training_args.eval_on_start
        or (not folder.resume_from_checkpoint and training_args.eval_strategy != "no"),
    )
    return CheckpointSafeSeq2SeqTrainer(
        model=model,
        args=trainer_args,
        train_dataset=data.train_dataset,
        eval_dataset=data.eval_dataset,
        data_collator=DataCollatorForSeq2Seq(data.tokenizer, model=model),
        processing_class=data.tokenizer,
        compute_metrics=build_compute_metrics(data.tokenizer),
        callbacks=[WallClockCallback(started), *(callbacks or [])],
    )


def test_scores(model, data: PreparedData, training_args: PaperTrainingArguments) -> tuple[dict, list[str]]:
    """The same beam search before and after training, on the whole test set."""
    beams, length = training_args.generation_num_beams or 1, training_args.generation_max_length or 128
    translations = translate(model, data.tokenizer, data.test_sources, num_beams=beams, max_new_tokens=length)
    return score_translations(translations, data.test_references), translations


def write_report(
    final_dir: Path,
    summary: RunSummary,
    data: PreparedData,
    translations: list[str],
    trainer: CheckpointSafeSeq2SeqTrainer,
    model_args: ModelArguments,
    data_args: DataArguments,
) -> list[tuple[str, str, str]]:
    """results.json (with the card's facts, for publishing), the training curves and the model card."""
    examples = list(zip(data.test_sources, translations, data.test_references, strict=True))[:5]
    facts = ModelCardFacts.from_run(summary, model_args, data_args, trainer.args, trainer.model.config)
    results = {**asdict(summary), "examples": examples, "model_card": asdict(facts)}
    (final_dir / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    plot_training_curves(trainer.state.log_history, final_dir / "training_curves.png")
    write_model_card(final_dir, facts)
    return examples


def run(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: PaperTrainingArguments,
    callbacks: list[TrainerCallback] | None = None,
) -> RunSummary | None:
    """Train and evaluate; returns the summary on the main process (None on the others).

    Args:
        callbacks: extra `TrainerCallback`s for the trainer (e.g. to inspect every process's parameters).
    """
    started = time.perf_counter()
    validate_arguments(model_args, data_args, training_args)
    inputs = {
        "--train_file": data_args.train_file,
        "--validation_file": data_args.validation_file,
        "--test_file": data_args.test_file,
        "--model_name_or_path": model_args.model_name_or_path if Path(model_args.model_name_or_path).exists() else "",
        "--tokenizer_name": model_args.tokenizer_name if Path(model_args.tokenizer_name).exists() else "",
    }
    folder = plan_run_folder(
        training_args.output_dir, training_args.overwrite_output_dir, training_args.resume_from_checkpoint, inputs
    )
    set_seed(training_args.seed)
    data = prepare_data(model_args, data_args, training_args.seed)
    model = load_model(model_args, data.tokenizer)
    training_args.resolve_learning_rate(model.config.d_model)
    # §6.1's decoding: beam search with a length penalty, outputs at most the source length + 50 tokens.
    generation_config = model.generation_config
    generation_config.max_length = training_args.generation_max_length
    generation_config.num_beams = training_args.generation_num_beams
    if generation_config.num_beams and generation_config.num_beams > 1:  # transformers refuses it for greedy search
        generation_config.length_penalty = training_args.generation_length_penalty
    generation_config.max_new_tokens_over_source = training_args.generation_max_new_tokens_over_source

    # Every input is valid: from here on the run writes, into its own folder (see run_folder.py).
    with training_args.main_process_first(local=False):
        if training_args.process_index == 0:
            folder.clear_unfinished_replacement()
    trainer = build_trainer(model, data, training_args, folder, callbacks, started)
    resume = folder.resume_from_checkpoint
    bleu_before = (
        test_scores(model, data, training_args)[0]["bleu"]
        if trainer.is_world_process_zero() and not resume and data_args.test_before_training
        else None
    )
    train_result = trainer.train(resume_from_checkpoint=resume)
    if not trainer.is_world_process_zero():
        trainer.save_model(str(folder.work_dir))  # takes part in gathering sharded weights; writes nothing
        return None

    if training_args.average_last_n_checkpoints:  # §6.1: the final model averages the last checkpoints
        average_into_model(
            trainer.model, find_checkpoints([folder.checkpoints_dir], training_args.average_last_n_checkpoints)
        )
    # Saved as max_new_tokens, so callers that pass max_new_tokens (pipelines do) get no max_length clash.
    generation_config = trainer.model.generation_config
    generation_config.max_new_tokens, generation_config.max_length = training_args.generation_max_length, None
    # The final model, tokenizer, results, curves and card appear together, or not at all.
    with replacing_folder(folder.work_dir) as final_dir:
        trainer.save_model(str(final_dir))
        scores, translations = test_scores(trainer.model, data, training_args)
        summary = RunSummary(
            output_dir=str(folder.output_dir),
            parameters=trainer.model.num_parameters(),
            train_pairs=len(data.train_dataset),
            steps=train_result.global_step,
            seconds=round(time.perf_counter() - started, 1),
            test_sentences=len(data.test_sources),
            example_source=data.test_sources[0],
            bleu_before=bleu_before,
            bleu_after=scores["bleu"],
            chrf_after=scores["chrf"],
            bleu_signature=scores["bleu_signature"],
            chrf_signature=scores["chrf_signature"],
            length_report=str(data.length_report),
        )
        examples = write_report(final_dir, summary, data, translations, trainer, model_args, data_args)
    folder.finish()
    for source, translation, reference in examples:
        print(f"\n  {data_args.source_lang}:  {source}\n  model:  {translation}\n  ref:    {reference}")
    return summary


def describe(summary: RunSummary) -> str:
    before = "not scored" if summary.bleu_before is None else f"{summary.bleu_before:.1f}"
    return (
        f"\n{summary.parameters / 1e6:.2f}M parameters, {summary.steps} steps on {summary.train_pairs} pairs "
        f"({summary.length_report}), {summary.seconds:.0f}s in all\n"
        f"test BLEU {before} -> {summary.bleu_after:.1f}, chrF {summary.chrf_after:.1f}\n"
        f"  {summary.bleu_signature}\n  {summary.chrf_signature}\n"
        f"model, tokenizer, model card, curves and results in {summary.output_dir}"
    )


def main(argv: list[str] | None = None) -> None:
    model_args, data_args, training_args = parse_arguments(argv)
    try:
        summary = run(model_args, data_args, training_args)
    except (OutputFolderError, ParallelDataError, TrainingArgumentError) as error:
        sys.exit(f"error: {error}")
    if summary is not None:
        print(describe(summary))
