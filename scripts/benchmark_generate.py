"""Generation speed and memory, side by side in one run: hf_attention's inference engines against MarianMTModel fp32.

Every engine computes the same function: MarianMTModel is our random-weight model (Table 3's base by default)
converted with `hf_attention_to_marian` (the same tokens are checked), and each hf_attention engine is that model
after `optimize_for_inference` (int8, bf16, or a compiled static cache). Each engine generates exactly --new_tokens
tokens per sentence, for four workloads: greedy and beam 4, at batch 1 and 16, from --source_length-token sources.
Each engine runs in its own process, so that its peak RSS is its own; engines take turns in interleaved rounds, and
the figures are medians over rounds.

    python scripts/benchmark_generate.py                          # CPU, all engines, 3 rounds
    python scripts/benchmark_generate.py --device cuda --engines marian,fp32,bf16,bf16+compile

It prints a table of seconds per workload (and speed relative to Marian), then one line per workload
(greedy_b1, beam4_b1, greedy_b16, beam4_b16): `WORKLOAD: R.RRx Marian`, the fastest hf_attention engine's speed
relative to MarianMTModel fp32.
--json FILE writes every figure.
"""

import json
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser

# workload -> (sentences per batch, beams)
WORKLOADS = {"greedy_b1": (1, 1), "beam4_b1": (1, 4), "greedy_b16": (16, 1), "beam4_b16": (16, 4)}
# engine name -> (quantization, compile); "marian" is MarianMTModel fp32, the baseline
ENGINES = {"fp32": (None, False), "int8": ("int8", False), "bf16": ("bf16", False), "fp32+compile": (None, True),
           "bf16+compile": ("bf16", True)}  # fmt: skip


@dataclass
class BenchmarkArguments:
    engines: str = field(
        default="marian,fp32,int8,bf16",
        metadata={"help": f"Comma-separated: marian and any of {', '.join(ENGINES)}."},
    )
    preset: str = field(default="base", metadata={"help": "Model size (Table 3's base)."})
    vocab_size: int = 8000
    source_length: int = field(default=64, metadata={"help": "Tokens per source sentence."})
    new_tokens: int = field(default=64, metadata={"help": "Tokens generated per sentence (min = max)."})
    workloads: str = field(default=",".join(WORKLOADS), metadata={"help": "Comma-separated subset of the workloads."})
    rounds: int = field(default=3, metadata={"help": "Interleaved rounds; each engine runs every workload once."})
    device: str = field(default="cpu", metadata={"help": "cpu or cuda."})
    json: str = field(default="", metadata={"help": "Write every figure to this file."})
    worker: str = field(default="", metadata={"help": "Internal: run one engine's round in this process."})


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def build_engine(engine: str, args: BenchmarkArguments):
    """The engine's model, on the device; every process builds the same weights from the same seed."""
    from hf_attention import HfAttentionConfig, HfAttentionForConditionalGeneration, optimize_for_inference
    from hf_attention.marian_conversion import hf_attention_to_marian

    torch.manual_seed(0)
    config = HfAttentionConfig.from_preset(args.preset, vocab_size=args.vocab_size, dropout=0.0)
    model = HfAttentionForConditionalGeneration(config).eval()
    model.generation_config.forced_eos_token_id = None
    if engine == "marian":
        model = hf_attention_to_marian(model).eval()
        model.generation_config.forced_eos_token_id = None
        return model.to(args.device)
    quantization, compile_step = ENGINES[engine]
    model.to(args.device)
    return optimize_for_inference(model, quantization, compile=compile_step)


def sources(batch_size: int, args: BenchmarkArguments) -> torch.Tensor:
    generator = torch.Generator().manual_seed(batch_size)
    return torch.randint(3, args.vocab_size, (batch_size, args.source_length), generator=generator).to(args.device)


def generate(model, input_ids: torch.Tensor, beams: int, args: BenchmarkArguments) -> torch.Tensor:
    with torch.inference_mode():
        output = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            num_beams=beams,
            max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens,
            do_sample=False,
        )
    if args.device == "cuda":
        torch.cuda.synchronize()
    return output


def measure(engine: str, args: BenchmarkArguments) -> dict:
    """Worker: one round of every workload (after an untimed warm-up run of each), and this process's peak RSS."""
    model = build_engine(engine, args)
    seconds, first_tokens = {}, {}
    for workload in args.workloads.split(","):
        batch_size, beams = WORKLOADS[workload]
        input_ids = sources(batch_size, args)
        first_tokens[workload] = generate(model, input_ids, beams, args)[0, :8].tolist()  # warm-up (and compile)
        started = time.perf_counter()
        generate(model, input_ids, beams, args)
        seconds[workload] = time.perf_counter() - started
    return {"seconds": seconds, "first_tokens": first_tokens, "peak_rss_mb": peak_rss_mb()}


def run_worker(engine: str, args: BenchmarkArguments) -> dict:
    command = [sys.executable, __file__, "--worker", engine]
    for name, value in asdict(args).items():
        if name not in ("worker", "json", "engines") and value not in ("", None):
            command += [f"--{name}", str(value)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"error: the {engine} worker failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = HfArgumentParser(BenchmarkArguments, description=__doc__.splitlines()[0])
    (args,) = parser.parse_args_into_dataclasses()
    engines = args.engines.split(",")
    unknown = [name for name in engines if name != "marian" and name not in ENGINES]
    if unknown or "marian" not in engines:
        sys.exit(f"error: --engines {args.engines}: give marian and any of {', '.join(ENGINES)}.")
    unknown = [name for name in args.workloads.split(",") if name not in WORKLOADS]
    if unknown:
        sys.exit(f"error: --workloads {unknown[0]!r}: must be among {', '.join(WORKLOADS)}.")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda: no CUDA device is available.")
    if args.worker:
        print(json.dumps(measure(args.worker, args)))
        return

    rounds = {engine: [] for engine in engines}
    for _ in range(args.rounds):
        for engine in engines:
            rounds[engine].append(run_worker(engine, args))
    workloads = args.workloads.split(",")
    for engine in engines:  # the exact engines decode as Marian does; int8 and bf16 may differ
        if ENGINES.get(engine, ("", False))[0] is None and engine != "marian":
            if rounds[engine][0]["first_tokens"] != rounds["marian"][0]["first_tokens"]:
                sys.exit(f"error: {engine} generated other tokens than MarianMTModel.")
    figures = {
        engine: {
            "seconds": {w: statistics.median(r["seconds"][w] for r in rounds[engine]) for w in workloads},
            "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in rounds[engine]),
        }
        for engine in engines
    }
    print(f"{args.preset} preset, vocabulary {args.vocab_size}, {args.source_length} source tokens, "
          f"{args.new_tokens} new tokens, {args.device}, {args.rounds} interleaved rounds, medians\n")  # fmt: skip
    print("| engine | " + " | ".join(workloads) + " | peak RSS (MB) |")
    print("| --- |" + " --- |" * (len(workloads) + 1))
    for engine in engines:
        cells = []
        for workload in workloads:
            seconds = figures[engine]["seconds"][workload]
            ratio = figures["marian"]["seconds"][workload] / seconds
            cells.append(f"{seconds:.3f} s ({ratio:.2f}x)")
        name = "MarianMTModel fp32" if engine == "marian" else f"hf_attention {engine}"
        print(f"| {name} | " + " | ".join(cells) + f" | {figures[engine]['peak_rss_mb']:,.0f} |")
    print()
    for workload in workloads:
        best = min((e for e in engines if e != "marian"), key=lambda e: figures[e]["seconds"][workload])
        ratio = figures["marian"]["seconds"][workload] / figures[best]["seconds"][workload]
        print(f"{workload}: {ratio:.2f}x Marian ({best})")
    if args.json:
        Path(args.json).write_text(json.dumps({"arguments": asdict(args), "figures": figures}, indent=2) + "\n")


if __name__ == "__main__":
    main()
