"""The main job: train (or fine-tune) a translation Transformer on parallel text, evaluate it, document it.

Reads local parallel text (or generates the embedded toy corpus), trains a joint subword tokenizer, trains with
`Seq2SeqTrainer` and the paper's recipe (`PaperTrainingArguments`), scores BLEU/chrF before and after, and writes the
model, tokenizer, loss/BLEU curves, a results JSON and a model card into `--output_dir`. Runs unchanged on one
process or many (`accelerate launch`, `torchrun`).
"""

import dataclasses
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from accelerate import PartialState
from huggingface_hub.errors import StrictDataclassError
from transformers import (
    AutoConfig,
    AutoModelForSeq2SeqLM,
    DataCollatorForSeq2Seq,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TrainerCallback,
    set_seed,
)
from transformers.utils import logging

from .. import hardware
from ..checkpoint_io_hf_attention import replacing_folder
from ..configuration_hf_attention import HfAttentionConfig
from ..data import ParallelDataError
from ..data.alignments import GuidedAlignmentCollator
from ..data.batching import PaddingCounter, PaddingFractionCallback
from ..data.sources import DataSourceError
from ..data.subword_regularization import BpeDropoutCollator
from ..hub.model_card import ModelCardFacts, write_model_card
from ..hub.publishing import PublishArguments, publish
from ..inference.allocator import reuse_freed_memory
from ..metrics.evaluation import build_compute_metrics, score_translations, translate
from ..modeling_hf_attention import HfAttentionForConditionalGeneration
from .arguments import (
    DTYPES,
    DataArguments,
    ModelArguments,
    PaperTrainingArguments,
    Phases,
    TrainingArgumentError,
    parse_arguments,
    parse_config_overrides,
    requested_phases,
)
from .checkpoint_averaging import CheckpointAveragingError, find_checkpoints
from .plots import plot_training_curves
from .prepare import PreparedData, prepare_data
from .regularization import EMA_WEIGHTS_NAME
from .run_folder import OutputFolderError, RunFolder, plan_run_folder
from .trainer import CheckpointSafeSeq2SeqTrainer, FsdpUnsupportedError, WallClockCallback, steps_per_epoch
from .validation import planned_checkpoints, validate_arguments, validate_averaging

logger = logging.get_logger(__name__)


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
    bleu_after: float  # cased sacreBLEU
    chrf_after: float
    bleu_signature: str
    chrf_signature: str
    length_report: str
    bleu_lowercase_after: float | None = None  # the same on lowercased text: what papers on small sets report
    bleu_lowercase_signature: str | None = None


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


def build_trainer(
    model: PreTrainedModel,
    data: PreparedData,
    training_args: PaperTrainingArguments,
    folder: RunFolder | None,
    callbacks: list[TrainerCallback] | None,
    started: float,
    label_pad_token_id: int = -100,
    guided: tuple[int, int, float] | None = None,
) -> CheckpointSafeSeq2SeqTrainer:
    """The trainer, writing checkpoints into the run's folder; the user's `training_args` stay as they are. `guided`:
    guided-alignment training's (layer, head, weight) (`guided_alignment_setting`)."""
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
    data_collator = GuidedAlignmentCollator(padding) if guided else padding
    if data.bpe_dropout:  # the training pairs segmented anew in each batch, then padded (and counted)
        data_collator = BpeDropoutCollator(padding, data.tokenizer, data.bpe_dropout, *data.max_lengths)
    return CheckpointSafeSeq2SeqTrainer(
        model=model,
        args=trainer_args,
        train_dataset=data.train_dataset,
        eval_dataset=data.eval_dataset,
        data_collator=data_collator,
        processing_class=data.tokenizer,
        compute_metrics=build_compute_metrics(data.tokenizer),
        callbacks=[
            WallClockCallback(started, training_args.max_train_minutes, training_args.lr_cooldown_minutes),
            PaddingFractionCallback(padding),
            *(callbacks or []),
        ],
        guided_alignment=guided,
    )


def carries_alignments(data: PreparedData) -> bool:
    """Whether the training pairs carry word alignments (`--guided_alignment`)."""
    return "alignment" in (getattr(data.train_dataset, "column_names", None) or ())  # a stream may not know them


def guided_alignment_setting(model: PreTrainedModel, training_args: PaperTrainingArguments) -> tuple[int, int, float]:
    """(layer, head, weight) of guided-alignment training, checked against the model.

    Raises:
        TrainingArgumentError: a layer or head the model does not have.
    """
    layers, heads = model.config.decoder_layers, model.config.decoder_attention_heads
    layer = training_args.guided_alignment_layer
    layer = max(layers - 2, 0) if layer is None else layer  # the penultimate, as `align` reads by default
    if not 0 <= layer < layers:
        raise TrainingArgumentError(f"--guided_alignment_layer {layer}: the decoder has layers 0 to {layers - 1}.")
    head = training_args.guided_alignment_head
    if not 0 <= head < heads:
        raise TrainingArgumentError(f"--guided_alignment_head {head}: the cross-attention has heads 0 to "
                                    f"{heads - 1}.")  # fmt: skip
    return layer, head, training_args.guided_alignment_weight


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


def set_decoding_defaults(
    model: PreTrainedModel, data_args: DataArguments, training_args: PaperTrainingArguments, tokenizer
) -> PaperTrainingArguments:
    """§6.1's decoding (beam search with a length penalty, outputs at most the source length + 50 tokens), and
    run_translation's --num_beams, --val_max_target_length and --forced_bos_token, in the generation config.

    Returns:
        the training arguments with the evaluation's beams and length filled in: a copy, never the user's object
        written into.
    """
    settings = {}
    if data_args.num_beams is not None:
        settings["generation_num_beams"] = data_args.num_beams
    if training_args.generation_max_length is None:
        settings["generation_max_length"] = data_args.val_max_target_length or data_args.max_target_length
    if settings:
        training_args = dataclasses.replace(training_args, **settings)
    generation_config = model.generation_config
    # The config is ours now, not one derived from the model's: transformers' loading drops every field it does not
    # know (length_penalty_style, max_new_tokens_over_source, ...) from a config saved as "_from_model_config".
    generation_config._from_model_config = False
    generation_config.max_length = training_args.generation_max_length
    generation_config.num_beams = training_args.generation_num_beams
    if generation_config.num_beams and generation_config.num_beams > 1:  # transformers refuses it for greedy search
        generation_config.length_penalty = training_args.generation_length_penalty
        generation_config.length_penalty_style = training_args.generation_length_penalty_style
    generation_config.max_new_tokens_over_source = training_args.generation_max_new_tokens_over_source
    if data_args.forced_bos_token:
        token_id = tokenizer.convert_tokens_to_ids(data_args.forced_bos_token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise TrainingArgumentError(f"--forced_bos_token {data_args.forced_bos_token}: not in the vocabulary.")
        generation_config.forced_bos_token_id = model.config.forced_bos_token_id = token_id
    return training_args


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
    training_args = set_decoding_defaults(model, data_args, training_args, data.tokenizer)
    files = {}
    if phases.evaluate:
        files |= final_evaluation(build_trainer(model, data, training_args, None, None, started))
    leave_process_group_together()  # the main process alone predicts and writes
    if training_args.process_index != 0:
        return
    if phases.predict:
        began = time.perf_counter()
        scores, translations = held_out_scores(model, data, training_args)
        files |= prediction_files(scores, translations, time.perf_counter() - began)
    output_dir.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():  # each file appears whole, or not at all
        staging = output_dir / f".{name}.writing"
        staging.write_text(text, encoding="utf-8")
        staging.replace(output_dir / name)
        logger.warning(f"Wrote {output_dir / name}.")


def leave_process_group_together() -> None:
    """Every process's last collective is a barrier; then it leaves the process group (now, not at interpreter exit).

    Waiting in the barrier (without the GIL), gloo's worker threads free what the collectives before it held. A process
    that tore its group down straight after an evaluation's gather could deadlock: torch's ~ProcessGroupGloo, run under
    the GIL, waited for a worker that waited for the GIL to free a gathered tensor (once in ~50 two-process runs here).
    """
    state = PartialState()
    state.wait_for_everyone()
    state.destroy_process_group()


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
    attention = hardware.training_attention(training_args.training_device, training_args.precision_used)
    if attention and not model_args.attn_implementation:  # a kernel named with --attn_implementation wins
        model.set_attn_implementation(attention)
        logger.warning(f"Attention: {attention} (faster than SDPA's CPU kernel for bf16 training).")
    training_args = training_args.with_paper_learning_rate(model.config.d_model)
    training_args = set_decoding_defaults(model, data_args, training_args, data.tokenizer)
    guided = guided_alignment_setting(model, training_args) if carries_alignments(data) else None
    if guided is not None:  # `align` (translate.py --alignments) reads the head that learned to align
        model.generation_config.alignment_layer, model.generation_config.alignment_head = guided[:2]

    if training_args.average_last_n_checkpoints and planned_checkpoints(training_args) is None:
        validate_averaging(training_args, steps_per_epoch(data.train_dataset, training_args))  # needed the data

    # Every input is valid: from here on the run writes, into its own folder (see training/run_folder.py).
    with training_args.main_process_first(local=False):
        if training_args.process_index == 0:
            folder.clear_unfinished_replacement()
    label_pad = -100 if data_args.ignore_pad_token_for_loss else data.tokenizer.pad_token_id
    trainer = build_trainer(model, data, training_args, folder, callbacks, started, label_pad, guided)
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
    averaging_failed = None
    moving_average = training_args.ema_decay > 0 and training_args.ema_final_model
    if moving_average and not training_args.average_last_n_checkpoints:
        trainer.weight_average.copy_to(trainer.model)  # the smoothed weights are the final model
    if training_args.average_last_n_checkpoints:  # §6.1: the final model averages the last checkpoints
        try:
            trainer.average_checkpoints_into_model(
                find_checkpoints([folder.checkpoints_dir], training_args.average_last_n_checkpoints),
                EMA_WEIGHTS_NAME if moving_average else "model.safetensors",
            )
        except CheckpointAveragingError as error:  # the trained weights are still worth keeping
            averaging_failed = f"--average_last_n_checkpoints {training_args.average_last_n_checkpoints}: {error}"
            if moving_average:
                trainer.weight_average.copy_to(trainer.model)
            kept = "the moving average" if moving_average else "the last weights"
            averaging_failed += f"; the final model in {folder.output_dir} holds {kept}, not the average"
            logger.error(f"{averaging_failed}.")
    files = final_evaluation(trainer) if phases.evaluate else {}
    model = trainer.whole_model()
    leave_process_group_together()  # the main process alone saves, scores and writes
    if model is None:  # not the main process: its part is done
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
            bleu_lowercase_after=scores["bleu_lowercase"],
            bleu_lowercase_signature=scores["bleu_lowercase_signature"],
        )
        examples = write_report(final_dir, summary, data, translations, trainer, model, model_args, data_args)
    folder.finish()
    trainer.accelerator.end_training()  # its trackers finish
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
    if averaging_failed:
        raise AveragingFailedError(f"{averaging_failed}.")
    return summary


class AveragingFailedError(RuntimeError):
    """Training finished and its last weights were saved, but the checkpoints could not be averaged."""


def describe(summary: RunSummary) -> str:
    before = "not scored" if summary.bleu_before is None else f"{summary.bleu_before:.1f}"
    return (
        f"\n{summary.parameters / 1e6:.2f}M parameters, {summary.steps} steps on "
        f"{'a stream of' if summary.train_pairs is None else summary.train_pairs} pairs "
        f"({summary.length_report}), {summary.seconds:.0f}s in all\n"
        f"{summary.scored_split} BLEU {before} -> {summary.bleu_after:.1f} (cased sacreBLEU), lowercased BLEU "
        f"{summary.bleu_lowercase_after:.1f}, chrF {summary.chrf_after:.1f}\n"
        f"  {summary.bleu_signature}\n  {summary.bleu_lowercase_signature}\n  {summary.chrf_signature}\n"
        f"model, tokenizer, model card, curves and results in {summary.output_dir}"
    )


def main(argv: list[str] | None = None) -> None:
    model_args, data_args, training_args = parse_arguments(argv)
    reuse_freed_memory()  # the job owns its process: each step reuses the last one's memory (inference/allocator.py)
    try:
        summary = run(model_args, data_args, training_args)
    except (
        DataSourceError,
        FsdpUnsupportedError,
        OutputFolderError,
        ParallelDataError,
        TrainingArgumentError,
        AveragingFailedError,
    ) as error:
        sys.exit(f"error: {error}")
    if summary is not None:
        print(describe(summary))
