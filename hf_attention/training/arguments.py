"""The training job's flags: the model, data and training argument dataclasses (the paper's recipe as
`Seq2SeqTrainingArguments` defaults), their parser, and every check of their values, made before anything is read
or written."""

import dataclasses
import difflib
import importlib.util
import json
import os
import shutil
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import (
    HfArgumentParser,
    Seq2SeqTrainingArguments,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .. import hardware
from ..configuration_hf_attention import HfAttentionConfig


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
    guided_alignment: str = field(
        default="",
        metadata={
            "help": "Word alignments of the training pairs (Moses i-j links, one line per pair in the training data's "
            "order, e.g. from fast_align): one cross-attention head learns them (Garg et al., 2019), so that "
            "--alignments aligns well."
        },
    )
    bpe_dropout: float = field(
        default=0.0,
        metadata={
            "help": "BPE-dropout (Provilkov et al., 2020): each batch's training pairs are segmented anew, each merge "
            "skipped with this probability (the paper: 0.1; 0: off), so the model sees words split in many ways. "
            "A BPE tokenizer only; validation, the saved tokenizer and decoding stay deterministic. Batching "
            "(--max_tokens) counts the usual segmentation, which dropout lengthens; tokenizers' draws cannot be "
            "seeded, so such a run is not bit-reproducible."
        },
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
        metadata={"help": "Beam search length penalty α (§6.1: 0.6); saved in the generation config."},
    )
    generation_length_penalty_style: str = field(
        default="gnmt",
        metadata={
            "help": "gnmt: divide a hypothesis's log-probability by ((5 + length) / 6)^α, GNMT's penalty that §6.1 "
            "uses; transformers: by length^α, as transformers' beam search does by default. Saved in the "
            "generation config (length_penalty_style)."
        },
    )
    generation_max_new_tokens_over_source: int = field(
        default=50, metadata={"help": "Translations stop at source length + this many tokens (§6.1: 50)."}
    )
    guided_alignment_weight: float = field(
        default=0.05, metadata={"help": "--guided_alignment: the alignment loss's weight λ (Garg et al.: 0.05)."}
    )
    guided_alignment_layer: int | None = field(
        default=None, metadata={"help": "--guided_alignment: the decoder layer taught (default: the penultimate)."}
    )
    guided_alignment_head: int = field(
        default=0, metadata={"help": "--guided_alignment: the head of that layer's cross-attention taught."}
    )
    r_drop_alpha: float = field(
        default=0.0,
        metadata={
            "help": "R-Drop (Liang et al., 2021): each batch passes twice with different dropout, and α times the "
            "symmetric KL divergence between the passes joins their mean loss (the paper: α 5 for translation; "
            "0: off). Costs a batch twice as large."
        },
    )
    ema_decay: float = field(
        default=0.0,
        metadata={
            "help": "Keep an exponential moving average of the weights, θ_ema ← d·θ_ema + (1 − d)·θ after each "
            "optimizer step t (e.g. 0.999; 0: off), d warmed up as min(d, (1 + t) / (10 + t)), saved in each "
            "checkpoint as ema.safetensors."
        },
    )
    ema_final_model: bool = field(
        default=True,
        metadata={
            "help": "With --ema_decay: the final model (evaluated, saved) is the moving average, or with "
            "--average_last_n_checkpoints the average of the last checkpoints' moving averages; false keeps the "
            "trained weights."
        },
    )
    max_train_minutes: float = field(
        default=0.0,
        metadata={
            "help": "Stop training at the first optimizer step after this many minutes since the job started (data "
            "and tokenizer included; a resumed run counts its earlier time), saving a checkpoint there, so that a "
            "run fits a wall-clock budget on any machine; --max_steps stays the upper bound. 0: no limit."
        },
    )
    lr_cooldown_minutes: float = field(
        default=0.0,
        metadata={
            "help": "With --max_train_minutes: over the budget's last this many minutes the learning rate falls "
            "linearly to 0 (a warmup-stable-decay schedule's decay, timed by the clock), so a run stopped by its "
            "budget ends annealed on any machine. 0: off."
        },
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

    def with_paper_learning_rate(self, d_model: int) -> "PaperTrainingArguments":
        """A copy with eq. 3's peak learning rate for this model width, unless --learning_rate was given."""
        peak = paper_learning_rate(d_model, max(1, int(self.warmup_steps))) * self.learning_rate_scale
        return self if self.learning_rate > 0 else dataclasses.replace(self, learning_rate=peak)


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


DTYPES = {"auto": None, **hardware.DTYPES}  # auto: the checkpoint's own dtype


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
