"""How the training job's data path scales: preprocessing throughput, memory in-memory vs --streaming, token batches.

    python scripts/benchmark_data.py --sizes 1000000,4000000 --multi30k ../shared/data/multi30k --json data.json

1. A synthetic parallel corpus of each size in --sizes is generated on the fly (sentence lengths drawn like WMT's:
   log-normal, median ~22 words, capped at 120; words from a 30k-word synthetic vocabulary), as PREFIX.en/.de files.
2. Preprocessing: the job's data preparation (read, train the tokenizer on --tokenizer_train_samples pairs,
   tokenise) in a fresh process with an empty cache ("cold"), then again ("cached"): pairs per second.
3. Memory: the training job for --steps steps on the corpus in a fresh process, in-memory and with --streaming:
   peak RSS. The streaming figure must not grow with the corpus size.
4. With --multi30k: --max_tokens 4096 against --per_device_train_batch_size 64 on Multi30k (the recipe's model, bf16,
   --steps steps each): padding fraction and training tokens (real, not padding) per second.

Each measurement runs in its own process (`--worker`), so its peak RSS is its own.
"""

import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from benchmark_harness import ROOT, peak_rss_mb, print_worker_result
from benchmark_harness import run_worker as run_script_worker
from transformers import HfArgumentParser

MODEL = ["--preset", "tiny", "--config_overrides", "d_model=256,encoder_layers=3,decoder_layers=3,"
         "encoder_attention_heads=4,decoder_attention_heads=4,encoder_ffn_dim=1024,decoder_ffn_dim=1024,"
         "max_position_embeddings=512"]  # fmt: skip


@dataclass
class DataBenchmarkArguments:
    sizes: str = field(
        default="1000000,4000000", metadata={"help": "Synthetic corpus sizes (pairs), comma-separated."}
    )
    multi30k: str = field(default="", metadata={"help": "Multi30k folder for the --max_tokens comparison."})
    steps: int = field(default=100, metadata={"help": "Training steps per memory and batching measurement."})
    tokenizer_train_samples: int = field(default=100000, metadata={"help": "Pairs the tokenizer is trained on."})
    workers: int = field(default=2, metadata={"help": "--preprocessing_num_workers of the job."})
    work_dir: str = field(
        default="", metadata={"help": "Where corpora and caches go (default: a temporary folder, deleted at the end)."}
    )
    json: str = field(default="", metadata={"help": "Write the figures to this JSON file."})
    worker: str = field(default="", metadata={"help": "Internal: preprocess or train."})
    worker_arguments: str = field(default="", metadata={"help": "Internal: the job's flags, as JSON."})


def synthetic_corpus(prefix: Path, pairs: int, seed: int = 0) -> None:
    """PREFIX.en / PREFIX.de with WMT-like sentence lengths, written in blocks (memory stays flat)."""
    rng = np.random.default_rng(seed)
    syllables = np.array(["ka", "lo", "mi", "ter", "un", "sa", "bre", "dor", "fi", "gen", "hu", "ost", "pra", "ve"])
    vocabulary = np.array(["".join(rng.choice(syllables, size=rng.integers(1, 4))) for _ in range(30000)])
    with open(f"{prefix}.en", "w") as source, open(f"{prefix}.de", "w") as target:
        for start in range(0, pairs, 100_000):
            block = min(100_000, pairs - start)
            lengths = np.clip(rng.lognormal(mean=3.1, sigma=0.55, size=block).astype(int), 1, 120)
            for length in lengths:
                words = vocabulary[rng.zipf(1.3, size=length) % len(vocabulary)]
                source.write(" ".join(words) + "\n")
                target.write(" ".join(words[::-1]) + " en\n")


def run_worker(task: str, job_flags: list[str]) -> dict:
    return run_script_worker(__file__, ["--worker", task, "--worker_arguments", json.dumps(job_flags)], task, cwd=ROOT)


def worker(task: str, job_flags: list[str]) -> dict:
    from hf_attention.training import job as run_translation

    arguments = run_translation.parse_arguments(job_flags)
    if task == "preprocess":
        started = time.perf_counter()
        data = run_translation.prepare_data(*arguments, run_translation.requested_phases(arguments[2]))
        return {"seconds": time.perf_counter() - started, "pairs": len(data.train_dataset)}
    real_tokens = []
    collate = run_translation.PaddingCounter.__call__

    def counting(self, features):
        batch = collate(self, features)
        real_tokens.append(int(batch["input_ids"].ne(self.pad_token_id).sum() + batch["labels"].ne(-100).sum()))
        return batch

    run_translation.PaddingCounter.__call__ = counting
    fractions, runtime = [], []

    class Logs(run_translation.TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            entry = state.log_history[-1]
            if "padding_fraction" in entry:
                fractions.append(entry["padding_fraction"])
            if "train_runtime" in entry:
                runtime.append(entry["train_runtime"])

    summary = run_translation.run(*arguments, callbacks=[Logs()])
    return {"steps": summary.steps, "train_seconds": runtime[-1], "real_tokens": sum(real_tokens[: summary.steps]),
            "padding_fraction": float(np.mean(fractions)) if fractions else None}  # fmt: skip


def main() -> None:
    parser = HfArgumentParser(DataBenchmarkArguments, description=__doc__.splitlines()[0])
    (args,) = parser.parse_args_into_dataclasses()
    if args.worker:
        figures = worker(args.worker, json.loads(args.worker_arguments))
        print_worker_result({**figures, "peak_rss_mb": peak_rss_mb()})
        return
    if args.work_dir:
        Path(args.work_dir).mkdir(parents=True, exist_ok=True)
        run_benchmarks(args, Path(args.work_dir))
    else:  # the corpora, caches and runs are gone at the end
        with tempfile.TemporaryDirectory(prefix="hf_attention-data-benchmark-") as work:
            run_benchmarks(args, Path(work))


def run_benchmarks(args: DataBenchmarkArguments, work: Path) -> None:
    results = {"arguments": asdict(args), "corpora": {}, "batching": {}}
    print("| pairs | preprocessing cold (pairs/s) | cached (pairs/s) | peak RSS in-memory (MB) | --streaming (MB) |")
    print("| --- | --- | --- | --- | --- |")
    for size in (int(text) for text in args.sizes.split(",")):
        prefix = work / f"synthetic-{size}"
        if not Path(f"{prefix}.de").exists():
            synthetic_corpus(prefix, size)
        held_out = work / "held-out"
        if not Path(f"{held_out}.de").exists():
            synthetic_corpus(held_out, 200, seed=1)
        common = ["--train_file", str(prefix), "--validation_file", str(held_out), "--test_file", str(held_out),
                  "--vocab_size", "8000", "--tokenizer_train_samples", str(args.tokenizer_train_samples),
                  "--preprocessing_num_workers", str(args.workers), "--cache_dir", str(work / f"cache-{size}"),
                  "--max_eval_samples", "50", "--test_before_training", "false", "--save_strategy", "no",
                  "--per_device_train_batch_size", "32", "--generation_num_beams", "1", "--generation_max_length",
                  "16", *MODEL]  # fmt: skip
        cold = run_worker("preprocess", [*common, "--output_dir", str(work / "out")])
        cached = run_worker("preprocess", [*common, "--output_dir", str(work / "out")])
        steps = ["--max_steps", str(args.steps), "--overwrite_output_dir"]
        in_memory = run_worker("train", [*common, *steps, "--output_dir", str(work / f"run-{size}")])
        streamed = run_worker("train", [*common, *steps, "--streaming", "--output_dir", str(work / f"stream-{size}")])
        figures = {
            "cold_pairs_per_second": size / cold["seconds"],
            "cached_pairs_per_second": size / cached["seconds"],
            "in_memory_peak_rss_mb": in_memory["peak_rss_mb"],
            "streaming_peak_rss_mb": streamed["peak_rss_mb"],
        }
        results["corpora"][size] = figures
        print(f"| {size:,} | {figures['cold_pairs_per_second']:,.0f} | {figures['cached_pairs_per_second']:,.0f} | "
              f"{figures['in_memory_peak_rss_mb']:,.0f} | {figures['streaming_peak_rss_mb']:,.0f} |")  # fmt: skip
    if args.multi30k:
        data = Path(args.multi30k)
        common = ["--train_file", str(data / "train"), "--validation_file", str(data / "val"), "--test_file",
                  str(data / "val"), "--vocab_size", "8000", "--bf16", "--max_steps", str(args.steps),
                  "--max_predict_samples", "10", "--test_before_training", "false", "--save_strategy", "no",
                  "--logging_steps", "10", "--generation_num_beams", "1", "--cache_dir", str(work / "cache-multi30k"),
                  "--overwrite_output_dir", "--output_dir", str(work / "multi30k"), *MODEL]  # fmt: skip
        print("\n| Multi30k batches | padding fraction | training tokens/s (real) |\n| --- | --- | --- |")
        for name, batching in (("--per_device_train_batch_size 64", ["--per_device_train_batch_size", "64"]),
                               ("--max_tokens 4096", ["--max_tokens", "4096"])):  # fmt: skip
            figures = run_worker("train", [*common, *batching])
            speed = figures["real_tokens"] / figures["train_seconds"]
            results["batching"][name] = {**figures, "tokens_per_second": speed}
            print(f"| {name} | {figures['padding_fraction']:.3f} | {speed:,.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
