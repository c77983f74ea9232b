"""Training speed and memory of hf_attention against transformers' MarianMTModel, measured in one run.

Both models have the same sizes and weights (MarianMTModel is our random model converted with
`hf_attention_to_marian`) and train on the same batches with the same recipe: the paper's Adam, warm-up then
inverse-square-root decay of the learning rate (peak --learning_rate, 1e-3 as in the Multi30k recipe), label
smoothing 0.1. Marian runs as its users run it (fp32, its default attention); hf_attention runs with the options
named by `--hf_options` (default `auto`: bf16 autocast with fp32 master weights and eager attention where the CPU
computes bf16 natively, AVX512-BF16 or AMX, else fp32; `hf_attention.hardware`). Each engine runs in its own process,
so that its peak RSS is its own, in interleaved rounds; the figures are medians over rounds.

    python scripts/benchmark_training.py --quick                  # ≤ 5 minutes: speed and memory only
    python scripts/benchmark_training.py --minutes 10 --data ../shared/data/multi30k   # + BLEU at equal times
    python scripts/benchmark_training.py --minutes 5 --data ../shared/data/multi30k --preset tiny --batch_size 64 \
        --config_overrides d_model=256,encoder_layers=3,decoder_layers=3,encoder_ffn_dim=1024,decoder_ffn_dim=1024
        # the Multi30k recipe's model

--quick ends with the line `training speed vs Marian: R.RRx, peak memory vs Marian: M.MMx`. Without --quick each
engine also trains for --minutes on real parallel text and its validation BLEU (greedy, --eval_sentences) is scored
at equal training times: a table and a PNG (`--plot`). --json FILE writes every figure.
"""

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from benchmark_harness import arguments_as_flags, interleaved_rounds, median_of, peak_rss_mb, print_worker_result
from benchmark_harness import run_worker as run_script_worker
from transformers import HfArgumentParser

from hf_attention.inference.allocator import reuse_freed_memory

ENGINES = ("hf_attention", "marian")


@dataclass
class BenchmarkArguments:
    quick: bool = field(default=False, metadata={"help": "Speed and memory only (synthetic batches), ≤ 5 minutes."})
    preset: str = field(default="base", metadata={"help": "Model size for both engines (Table 3's base)."})
    vocab_size: int = 8000
    batch_size: int = field(default=16, metadata={"help": "Sentences per batch."})
    source_length: int = field(default=64, metadata={"help": "Tokens per source sentence (synthetic batches)."})
    target_length: int = field(default=64, metadata={"help": "Tokens per target sentence (synthetic batches)."})
    steps: int = field(default=6, metadata={"help": "Timed training steps per engine and round."})
    warmup: int = field(default=2, metadata={"help": "Untimed steps before them."})
    rounds: int = field(default=3, metadata={"help": "Interleaved rounds (hf_attention, Marian, hf_attention, ...)."})
    config_overrides: str = field(
        default="", metadata={"help": "Config fields over the preset, e.g. 'd_model=256,encoder_layers=3'."}
    )
    learning_rate: float = field(
        default=1e-3, metadata={"help": "Peak learning rate after warm-up (0: eq. 3's d_model^-0.5 * warmup^-0.5)."}
    )
    warmup_steps: int = field(default=300, metadata={"help": "Warm-up steps (0: a tenth of the steps)."})
    hf_options: str = field(
        default="auto",
        metadata={
            "help": "hf_attention's options: auto (bf16 where the CPU computes it natively, else fp32), bf16 or "
            "fp32, optionally with checkpointing and compile, e.g. bf16,checkpointing."
        },
    )
    threads: int = field(default=0, metadata={"help": "torch threads per engine (0: torch's default)."})
    minutes: float = field(default=10.0, metadata={"help": "Without --quick: training minutes per engine."})
    data: str = field(default="", metadata={"help": "Without --quick: a folder with train.en/.de, val.en/.de(.gz)."})
    eval_sentences: int = field(default=200, metadata={"help": "Validation sentences scored for BLEU."})
    eval_every_minutes: float = field(default=2.0, metadata={"help": "BLEU every this many training minutes."})
    json: str = field(default="", metadata={"help": "Write the figures to this JSON file."})
    plot: str = field(default="benchmark_training.png", metadata={"help": "Without --quick: the BLEU/time PNG."})
    worker: str = field(default="", metadata={"help": "Internal: run one engine's measurement in this process."})
    worker_task: str = field(default="speed", metadata={"help": "Internal: the worker's task, speed or train."})


PRECISIONS = {"auto", "bf16", "fp32"}


def hf_options(text: str) -> set[str]:
    """'bf16,checkpointing' -> {'bf16', 'checkpointing'}: one precision, optionally gradient checkpointing and
    torch.compile of the model (its compilation falls in the untimed warm-up steps). "auto" becomes the precision
    `hardware.training_precision` chooses for this CPU."""
    from hf_attention import hardware

    options = {option.strip() for option in text.split(",") if option.strip()}
    if len(options & PRECISIONS) != 1 or options - PRECISIONS - {"checkpointing", "compile"}:
        raise ValueError(
            f"--hf_options {text!r}: choose auto, bf16 or fp32, optionally with checkpointing and compile "
            "(e.g. auto,checkpointing)"
        )
    if "auto" in options:
        options = options - {"auto"} | {hardware.training_precision("cpu")}
    return options


def build_models(args: BenchmarkArguments):
    from hf_attention import HfAttentionConfig, HfAttentionForConditionalGeneration
    from hf_attention.hub.marian_conversion import hf_attention_to_marian
    from hf_attention.training.arguments import parse_config_overrides

    torch.manual_seed(0)
    overrides = parse_config_overrides(args.config_overrides)
    config = HfAttentionConfig.from_preset(args.preset, vocab_size=args.vocab_size, **overrides)
    ours = HfAttentionForConditionalGeneration(config)
    return ours, hf_attention_to_marian(ours)


def training_step_function(model, engine: str, args: BenchmarkArguments, total_steps: int):
    """One optimiser step of the paper's recipe on a batch; hf_attention under bf16 autocast if asked."""
    from hf_attention import hardware
    from hf_attention.modeling_hf_attention import label_smoothed_cross_entropy
    from hf_attention.training.arguments import paper_learning_rate

    warmup = args.warmup_steps or max(1, total_steps // 10)
    optimizer = torch.optim.Adam(model.parameters(), lr=1.0, betas=(0.9, 0.98), eps=1e-9)
    peak = args.learning_rate or paper_learning_rate(model.config.d_model, warmup)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: peak * min((step + 1) / warmup, math.sqrt(warmup / (step + 1)))
    )
    options = hf_options(args.hf_options) if engine == "hf_attention" else {"fp32"}
    autocast = "bf16" in options
    attention = hardware.training_attention("cpu", "bf16" if autocast else "fp32")
    if attention and engine == "hf_attention":  # as the training job chooses it: eager under bf16 autocast on a CPU
        model.set_attn_implementation(attention)
    if "checkpointing" in options:  # recompute each layer's activations in the backward pass instead of keeping them
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    forward = torch.compile(model) if "compile" in options else model

    def step(batch: dict) -> int:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = forward(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                decoder_input_ids=batch["decoder_input_ids"],
            ).logits
            loss = label_smoothed_cross_entropy(logits, batch["labels"], 0.1)
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        return int(batch["attention_mask"].sum() + batch["labels"].ne(-100).sum())

    return step


def synthetic_batch(args: BenchmarkArguments, pad: int, start: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, args.vocab_size, (args.batch_size, args.source_length), generator=generator)
    labels = torch.randint(3, args.vocab_size, (args.batch_size, args.target_length), generator=generator)
    decoder_input_ids = torch.cat([torch.full_like(labels[:, :1], start), labels[:, :-1]], dim=1)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "decoder_input_ids": decoder_input_ids,
        "labels": labels,
    }


def measure_speed(engine: str, args: BenchmarkArguments) -> dict:
    """Worker: tokens/s of `args.steps` training steps on a synthetic batch, and this process's peak RSS."""
    ours, marian = build_models(args)
    model = ours if engine == "hf_attention" else marian
    batch = synthetic_batch(args, model.config.pad_token_id, model.config.decoder_start_token_id)
    step = training_step_function(model, engine, args, total_steps=args.warmup + args.steps)
    del ours, marian
    for _ in range(args.warmup):
        step(batch)
    started, tokens = time.perf_counter(), 0
    for _ in range(args.steps):
        tokens += step(batch)
    seconds = time.perf_counter() - started
    return {
        "tokens_per_second": tokens / seconds,
        "peak_rss_mb": peak_rss_mb(),
    }


def run_worker(args: BenchmarkArguments, engine: str, task: str) -> dict:
    flags = arguments_as_flags(args, leave_out=("worker", "worker_task", "quick", "json"))
    return run_script_worker(__file__, ["--worker", engine, "--worker_task", task, *flags], engine)


def speed_and_memory(args: BenchmarkArguments) -> dict:
    """Interleaved rounds of both engines, each in a fresh process; medians per engine."""
    rounds = interleaved_rounds(ENGINES, args.rounds, lambda engine: run_worker(args, engine, "speed"))
    summary = {}
    for engine, measurements in rounds.items():
        summary[engine] = {key: median_of(measurements, key) for key in ("tokens_per_second", "peak_rss_mb")}
    summary["speed_ratio"] = summary["hf_attention"]["tokens_per_second"] / summary["marian"]["tokens_per_second"]
    summary["memory_ratio"] = summary["hf_attention"]["peak_rss_mb"] / summary["marian"]["peak_rss_mb"]
    return summary


def train_for_minutes(engine: str, args: BenchmarkArguments) -> dict:
    """Worker: train on real data for `args.minutes`, scoring validation BLEU at equal training times."""
    from hf_attention.data import read_parallel_corpus, tokenize_pairs
    from hf_attention.data.tokenization import train_tokenizer
    from hf_attention.metrics.evaluation import score_translations, translate

    data = Path(args.data)
    train, validation = (read_parallel_corpus(data / split, "en", "de") for split in ("train", "val"))
    texts = (pair[lang] for pair in train["translation"] for lang in ("en", "de"))
    tokenizer = train_tokenizer(texts, vocab_size=args.vocab_size)
    args.vocab_size = len(tokenizer)
    ours, marian = build_models(args)
    model = ours if engine == "hf_attention" else marian
    if engine == "marian":  # Marian's conventions: decoding starts from pad; our tokenizer's ids are kept
        model.config.decoder_start_token_id = model.generation_config.decoder_start_token_id = tokenizer.pad_token_id
    tokenized, _ = tokenize_pairs(train, tokenizer, "en", "de", max_length=128, too_long="drop")
    sources = [pair["en"] for pair in validation["translation"]][: args.eval_sentences]
    references = [pair["de"] for pair in validation["translation"]][: args.eval_sentences]
    order = torch.randperm(len(tokenized), generator=torch.Generator().manual_seed(0)).tolist()
    steps_estimate = int(args.minutes * 60 * 3)
    step = training_step_function(model, engine, args, total_steps=steps_estimate)
    curve, trained_seconds, tokens, position = [], 0.0, 0, 0
    next_eval = 0.0
    while trained_seconds < args.minutes * 60:
        if trained_seconds >= next_eval:
            translations = translate(model.eval(), tokenizer, sources, num_beams=1, max_new_tokens=64)
            curve.append((trained_seconds / 60, score_translations(translations, references)["bleu"]))
            model.train()
            next_eval += args.eval_every_minutes * 60
        rows = [tokenized[order[(position + i) % len(order)]] for i in range(args.batch_size)]
        position += args.batch_size
        batch = tokenizer.pad([{"input_ids": row["input_ids"]} for row in rows], return_tensors="pt")
        labels = tokenizer.pad([{"input_ids": row["labels"]} for row in rows], return_tensors="pt")
        target = labels["input_ids"].masked_fill(labels["attention_mask"] == 0, -100)
        start = model.config.decoder_start_token_id
        decoder_input_ids = torch.cat([torch.full_like(target[:, :1], start), target[:, :-1]], dim=1)
        decoder_input_ids = decoder_input_ids.masked_fill(decoder_input_ids == -100, tokenizer.pad_token_id)
        started = time.perf_counter()
        tokens += step({**batch, "decoder_input_ids": decoder_input_ids, "labels": target})
        trained_seconds += time.perf_counter() - started
    translations = translate(model.eval(), tokenizer, sources, num_beams=1, max_new_tokens=64)
    curve.append((trained_seconds / 60, score_translations(translations, references)["bleu"]))
    return {
        "tokens_per_second": tokens / trained_seconds,
        "peak_rss_mb": peak_rss_mb(),
        "bleu_curve": curve,
    }


def plot_curves(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for engine in ENGINES:
        minutes, bleu = zip(*results[engine]["bleu_curve"], strict=True)
        axis.plot(minutes, bleu, marker="o", label=engine)
    axis.set_xlabel("training minutes (wall clock, this machine)")
    axis.set_ylabel("validation BLEU (greedy)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path)


def main() -> None:
    parser = HfArgumentParser(BenchmarkArguments, description=__doc__.splitlines()[0])
    (args,) = parser.parse_args_into_dataclasses()
    try:
        hf_options(args.hf_options)
    except ValueError as error:
        parser.error(str(error))
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        reuse_freed_memory()  # every engine's process alike, as the training job sets its own
        worker = train_for_minutes if args.worker_task == "train" else measure_speed
        print_worker_result(worker(args.worker, args))
        return
    if not args.quick and not args.data:
        parser.error("give --data FOLDER (train/val parallel text) or --quick")
    from hf_attention import hardware

    chosen = ",".join(sorted(hf_options(args.hf_options)))
    print(hardware.describe())
    print(
        f"{args.preset} preset, vocabulary {args.vocab_size}, batch {args.batch_size} x ({args.source_length} + "
        f"{args.target_length}) tokens, hf_attention {args.hf_options} ({chosen}) vs Marian fp32, torch threads "
        f"{args.threads or torch.get_num_threads()}, {args.rounds} interleaved rounds"
    )
    results = speed_and_memory(args)
    print("| engine | training tokens/s | peak RSS (MB) |\n| --- | --- | --- |")
    for engine in ENGINES:
        print(f"| {engine} | {results[engine]['tokens_per_second']:.0f} | {results[engine]['peak_rss_mb']:.0f} |")
    if not args.quick:
        curves = {engine: run_worker(args, engine, "train") for engine in ENGINES}
        results["bleu_at_equal_time"] = {engine: curves[engine]["bleu_curve"] for engine in ENGINES}
        print("\n| training minutes | " + " | ".join(f"{engine} BLEU" for engine in ENGINES) + " |")
        print("| --- | --- | --- |")
        for points in zip(*(curves[engine]["bleu_curve"] for engine in ENGINES), strict=False):
            print(f"| {points[0][0]:.1f} | " + " | ".join(f"{bleu:.1f}" for _, bleu in points) + " |")
        plot_curves(curves, args.plot)
        print(f"BLEU against training time: {args.plot}")
    if args.json:
        Path(args.json).write_text(json.dumps({"arguments": asdict(args), **results}, indent=2) + "\n")
    speed, memory = results["speed_ratio"], results["memory_ratio"]
    print(f"training speed vs Marian: {speed:.2f}x, peak memory vs Marian: {memory:.2f}x")


if __name__ == "__main__":
    main()
