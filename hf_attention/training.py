"""The paper's training recipe (§5.3, §5.4) as `Seq2SeqTrainingArguments` defaults, and a `Seq2SeqTrainer` whose
checkpoints appear only once complete."""

import copy
import importlib.util
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
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
    Seq2SeqTrainingArguments,
    TrainerCallback,
    TrainerState,
)
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_utils import (
    PREFIX_CHECKPOINT_DIR,
    TrainOutput,
    get_last_checkpoint,
    rotate_checkpoints,
    seed_worker,
)

from . import hardware
from .checkpoint_averaging import average_into_model, average_state_dicts
from .data.batching import TokenBatchSampler, TokenBatchStream, token_lengths
from .modeling_hf_attention import label_smoothed_cross_entropy

STAGING_DIR = ".checkpoint-staging"


def paper_learning_rate(d_model: int, warmup_steps: int) -> float:
    """Peak of lrate = d_model^-0.5 * min(step^-0.5, step * warmup^-1.5) (eq. 3), reached at step = warmup.

    transformers' "inverse_sqrt" schedule warms up linearly to this peak and then decays as sqrt(warmup / step),
    which is eq. 3 exactly.
    """
    return d_model**-0.5 * warmup_steps**-0.5


@dataclass
class PaperTrainingArguments(Seq2SeqTrainingArguments):
    """`Seq2SeqTrainingArguments` whose defaults are the paper's recipe; every value stays overridable.

    Adam(β1=0.9, β2=0.98, ε=1e-9) with no weight decay, eq. 3's schedule (`inverse_sqrt` with warm-up; the peak
    learning rate is d_model^-0.5 · warmup^-0.5 unless `learning_rate` is given), label smoothing 0.1, beam search
    when evaluating.
    """

    output_dir: str | None = field(default="runs/demo", metadata={"help": "Where the model, card and curves go."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace what output_dir already holds."})
    learning_rate: float = field(
        default=0.0, metadata={"help": "Peak learning rate; 0 means eq. 3's d_model^-0.5 * warmup_steps^-0.5."}
    )
    learning_rate_scale: float = field(default=1.0, metadata={"help": "Multiplies eq. 3's peak learning rate."})
    adam_beta2: float = field(default=0.98, metadata={"help": "Adam's β2 (§5.3: 0.98)."})
    adam_epsilon: float = field(default=1e-9, metadata={"help": "Adam's ε (§5.3: 1e-9)."})
    lr_scheduler_type: str = field(
        default="inverse_sqrt", metadata={"help": "Learning-rate schedule; inverse_sqrt with warm-up is eq. 3."}
    )
    warmup_steps: float = field(default=4000, metadata={"help": "Warm-up steps of eq. 3 (the paper: 4000)."})
    label_smoothing_factor: float = field(default=0.1, metadata={"help": "Label smoothing ε_ls (§5.4: 0.1)."})
    predict_with_generate: bool = field(
        default=True, metadata={"help": "Evaluate by generating translations (BLEU, chrF), not only the loss."}
    )
    generation_num_beams: int | None = field(default=4, metadata={"help": "Beam size when evaluating (§6.1: 4)."})
    generation_max_length: int | None = field(
        default=128, metadata={"help": "Most generated tokens when evaluating (saved as max_new_tokens)."}
    )
    generation_length_penalty: float = field(
        default=0.6,
        metadata={
            "help": "Beam search length penalty α (§6.1: 0.6); saved in the generation config. Differs from paper: "
            "transformers divides scores by length^α where GNMT's penalty is ((5 + length) / 6)^α."
        },
    )
    generation_max_new_tokens_over_source: int = field(
        default=50, metadata={"help": "Translations stop at source length + this many tokens (§6.1: 50)."}
    )
    max_tokens: int | None = field(
        default=None,
        metadata={
            "help": "Batches of at most this many tokens per side, padding included, instead of "
            "--per_device_train_batch_size sentences (fairseq's --max-tokens; the paper: ~25000)."
        },
    )
    average_last_n_checkpoints: int = field(
        default=0,
        metadata={
            "help": "The final model averages the last N saved checkpoints (§6.1: 5); 0 keeps the last weights."
        },
    )
    report_to: None | str | list[str] = field(
        default="none", metadata={"help": "Where to report metrics (none, all, tensorboard, wandb, ...)."}
    )
    dataloader_pin_memory: bool = field(
        default=False, metadata={"help": "Pin host memory of batches (helps only when training on a GPU)."}
    )

    precision: str | None = field(
        default=None,
        metadata={
            "help": "auto: bf16 where the hardware computes it natively (CPUs with AVX512-BF16, AMX or Arm BF16; "
            "Ampere and newer GPUs), fp16 on older GPUs, fp32 elsewhere (hf_attention.hardware); or bf16, fp16, "
            "fp32. Default: as --bf16 / --fp16 say, fp32 without them. --bf16 auto means --precision auto."
        },
    )

    def __post_init__(self):
        # On a machine without an accelerator, say so: transformers otherwise treats a multi-process launch
        # (accelerate launch, torchrun) as N unrelated single-process runs, and refuses bf16 autocast on CPU.
        if not torch.accelerator.is_available():
            self.use_cpu = True
        if self.precision is not None:
            chosen = chosen_precision(self.precision, self.bf16, self.fp16, self.training_device)
            self.bf16, self.fp16 = chosen == "bf16", chosen == "fp16"
        super().__post_init__()

    @property
    def training_device(self) -> str:
        """ "cuda" or "cpu": where this run's model trains (what `--precision auto` chooses for)."""
        return "cuda" if torch.cuda.is_available() and not self.use_cpu else "cpu"

    @property
    def precision_used(self) -> str:
        return "bf16" if self.bf16 else "fp16" if self.fp16 else "fp32"

    def resolve_learning_rate(self, d_model: int) -> None:
        """Fill in eq. 3's peak learning rate for this model width (once `d_model` is known)."""
        if self.learning_rate <= 0:
            peak = paper_learning_rate(d_model, max(1, int(self.warmup_steps)))
            self.learning_rate = peak * self.learning_rate_scale


PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def chosen_precision(precision: str, bf16: bool, fp16: bool, device: str) -> str:
    """--precision resolved: "auto" is `hardware.training_precision` for `device`; a value that contradicts
    --bf16 / --fp16 is refused.

    Raises:
        ValueError: an unknown precision, or one that --bf16 / --fp16 contradicts (named in one line).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision}: choose one of {', '.join(PRECISIONS)}.")
    chosen = hardware.training_precision(device) if precision == "auto" else precision
    for flag, given in (("bf16", bf16), ("fp16", fp16)):
        if given and chosen != flag and precision != "auto":
            raise ValueError(f"--precision {precision} with --{flag}: they contradict each other; give one.")
    if precision == "auto" and (bf16 or fp16):
        return "bf16" if bf16 else "fp16"  # an explicit flag beside auto is the user's choice
    return chosen


# scripts/benchmark_training.py --quick (Transformer-base, 2 cores), hf_attention tokens/s, bf16 against fp32: an
# AVX-512 Xeon without AVX512-BF16, 294 against 1,016; the same CPU limited to AVX2 (ATEN_CPU_CAPABILITY,
# ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS), 17 against 745.
EMULATED_BF16_TRAINING_COST = (
    "3.5x slower than fp32 on an AVX-512 CPU and over 40x on an AVX2 one (Transformer-base training, measured)"
)


def unsupported_speed_options(args: Seq2SeqTrainingArguments) -> list[str]:
    """Why `--bf16` or `--torch_compile` cannot work on this machine (empty when both can), before training starts.

    `torch.compile` needs a C++ compiler for its generated kernels on a CPU and Triton on CUDA; on CUDA, bf16 needs
    an Ampere or newer GPU. On a CPU without bf16 instructions (AVX512-BF16, AMX, Arm BF16; `hardware`) bf16 runs,
    emulated and slower than fp32: that gets one warning with the measured cost, not a refusal.
    """
    problems = []
    on_cuda = torch.cuda.is_available() and not args.use_cpu
    if args.bf16:
        if on_cuda and not torch.cuda.is_bf16_supported():
            problems.append(f"--bf16: the GPU ({torch.cuda.get_device_name()}) has no bf16 support; use --fp16.")
        elif not on_cuda and not hardware.capabilities().native_cpu_bf16:
            warnings.warn(
                f"--bf16: this CPU has no bf16 instructions (AVX512-BF16, AMX or Arm BF16), so bf16 is emulated, "
                f"{EMULATED_BF16_TRAINING_COST}; --precision auto chooses fp32 here.",
                stacklevel=2,
            )
    if args.torch_compile:
        if on_cuda and importlib.util.find_spec("triton") is None:
            problems.append("--torch_compile: torch.compile on a GPU needs Triton (pip install triton).")
        elif not on_cuda and not any(shutil.which(name) for name in CXX_COMPILERS):
            problems.append(
                f"--torch_compile: torch.compile on CPU needs a C++ compiler, and none of {', '.join(CXX_COMPILERS)} "
                "is on PATH; install one (e.g. apt install g++) or drop the flag."
            )
    return problems


CXX_COMPILERS = (os.environ.get("CXX") or "g++", "c++", "clang++")


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
    against time: what "time to a good model" is measured in.

    Args:
        started: `time.perf_counter()` when the job started (data and tokenizer included); default: training start.
    """

    def __init__(self, started: float | None = None):
        self.job_started = started

    def on_train_begin(self, args, state, control, **kwargs):
        earlier = [entry["wall_seconds"] for entry in state.log_history if "wall_seconds" in entry]
        self.started = self.job_started if self.job_started is not None else time.perf_counter()
        if earlier:  # a resumed run goes on from the time its last entry recorded
            self.started = time.perf_counter() - earlier[-1]

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.log_history and hasattr(self, "started"):
            state.log_history[-1]["wall_seconds"] = round(time.perf_counter() - self.started, 1)


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

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.label_smoother is not None:
            self.label_smoother = TokenLabelSmoother(self.label_smoother.epsilon)
        if self.is_fsdp_enabled:
            share_embedding_modules(self.model)

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs) -> TrainOutput:
        """`Seq2SeqTrainer.train`, except that resuming a run that already did all its steps trains no further.

        transformers' loop takes a step before it checks `max_steps`, so resuming a finished run (or one killed
        during its final save) would train one step more than the uninterrupted run; here it restores the
        checkpoint's model and state instead.
        """
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = get_last_checkpoint(self.args.output_dir)
        if isinstance(checkpoint, str):
            state = TrainerState.load_from_json(os.path.join(checkpoint, "trainer_state.json"))
            done = self.args.max_steps > 0 and state.global_step >= self.args.max_steps
            if done or (self.args.max_steps <= 0 and (state.epoch or 0) >= self.args.num_train_epochs):
                self._load_from_checkpoint(checkpoint)
                self.state = state
                losses = [entry["loss"] for entry in state.log_history if "loss" in entry]
                return TrainOutput(state.global_step, losses[-1] if losses else 0.0, {})
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def get_train_dataloader(self) -> DataLoader:
        """transformers' loader, or with `--max_tokens` one of token-based batches (`TokenBatchSampler`), or for a
        stream already split across processes (`--streaming`) one that accelerate neither dispatches nor re-splits."""
        batched_stream = isinstance(self.train_dataset, TokenBatchStream)  # --streaming --max_tokens
        if batched_stream or (isinstance(self.train_dataset, datasets.IterableDataset) and self.args.world_size > 1):
            loader = DataLoader(
                self.train_dataset,
                batch_size=None if batched_stream else self._train_batch_size,  # its items are batches already
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

    def average_checkpoints_into_model(self, checkpoints: list[Path]) -> None:
        """§6.1's final model, on every process (each keeps its own shard under FSDP): all must call it."""
        if not self.is_fsdp_enabled:
            average_into_model(self.model, checkpoints)
            return
        averaged = average_state_dicts(checkpoints)
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
        model.load_state_dict(state_dict, strict=False)
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
            if self.state.best_model_checkpoint == staged:
                self.state.best_model_checkpoint = final
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )
        self.accelerator.wait_for_everyone()
