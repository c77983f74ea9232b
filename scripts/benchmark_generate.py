"""Generation speed, side by side in one run: hf_attention with and without the KV cache, and MarianMTModel.

MarianMTModel is our random-weight model (Table 3's base by default) converted with `hf_attention_to_marian`, so both
compute the same function and generate the same tokens (checked); each generates exactly `--new_tokens` tokens per
sentence, so the timings compare the same amount of work. Reports the median of `--repeats` runs and the ratios.

    python scripts/benchmark_generate.py --preset base --batch_size 8 --num_beams 4
"""

import statistics
import time
from dataclasses import dataclass

import torch
from transformers import HfArgumentParser

from hf_attention import HfAttentionConfig, HfAttentionForConditionalGeneration
from hf_attention.marian_conversion import hf_attention_to_marian


@dataclass
class BenchmarkArguments:
    preset: str = "base"
    vocab_size: int = 8000
    batch_size: int = 8
    source_length: int = 30
    new_tokens: int = 40
    num_beams: int = 1
    repeats: int = 3
    attn_implementation: str = "sdpa"
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    threads: int = 0


def time_generate(model, input_ids, args: BenchmarkArguments, use_cache: bool) -> float:
    def run():
        model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            num_beams=args.num_beams,
            max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens,
            use_cache=use_cache,
            do_sample=False,
        )
        if args.device == "cuda":
            torch.cuda.synchronize()

    run()  # warm-up
    timings = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        run()
        timings.append(time.perf_counter() - started)
    return statistics.median(timings)


def main() -> None:
    (args,) = HfArgumentParser(BenchmarkArguments).parse_args_into_dataclasses()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = HfAttentionConfig.from_preset(args.preset, vocab_size=args.vocab_size, dropout=0.0)
    torch.manual_seed(0)
    ours = HfAttentionForConditionalGeneration(config).eval()
    marian = hf_attention_to_marian(ours)
    ours.generation_config.forced_eos_token_id = marian.generation_config.forced_eos_token_id = None
    input_ids = torch.randint(3, args.vocab_size, (args.batch_size, args.source_length), device=args.device)
    results = {}
    with torch.no_grad():
        generated = [
            model.to(args.device).generate(input_ids, num_beams=args.num_beams, max_new_tokens=8)
            for model in (ours, marian)
        ]
        if not torch.equal(*generated):
            raise RuntimeError("hf_attention and its Marian conversion generated different tokens.")
        for name, model in (("hf_attention", ours), ("marian", marian)):
            model.set_attn_implementation(args.attn_implementation)
            model.to(args.device).eval()
            results[f"{name} cached"] = time_generate(model, input_ids, args, use_cache=True)
        results["hf_attention uncached"] = time_generate(ours, input_ids, args, use_cache=False)

    tokens = args.batch_size * args.new_tokens
    print(
        f"{args.preset} preset, batch {args.batch_size}, source {args.source_length} tokens, {args.new_tokens} new "
        f"tokens, beams {args.num_beams}, {args.attn_implementation}, {args.device}, torch threads "
        f"{torch.get_num_threads()}"
    )
    for name, seconds in results.items():
        print(f"  {name:<24} {seconds:7.3f} s   {tokens / seconds:8.1f} tokens/s")
    cache_speed_up = results["hf_attention uncached"] / results["hf_attention cached"]
    print(f"  cache speed-up (uncached / cached):      {cache_speed_up:.2f}x")
    print(
        f"  hf_attention vs Marian (Marian / ours):  {results['marian cached'] / results['hf_attention cached']:.2f}x"
    )


if __name__ == "__main__":
    main()
