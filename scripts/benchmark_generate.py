"""Generation speed and memory, side by side in one run: hf_attention's inference engines against MarianMTModel fp32
and CTranslate2.

Every engine computes the same function: MarianMTModel is our random-weight model (Table 3's base by default)
converted with `hf_attention_to_marian` (the same tokens are checked), each hf_attention engine is that model after
`optimize_for_inference` (int8, bf16, or a compiled static cache), and ct2-float32 / ct2-int8 are that model exported
with `export_ctranslate2` (a vocabulary of placeholder tokens stands in for a tokenizer). Each engine generates
exactly --new_tokens tokens per sentence, for four workloads: greedy and beam 4, at batch 1 and 16, from
--source_length-token sources.
Each engine runs in its own process, so that its peak memory (RSS; on CUDA, torch's GPU allocations) is its own;
engines take turns in interleaved rounds, and the figures are medians over rounds.

    python scripts/benchmark_generate.py                          # CPU: Marian, ours, CTranslate2, 3 rounds
    python scripts/benchmark_generate.py --device cuda --engines marian,fp32,bf16,bf16+compile
    python scripts/benchmark_generate.py --engines marian,ct2-int8,auto   # what optimize_for_inference chooses here

It prints a table of seconds per workload (and speed relative to Marian), then one line per workload
(greedy_b1, beam4_b1, greedy_b16, beam4_b16): `WORKLOAD: R.RRx Marian`, the fastest hf_attention engine's speed
relative to MarianMTModel fp32, followed by CTranslate2's and (engine `auto`: a model set up by
`optimize_for_inference(model, "auto", "auto", batch_size, num_beams)` for each workload) auto's ratio and choice.
The first line is the machine's capability map (`hf_attention.hardware`). --json FILE writes every figure.
"""

import gc
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from benchmark_harness import arguments_as_flags, interleaved_rounds, peak_rss_mb, print_worker_result, run_worker
from transformers import HfArgumentParser

from hf_attention.inference.allocator import reuse_freed_memory

# workload -> (sentences per batch, beams)
WORKLOADS = {"greedy_b1": (1, 1), "beam4_b1": (1, 4), "greedy_b16": (16, 1), "beam4_b16": (16, 4)}
# engine name -> (quantization, compile); "marian" is MarianMTModel fp32, the baseline
ENGINES = {"fp32": (None, False), "int8": ("int8", False), "bf16": ("bf16", False), "fp32+compile": (None, True),
           "int8+compile": ("int8", True), "bf16+compile": ("bf16", True), "auto": ("auto", "auto")}  # fmt: skip
BASELINES = ("marian", "ct2-float32", "ct2-int8")  # MarianMTModel fp32; CTranslate2 with float32 or int8 weights


@dataclass
class BenchmarkArguments:
    engines: str = field(
        default="marian,ct2-float32,ct2-int8,fp32,int8,bf16",
        metadata={"help": f"Comma-separated: marian and any of {', '.join(BASELINES[1:] + tuple(ENGINES))}."},
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


def peak_memory_mb(device: str) -> float:
    """The process's peak resident memory on the CPU; on CUDA, the peak of torch's allocations on the GPU."""
    return torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else peak_rss_mb()


def build_engine(engine: str, args: BenchmarkArguments, batch_size: int = 1, beams: int = 1):
    """The engine's model, on the device; every process builds the same weights from the same seed. "auto" is
    `optimize_for_inference`'s choice for this machine and the workload (`batch_size` sentences, `beams`)."""
    from hf_attention import HfAttentionConfig, HfAttentionForConditionalGeneration, optimize_for_inference
    from hf_attention.hub.marian_conversion import hf_attention_to_marian

    torch.manual_seed(0)
    config = HfAttentionConfig.from_preset(args.preset, vocab_size=args.vocab_size, dropout=0.0)
    model = HfAttentionForConditionalGeneration(config).eval()
    model.generation_config.forced_eos_token_id = None
    if engine.startswith("ct2-"):
        return ctranslate2_translator(model, engine.removeprefix("ct2-"), args)
    if engine == "marian":
        model = hf_attention_to_marian(model).eval()
        model.generation_config.forced_eos_token_id = None
        return model.to(args.device)
    model.to(args.device)
    if engine == "auto":
        return optimize_for_inference(model, "auto", "auto", batch_size=batch_size, num_beams=beams)
    quantization, compile_step = ENGINES[engine]
    return optimize_for_inference(model, quantization, compile=compile_step)


def ctranslate2_translator(model, compute_type: str, args: BenchmarkArguments):
    """The model exported to CTranslate2, with token i written "t{i}" (the benchmark has no tokenizer). The export
    goes to a temporary folder, deleted once the translator has read it into memory."""
    import tempfile

    import ctranslate2
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    from hf_attention.inference.ctranslate2_export import export_ctranslate2

    vocabulary = {f"t{index}": index for index in range(args.vocab_size)}
    names = {"pad_token": model.config.pad_token_id, "bos_token": model.config.bos_token_id,
             "eos_token": model.config.eos_token_id, "unk_token": 3}  # fmt: skip
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocabulary, unk_token="t3")),
        **{name: f"t{index}" for name, index in names.items()},
    )
    with tempfile.TemporaryDirectory(prefix="hf_attention-ct2-") as temporary:
        folder = Path(temporary)
        model.save_pretrained(folder / "model")
        tokenizer.save_pretrained(folder / "model")
        export_ctranslate2(folder / "model", folder / "ct2", quantization=compute_type)
        return ctranslate2.Translator(
            str(folder / "ct2"), device=args.device, compute_type=compute_type, intra_threads=torch.get_num_threads()
        )


def sources(batch_size: int, args: BenchmarkArguments) -> torch.Tensor:
    generator = torch.Generator().manual_seed(batch_size)
    return torch.randint(3, args.vocab_size, (batch_size, args.source_length), generator=generator).to(args.device)


def generate(model, input_ids: torch.Tensor, beams: int, args: BenchmarkArguments) -> torch.Tensor:
    if not isinstance(model, torch.nn.Module):  # a CTranslate2 translator: the same tokens, as strings
        tokens = [[f"t{index}" for index in row] for row in input_ids.tolist()]
        results = model.translate_batch(
            tokens,
            beam_size=beams,
            max_decoding_length=args.new_tokens,
            min_decoding_length=args.new_tokens,
            max_batch_size=len(tokens),
        )
        return torch.tensor([[int(token[1:]) for token in result.hypotheses[0]] for result in results])
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
    from hf_attention import hardware

    model = build_engine(engine, args) if engine != "auto" else None
    seconds, first_tokens, choices = {}, {}, {}
    for workload in args.workloads.split(","):
        batch_size, beams = WORKLOADS[workload]
        if engine == "auto":  # a model set up for this workload, as a user who states it gets
            model = None
            gc.collect()
            torch._dynamo.reset()  # the previous workload's compiled steps go with its model
            model = build_engine(engine, args, batch_size, beams)
            choices[workload] = hardware.inference_choice(args.device, batch_size, beams).describe()
        input_ids = sources(batch_size, args)
        output = generate(model, input_ids, beams, args)  # warm-up (and compile)
        first_tokens[workload] = output[0, -args.new_tokens :][:8].tolist()  # generated tokens (after the start)
        started = time.perf_counter()
        generate(model, input_ids, beams, args)
        seconds[workload] = time.perf_counter() - started
    return {"seconds": seconds, "first_tokens": first_tokens, "peak_memory_mb": peak_memory_mb(args.device),
            "choices": choices}  # fmt: skip


def main() -> None:
    parser = HfArgumentParser(BenchmarkArguments, description=__doc__.splitlines()[0])
    (args,) = parser.parse_args_into_dataclasses()
    if args.worker:  # the parent process checked the arguments
        reuse_freed_memory()  # every engine's process alike, as translate.py and the server set theirs
        print_worker_result(measure(args.worker, args))
        return
    engines = args.engines.split(",")
    unknown = [name for name in engines if name not in BASELINES and name not in ENGINES]
    if unknown or "marian" not in engines or not any(name in ENGINES for name in engines):
        sys.exit(f"error: --engines {args.engines}: give marian, one or more of {', '.join(ENGINES)}, and any of "
                 f"{', '.join(BASELINES[1:])}.")  # fmt: skip
    if any(name.startswith("ct2-") for name in engines):
        try:
            import ctranslate2  # noqa: F401
        except ImportError:
            sys.exit("error: --engines ct2-*: needs the ctranslate2 package: pip install 'hf_attention[ctranslate2]'.")
    unknown = [name for name in args.workloads.split(",") if name not in WORKLOADS]
    if unknown:
        sys.exit(f"error: --workloads {unknown[0]!r}: must be among {', '.join(WORKLOADS)}.")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda: no CUDA device is available.")
    flags = arguments_as_flags(args, leave_out=("worker", "json", "engines"))
    rounds = interleaved_rounds(
        engines, args.rounds, lambda engine: run_worker(__file__, ["--worker", engine, *flags], engine)
    )
    workloads = args.workloads.split(",")
    for engine in engines:  # the exact engines decode as Marian does; int8 and bf16 may differ
        if engine == "ct2-float32" or ENGINES.get(engine, ("", False))[0] is None and engine != "marian":
            if rounds[engine][0]["first_tokens"] != rounds["marian"][0]["first_tokens"]:
                sys.exit(f"error: {engine} generated other tokens than MarianMTModel.")
    figures = {
        engine: {
            "seconds": {w: statistics.median(r["seconds"][w] for r in rounds[engine]) for w in workloads},
            "peak_memory_mb": statistics.median(r["peak_memory_mb"] for r in rounds[engine]),
        }
        for engine in engines
    }
    from hf_attention import hardware

    print(hardware.describe())
    print(f"{args.preset} preset, vocabulary {args.vocab_size}, {args.source_length} source tokens, "
          f"{args.new_tokens} new tokens, {args.device}, {args.rounds} interleaved rounds, medians\n")  # fmt: skip
    memory = "peak GPU memory" if args.device == "cuda" else "peak RSS"
    print("| engine | " + " | ".join(workloads) + f" | {memory} (MB) |")
    print("| --- |" + " --- |" * (len(workloads) + 1))
    for engine in engines:
        cells = []
        for workload in workloads:
            seconds = figures[engine]["seconds"][workload]
            ratio = figures["marian"]["seconds"][workload] / seconds
            cells.append(f"{seconds:.3f} s ({ratio:.2f}x)")
        names = {"marian": "MarianMTModel fp32", "ct2-float32": "CTranslate2 float32", "ct2-int8": "CTranslate2 int8"}
        name = names.get(engine, f"hf_attention {engine}")
        print(f"| {name} | " + " | ".join(cells) + f" | {figures[engine]['peak_memory_mb']:,.0f} |")
    print()
    ours = [engine for engine in engines if engine in ENGINES]
    for workload in workloads:
        best = min(ours, key=lambda engine: figures[engine]["seconds"][workload])
        ratio = figures["marian"]["seconds"][workload] / figures[best]["seconds"][workload]
        line = f"{workload}: {ratio:.2f}x Marian ({best})"
        for engine in (e for e in engines if e.startswith("ct2-") or e == "auto"):
            line += f", {engine} {figures['marian']['seconds'][workload] / figures[engine]['seconds'][workload]:.2f}x"
            if engine == "auto":
                line += f" ({rounds['auto'][0]['choices'][workload]})"
                figures["auto"].setdefault("choices", {})[workload] = rounds["auto"][0]["choices"][workload]
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps({"arguments": asdict(args), "figures": figures}, indent=2) + "\n")


if __name__ == "__main__":
    main()
