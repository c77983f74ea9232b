"""The paper's training recipe (§5.3, §5.4) as `Seq2SeqTrainingArguments` defaults, and a `Seq2SeqTrainer` whose
checkpoints appear only once complete."""

import copy
import math
import os
import shutil
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import datasets
import torch
from accelerate.data_loader import prepare_data_loader
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import FSDPModule
from torch.utils.data import DataLoader
from transformers import (
    PreTrainedModel,
    Seq2SeqTrainer,
    TrainerCallback,
    TrainerState,
)
from transformers.trainer import TRAINER_STATE_NAME, TRAINING_ARGS_NAME
from transformers.trainer_utils import (
    PREFIX_CHECKPOINT_DIR,
    TrainOutput,
    get_last_checkpoint,
    rotate_checkpoints,
    seed_worker,
)
from transformers.utils import logging

from ..data.batching import (
    EvenBatchesAcrossProcesses,
    SentenceBatchStream,
    TokenBatchSampler,
    TokenBatchStream,
    token_lengths,
)
from ..data.subword_regularization import SOURCE_TEXT, TARGET_TEXT, BpeDropoutCollator
from ..modeling_hf_attention import label_smoothed_cross_entropy
from .checkpoint_averaging import average_into_model, average_state_dicts, missing_weights
from .guided_alignment import capture_cross_attention_inputs, guided_alignment_loss, head_log_attention
from .regularization import EMA_WEIGHTS_NAME, MovingAverageCallback, WeightMovingAverage, doubled, symmetric_kl

STAGING_DIR = ".checkpoint-staging"
logger = logging.get_logger(__name__)


@dataclass
class TokenLabelSmoother:
    """transformers' `LabelSmoother` interface over the model's own loss, which cannot turn NaN.

    transformers' `LabelSmoother` divides by the number of target tokens, so a batch without any (every label -100,
    e.g. after filtering) gives 0 / 0 = NaN and poisons every parameter at the next step; ours gives 0.
    """

    epsilon: float = 0.1

    def __call__(self, model_output, labels: torch.Tensor, shift_labels: bool = False, num_items_in_batch=None):
        logits = model_output["logits"] if isinstance(model_output, dict) else model_output[0]
        if shift_labels:
            logits, labels = logits[..., :-1, :], labels[..., 1:]
        return label_smoothed_cross_entropy(logits, labels, self.epsilon, num_items_in_batch)


class WallClockCallback(TrainerCallback):
    """Adds `wall_seconds` (since the job started, across resumes) to every logged entry, so that curves can be drawn
    against time: what "time to a good model" is measured in; with a budget, stops training when it is spent, and
    with a cool-down lets the learning rate fall linearly to 0 over the budget's last minutes.

    The cool-down is the decay of a warmup-stable-decay schedule timed by the clock instead of a step count, so that
    a run stopped by its budget ends annealed whatever the machine's speed: the schedule's learning rate (e.g. eq. 3)
    is multiplied by (budget − elapsed) / cool-down once fewer than cool-down minutes are left.

    Args:
        started: `time.perf_counter()` when the job started (data and tokenizer included); default: training start.
        budget_minutes: stop at the first optimizer step after this many minutes, saving a checkpoint (0: never).
        cooldown_minutes: the budget's last minutes over which the learning rate falls to 0 (0: none).
    """

    clock = staticmethod(time.perf_counter)

    def __init__(self, started: float | None = None, budget_minutes: float = 0.0, cooldown_minutes: float = 0.0):
        self.job_started = started
        self.budget_seconds = budget_minutes * 60
        self.cooldown_seconds = cooldown_minutes * 60
        self.learning_rate_factor = 1.0

    def on_train_begin(self, args, state, control, **kwargs):
        earlier = [entry["wall_seconds"] for entry in state.log_history if "wall_seconds" in entry]
        self.started = self.job_started if self.job_started is not None else self.clock()
        if earlier:  # a resumed run goes on from the time its last entry recorded
            self.started = self.clock() - earlier[-1]
        if self.budget_seconds and self.cooldown_seconds:
            self._read_clock(args)  # a resumed run's first steps are cooled as far as its time says

    def cool(self, scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
        """Makes `scheduler`'s learning rate follow the cool-down (once; the trainer calls it on its scheduler)."""
        if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
            raise ValueError(f"--lr_cooldown_minutes scales a LambdaLR schedule, not {type(scheduler).__name__}.")
        cooled = [getattr(schedule, "func", None) == self._cooled for schedule in scheduler.lr_lambdas]
        if not any(cooled):
            scheduler.lr_lambdas = [partial(self._cooled, schedule) for schedule in scheduler.lr_lambdas]

    def _cooled(self, schedule, step: int) -> float:
        return schedule(step) * self.learning_rate_factor

    def _read_clock(self, args) -> bool:
        """Whether the budget is spent; sets the cool-down's factor, used from the scheduler's next step on. The
        main process's clock decides for all, so that each stops at the same step with the same learning rate."""
        left = self.budget_seconds - (self.clock() - self.started)
        factor = min(max(left / self.cooldown_seconds, 0.0), 1.0) if self.cooldown_seconds else 1.0
        clock = torch.tensor([float(left <= 0), factor], dtype=torch.float64, device=args.device)
        if args.world_size > 1:
            torch.distributed.broadcast(clock, src=0)
        self.learning_rate_factor = clock[1].item()
        return bool(clock[0].item())

    def on_step_end(self, args, state, control, **kwargs):
        if not self.budget_seconds or not self._read_clock(args):
            return
        if not control.should_training_stop:
            logger.warning(
                f"--max_train_minutes {self.budget_seconds / 60:g}: the time is spent; training stops at step "
                f"{state.global_step} of {state.max_steps}."
            )
        control.should_training_stop = True
        control.should_save = args.save_strategy != "no"  # the last checkpoint, for averaging and resuming

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.log_history and hasattr(self, "started"):
            state.log_history[-1]["wall_seconds"] = round(self.clock() - self.started, 1)


def steps_per_epoch(dataset, args) -> int | None:
    """Optimizer steps per epoch over `dataset`, as transformers' loop counts them from the loader's length: batches
    per process (`--max_tokens`: `TokenBatchSampler`'s; else sentences / (batch size × processes), rounded up), over
    the gradient accumulation steps, rounded up. None for a stream, whose length is unknown."""
    if not isinstance(dataset, datasets.Dataset):
        return None
    if args.max_tokens:
        lengths = token_lengths(dataset, "input_ids"), token_lengths(dataset, "labels")
        sampler = TokenBatchSampler(*lengths, args.max_tokens, num_replicas=args.world_size, rank=args.process_index)
        batches = len(sampler)
    else:
        per_step = args.per_device_train_batch_size * args.world_size
        batches = len(dataset) // per_step if args.dataloader_drop_last else math.ceil(len(dataset) / per_step)
    accumulation = args.gradient_accumulation_steps
    return max(batches // accumulation + int(batches % accumulation > 0), 1)


def save_state_atomically(state: TrainerState, path: str) -> None:
    """`trainer_state.json` rewritten whole or not at all."""
    staging = f"{path}.writing"
    state.save_to_json(staging)
    os.replace(staging, path)


def repair_best_checkpoint_path(state_path: str) -> None:
    """A checkpoint saved before the fix above names its staging folder as the best checkpoint; transformers would
    drop that path on resume, and then load the last model at the end and let rotation delete the best. Point it at
    the checkpoint the staging folder became."""
    if not os.path.isfile(state_path):
        return
    state = TrainerState.load_from_json(state_path)
    best = state.best_model_checkpoint
    if best is None or os.path.basename(os.path.dirname(best)) != STAGING_DIR:
        return
    final = os.path.join(os.path.dirname(os.path.dirname(best)), os.path.basename(best))
    if os.path.isdir(final):
        state.best_model_checkpoint = final
        save_state_atomically(state, state_path)


class FsdpUnsupportedError(ValueError):
    """A model that FSDP, as accelerate wraps it, cannot shard."""


def share_embedding_modules(model: PreTrainedModel) -> None:
    """Before FSDP2 shards the model: one embedding module where the model ties one matrix in several.

    transformers ties the source and target embeddings and the pre-softmax projection (§3.4) as one parameter held by
    several modules; accelerate shards the input embedding together with the output projection, and torch refuses a
    parameter that another module outside that group holds too. Holding the same parameter, the embedding modules
    compute the same function: using one of them in every place changes nothing but what FSDP sees.
    """
    model = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT model's own
    base = model.base_model  # the encoder-decoder, without the output projection
    input_embeddings = base.get_input_embeddings()
    for holder in (base, base.encoder, base.decoder):
        for name, module in list(holder.named_children()):
            if module is input_embeddings or type(module) is not type(input_embeddings):
                continue
            scales = (getattr(module, "embed_scale", None), getattr(input_embeddings, "embed_scale", None))
            if module.weight is input_embeddings.weight and scales[0] == scales[1]:
                setattr(holder, name, input_embeddings)
    output_weight = getattr(model.get_output_embeddings(), "weight", None)
    if output_weight is not None and base.decoder.embed_tokens.weight is output_weight is not input_embeddings.weight:
        raise FsdpUnsupportedError(
            "FSDP: this model ties its target embedding to the output projection but not to the source embedding "
            "(separate vocabularies), which accelerate's FSDP2 wrapping cannot shard; train it with DDP."
        )


class CheckpointSafeSeq2SeqTrainer(Seq2SeqTrainer):
    """`Seq2SeqTrainer` that writes each checkpoint into a staging folder and renames it into place when complete.

    transformers writes `checkpoint-N` in place (weights, then optimizer, RNG states, trainer state), so a process
    killed mid-save leaves a folder that `resume_from_checkpoint` would pick up and fail on. Here `checkpoint-N`
    appears only by an atomic rename, after every process has written its part.
    """

    _staging_root: str | None = None
    # (layer, head, weight) of guided-alignment training (`guided_alignment.py`), or None
    guided_alignment: tuple[int, int, float] | None = None
    # --ema_decay's moving average of the weights (`regularization.py`), from the start of training; else None
    weight_average: WeightMovingAverage | None = None
    resumed_checkpoint: str | None = None  # the checkpoint `train` resumes from, whose moving average goes on

    def __init__(self, *args, guided_alignment: tuple[int, int, float] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.guided_alignment = guided_alignment
        if self.label_smoother is not None:
            self.label_smoother = TokenLabelSmoother(self.label_smoother.epsilon)
        if self.is_fsdp_enabled:
            share_embedding_modules(self.model)
        if getattr(self.args, "ema_decay", 0):
            if self.is_fsdp_enabled:
                raise FsdpUnsupportedError(f"--ema_decay {self.args.ema_decay} with FSDP: the moving average keeps "
                                           "whole weights; train it with DDP, or without --ema_decay.")  # fmt: skip
            self.add_callback(MovingAverageCallback(self))

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs) -> TrainOutput:
        """`Seq2SeqTrainer.train`, except that resuming a run that already did all its steps trains no further.

        transformers' loop takes a step before it checks `max_steps`, so resuming a finished run (or one killed
        during its final save) would train one step more than the uninterrupted run; here it restores the
        checkpoint's model and state instead.
        """
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = get_last_checkpoint(self.args.output_dir)
        self.resumed_checkpoint = checkpoint if isinstance(checkpoint, str) else None
        if isinstance(checkpoint, str) and self.args.should_save:
            repair_best_checkpoint_path(os.path.join(checkpoint, TRAINER_STATE_NAME))
        self.accelerator.wait_for_everyone()
        if isinstance(checkpoint, str):
            state = TrainerState.load_from_json(os.path.join(checkpoint, TRAINER_STATE_NAME))
            done = self.args.max_steps > 0 and state.global_step >= self.args.max_steps
            if done or (self.args.max_steps <= 0 and (state.epoch or 0) >= self.args.num_train_epochs):
                self._load_from_checkpoint(checkpoint)
                self.state = state
                if getattr(self.args, "ema_decay", 0):  # the checkpoint's moving average, as training would end
                    MovingAverageCallback(self).on_train_begin(self.args, state, self.control, model=self.model)
                losses = [entry["loss"] for entry in state.log_history if "loss" in entry]
                return TrainOutput(state.global_step, losses[-1] if losses else 0.0, {})
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        """transformers' schedule, cooled down over the budget's last minutes with --lr_cooldown_minutes."""
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, WallClockCallback) and callback.budget_seconds and callback.cooldown_seconds:
                callback.cool(scheduler)
        return scheduler

    def evaluation_loop(self, *args, **kwargs):
        """transformers' loop, counting each sentence once on several processes.

        accelerate completes the processes' last batches with copies of the first sentences; `Seq2SeqTrainer`
        gathers with plain `gather` (for `num_return_sequences` > 1), which keeps the copies: on 2 processes 200
        validation sentences in batches of 64 were scored, and their loss averaged, as 256. With one translation
        per sentence, `gather_for_metrics` drops them.
        """
        generation = {**self.model.generation_config.to_dict(), **(getattr(self, "_gen_kwargs", None) or {})}
        if (generation.get("num_return_sequences") or 1) == 1:
            self.gather_function = self.accelerator.gather_for_metrics
        return super().evaluation_loop(*args, **kwargs)

    def _set_signature_columns_if_needed(self):
        """The model's inputs, the training pairs' subword links (`alignment`) that the collator turns into
        `alignment_targets` for the guided-alignment loss, and their text that `BpeDropoutCollator` segments."""
        super()._set_signature_columns_if_needed()
        if self.guided_alignment is not None and "alignment" not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, "alignment"]
        if isinstance(self.data_collator, BpeDropoutCollator):
            self._signature_columns = [*self._signature_columns, SOURCE_TEXT, TARGET_TEXT]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The translation loss, plus λ × the guided-alignment loss on batches that carry `alignment_targets`, or in
        training with --r_drop_alpha R-Drop's (`r_drop_loss`)."""
        targets = inputs.pop("alignment_targets", None)
        if getattr(self.args, "r_drop_alpha", 0) and model.training:
            return self.r_drop_loss(model, inputs, return_outputs, num_items_in_batch)
        if targets is None or self.guided_alignment is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        layer, head, weight = self.guided_alignment
        unwrapped = self.accelerator.unwrap_model(model)
        with capture_cross_attention_inputs(unwrapped, layer) as captured:
            loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        attention = unwrapped.get_decoder().layers[layer].encoder_attn
        log_attention = head_log_attention(attention, captured["hidden_states"], captured["key_value_states"],
                                           inputs["attention_mask"], head)  # fmt: skip
        loss = loss + weight * guided_alignment_loss(log_attention, targets)
        return (loss, outputs) if return_outputs else loss

    def r_drop_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """R-Drop: the mean of the translation loss over two dropout passes (one pass over the doubled batch), plus
        α × ½(KL(P₁‖P₂) + KL(P₂‖P₁)) per target token, normalised like the translation loss."""
        labels = inputs["labels"]
        both = None if num_items_in_batch is None else num_items_in_batch * 2
        loss, outputs = super().compute_loss(model, doubled(inputs), True, both)
        first, second = outputs["logits"].chunk(2)
        loss = loss + self.args.r_drop_alpha * symmetric_kl(first, second, labels, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def get_train_dataloader(self) -> DataLoader:
        """transformers' loader, or with `--max_tokens` one of token-based batches (`TokenBatchSampler`), or for a
        stream already split across processes (`--streaming`) one that accelerate neither dispatches nor re-splits."""
        batched_stream = isinstance(self.train_dataset, TokenBatchStream)  # --streaming --max_tokens
        if batched_stream or (isinstance(self.train_dataset, datasets.IterableDataset) and self.args.world_size > 1):
            batches = self.train_dataset
            if not batched_stream:
                batches = SentenceBatchStream(batches, self._train_batch_size, self.args.dataloader_drop_last)
            if self.args.world_size > 1:  # every process takes the same number of steps in each epoch
                batches = EvenBatchesAcrossProcesses(batches, self.args.device)
            loader = DataLoader(
                batches,
                batch_size=None,  # its items are batches already
                collate_fn=self.data_collator,
                num_workers=self.args.dataloader_num_workers,
                pin_memory=self.args.dataloader_pin_memory,
            )
            return prepare_data_loader(
                loader, self.args.device, num_processes=1, process_index=0, dispatch_batches=False
            )
        if not self.args.max_tokens:
            return super().get_train_dataloader()
        dataset = self._remove_unused_columns(self.train_dataset, description="training")
        sampler = TokenBatchSampler(
            token_lengths(dataset, "input_ids"),
            token_lengths(dataset, "labels"),
            self.args.max_tokens,
            seed=self.args.data_seed if self.args.data_seed is not None else self.args.seed,
            num_replicas=self.args.world_size,
            rank=self.args.process_index,
        )
        loader = DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
            worker_init_fn=partial(
                seed_worker, num_workers=self.args.dataloader_num_workers, rank=self.args.process_index
            ),
        )
        prepared = self.accelerator.prepare(loader)
        shard = getattr(prepared, "batch_sampler", None)
        if shard is not sampler and getattr(shard, "batch_sampler", None) is sampler:
            # accelerate's BatchSamplerShard would split our per-process batches again: make it a passthrough, as
            # transformers does for its BatchRebalanceSampler, and let it pass the epoch on.
            shard.num_processes, shard.process_index = 1, 0
            shard.set_epoch = sampler.set_epoch
        return prepared

    @property
    def saves_sharded_checkpoints(self) -> bool:
        """Under FSDP with a sharded state dict (accelerate's default for FSDP2), each process saves its own shard."""
        return self.is_fsdp_enabled and "FULL_STATE_DICT" not in str(
            self.accelerator.state.fsdp_plugin.state_dict_type
        )

    def average_checkpoints_into_model(self, checkpoints: list[Path], weights_file: str = "model.safetensors") -> None:
        """§6.1's final model, on every process (each keeps its own shard under FSDP): all must call it.

        Args:
            weights_file: what to average in each checkpoint: the weights, or `EMA_WEIGHTS_NAME`'s moving averages.
        """
        if not self.is_fsdp_enabled:
            average_into_model(self.model, checkpoints, weights_file)
            return
        averaged = average_state_dicts(checkpoints, weights_file)
        # One entry per tensor: torch would copy a tied parameter's other names unsharded into its shard.
        names = [name for name, _ in (*self.model.named_parameters(), *self.model.named_buffers())]
        averaged = {name: averaged[name] for name in names if name in averaged}
        set_model_state_dict(self.model, averaged, options=StateDictOptions(full_state_dict=True, strict=False))

    def whole_model(self) -> PreTrainedModel | None:
        """The trained model with all its weights, on the main process (None on the others): what the job saves
        and translates with there alone. Under FSDP it gathers the shards, so every process must call it."""
        if not self.is_fsdp_enabled:
            return self.model if self.is_world_process_zero() else None
        state_dict = self.accelerator.get_state_dict(self.model)  # whole on the main process, empty elsewhere
        if not self.is_world_process_zero():
            return None
        model_class = next(cls for cls in type(self.model).__mro__ if not issubclass(cls, FSDPModule))
        model = model_class(self.model.config)
        missing = missing_weights(model, set(state_dict))
        if missing:  # never a model silently half initialised
            raise RuntimeError(f"The gathered state dict lacks {len(missing)} of the model's tensors: {missing[:3]}.")
        model.load_state_dict(state_dict, strict=False)  # strict would ask for every name of a tied tensor
        model.tie_weights()
        model.generation_config = copy.deepcopy(self.model.generation_config)
        return model.eval()

    def save_whole_model(self, model: PreTrainedModel, output_dir: str | Path) -> None:
        """What `save_model` writes (weights, config, tokenizer, training arguments), from `whole_model()`'s model,
        by the main process alone."""
        model.save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _get_output_dir(self, trial) -> str:
        return self._staging_root or super()._get_output_dir(trial=trial)

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = self._get_output_dir(trial=trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging_root = os.path.join(run_dir, STAGING_DIR)
        staged, final = os.path.join(staging_root, name), os.path.join(run_dir, name)
        if self.args.should_save:
            shutil.rmtree(staged, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        save_total_limit, self.args.save_total_limit = self.args.save_total_limit, None  # rotate after the rename
        self._staging_root = staging_root
        try:
            super()._save_checkpoint(model, trial)
            if self.weight_average is not None and self.args.should_save:  # inside the swap, like every file
                self.weight_average.save(self.model, os.path.join(staged, EMA_WEIGHTS_NAME))
        finally:
            self._staging_root = None
            self.args.save_total_limit = save_total_limit
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            if os.path.isdir(final):
                shutil.rmtree(final)
            os.replace(staged, final)
            if not os.listdir(staging_root):
                os.rmdir(staging_root)
            if self.state.best_model_checkpoint == staged:  # the state saved inside names the staging folder
                self.state.best_model_checkpoint = final
                save_state_atomically(self.state, os.path.join(final, TRAINER_STATE_NAME))
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )
        self.accelerator.wait_for_everyone()
