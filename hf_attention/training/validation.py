"""The training job's checks of its flags, each made once, before anything is read or written: choices, ranges,
combinations, and whether checkpoint averaging can find the checkpoints it is asked to average."""

import math

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from ..configuration_hf_attention import PRESETS, require_positive_integers
from .arguments import (
    ATTENTION_KERNELS,
    DTYPES,
    DataArguments,
    ModelArguments,
    PaperTrainingArguments,
    TrainingArgumentError,
    parse_config_overrides,
    requested_phases,
    unsupported_speed_options,
)


def validate_arguments(
    model_args: ModelArguments, data_args: DataArguments, training_args: PaperTrainingArguments
) -> None:
    """Check every flag the job itself interprets, before anything is read or written."""
    validate_averaging(training_args)
    choices = {
        "--preset": (model_args.preset, sorted(PRESETS)),
        "--tokenizer_model": (model_args.tokenizer_model, ["bpe", "unigram"]),
        "--too_long": (data_args.too_long, ["drop", "truncate"]),
        "--dtype": (model_args.dtype, list(DTYPES)),
        "--generation_length_penalty_style": (training_args.generation_length_penalty_style, ["gnmt", "transformers"]),
    }
    if model_args.attn_implementation is not None:
        choices["--attn_implementation"] = (model_args.attn_implementation, ATTENTION_KERNELS)
    for flag, (value, allowed) in choices.items():
        if value not in allowed:
            raise TrainingArgumentError(f"{flag} {value!r}: choose one of {', '.join(allowed)}.")
    minimums = {  # flag: (value, least allowed, why); a flag left unset (None) is not checked
        "--vocab_size": (model_args.vocab_size, 5, "4 special tokens and at least 1 subword"),
        "--max_source_length": (data_args.max_source_length, 2, "one token and </s>"),
        "--max_target_length": (data_args.max_target_length, 2, "one token and </s>"),
        "--val_max_target_length": (data_args.val_max_target_length, 2, "one token and </s>"),
        "--max_tokens": (training_args.max_tokens, 2, "one token and </s>"),
        "--toy_train_size": (data_args.toy_train_size, 1, "at least one pair"),
        "--toy_eval_size": (data_args.toy_eval_size, 1, "at least one pair"),
        "--max_train_samples": (data_args.max_train_samples, 1, "at least one pair"),
        "--max_eval_samples": (data_args.max_eval_samples, 0, "0 means all"),
        "--max_predict_samples": (data_args.max_predict_samples, 1, "at least one pair"),
        "--validation_split_percentage": (data_args.validation_split_percentage, 0, "a percentage"),
        "--num_beams": (data_args.num_beams, 1, "a positive number"),
        "--preprocessing_num_workers": (data_args.preprocessing_num_workers, 1, "at least one process"),
    }
    positive = ("generation_num_beams", "generation_max_length", "per_device_train_batch_size",
                "per_device_eval_batch_size", "generation_max_new_tokens_over_source")  # fmt: skip
    require_positive_integers({f"--{flag}": getattr(training_args, flag) for flag in positive}, TrainingArgumentError)
    for flag, (value, minimum, why) in minimums.items():
        if value is not None and value < minimum:
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
            raise TrainingArgumentError(f"--train_sampling_strategy {training_args.train_sampling_strategy} with "
                                        "--streaming: a stream is read in order (shuffled in --shuffle_buffer_size); "
                                        "drop the flag.")  # fmt: skip
        if training_args.world_size > 1 and training_args.dataloader_num_workers:
            raise TrainingArgumentError(f"--dataloader_num_workers {training_args.dataloader_num_workers} with "
                                        "--streaming on several processes: they agree before each batch whether all "
                                        "have one, in the training process; use 0.")  # fmt: skip
    if data_args.guided_alignment and not training_args.guided_alignment_weight > 0:
        raise TrainingArgumentError(f"--guided_alignment_weight {training_args.guided_alignment_weight}: must be "
                                    "positive (leave --guided_alignment out to train without it).")  # fmt: skip
    if training_args.max_train_minutes < 0:
        raise TrainingArgumentError(
            f"--max_train_minutes {training_args.max_train_minutes:g}: must be 0 (no limit) or more."
        )
    cooldown, budget = training_args.lr_cooldown_minutes, training_args.max_train_minutes
    if cooldown and not 0 < cooldown <= budget:
        raise TrainingArgumentError(f"--lr_cooldown_minutes {cooldown:g}: must be 0 (off), or above 0 and at most "
                                    f"--max_train_minutes ({budget:g}; 0: no budget to cool down in).")  # fmt: skip
    if cooldown and training_args.lr_scheduler_type == "reduce_lr_on_plateau":
        raise TrainingArgumentError(f"--lr_cooldown_minutes {cooldown:g} with --lr_scheduler_type "
                                    "reduce_lr_on_plateau: the cool-down scales a step schedule.")  # fmt: skip
    if training_args.r_drop_alpha < 0:
        raise TrainingArgumentError(f"--r_drop_alpha {training_args.r_drop_alpha}: must be 0 (off) or more.")
    if not 0 <= training_args.ema_decay < 1:
        raise TrainingArgumentError(f"--ema_decay {training_args.ema_decay}: must be 0 (off), or above 0 and below 1.")
    if training_args.r_drop_alpha and data_args.guided_alignment:
        raise TrainingArgumentError(f"--r_drop_alpha {training_args.r_drop_alpha} with --guided_alignment: the two "
                                    "losses are not combined yet; give one.")  # fmt: skip
    if not 0 <= data_args.bpe_dropout < 1:
        raise TrainingArgumentError(f"--bpe_dropout {data_args.bpe_dropout}: must be 0 (off), or above 0 and below 1 "
                                    "(the paper: 0.1).")  # fmt: skip
    if data_args.bpe_dropout and data_args.guided_alignment:
        raise TrainingArgumentError(f"--bpe_dropout {data_args.bpe_dropout} with --guided_alignment: the word links "
                                    "name the usual segmentation's subwords; give one.")  # fmt: skip
    if data_args.bpe_dropout and data_args.pad_to_max_length:
        raise TrainingArgumentError(f"--bpe_dropout {data_args.bpe_dropout} with --pad_to_max_length: each batch is "
                                    "segmented anew and padded to its longest; give one.")  # fmt: skip
    if not requested_phases(training_args).train and not model_args.model_name_or_path:
        raise TrainingArgumentError(
            "--do_eval / --do_predict without --do_train evaluate a trained model: give --model_name_or_path."
        )
    parse_config_overrides(model_args.config_overrides)


def validate_averaging(training_args: PaperTrainingArguments, steps_per_epoch: int | None = None) -> None:
    """--average_last_n_checkpoints N needs N checkpoints to exist at the end of the run, and to be kept. Where the
    count depends on the data (--save_strategy epoch, or training by epochs), it is checked once `steps_per_epoch`
    (optimizer steps) is known: the job calls this again then, before training."""
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
    saved = planned_checkpoints(training_args, steps_per_epoch)
    if saved is not None and saved < wanted:
        if training_args.save_strategy == "epoch":
            how = f"--save_strategy epoch over {saved} epoch{'s' if saved != 1 else ''}"
        else:
            how = f"--save_steps {training_args.save_steps:g} over {total_steps(training_args, steps_per_epoch)} steps"
        raise TrainingArgumentError(f"{flag}: {how} saves {saved} checkpoint{'s' if saved != 1 else ''}.")


def total_steps(training_args: PaperTrainingArguments, steps_per_epoch: int | None) -> int | None:
    """The optimizer steps the run takes: --max_steps, else --num_train_epochs × steps per epoch (None: unknown)."""
    if training_args.max_steps > 0:
        return training_args.max_steps
    if steps_per_epoch is None:
        return None
    return math.ceil(training_args.num_train_epochs * steps_per_epoch)


def planned_checkpoints(training_args: PaperTrainingArguments, steps_per_epoch: int | None = None) -> int | None:
    """How many checkpoints the run saves, as transformers decides (None: unknown until the data is).

    --save_strategy steps saves every `save_steps` steps (a fraction below 1: of all the steps, rounded up) and at
    the last step; --save_strategy epoch at the end of every epoch begun."""
    steps = total_steps(training_args, steps_per_epoch)
    if steps is None:
        return None
    if training_args.save_strategy == "epoch":
        if steps_per_epoch is None:
            return None
        return math.ceil(steps / steps_per_epoch)
    interval = training_args.save_steps
    interval = math.ceil(steps * interval) if interval < 1 else int(interval)
    return math.ceil(steps / max(interval, 1))
