"""Serving throughput and latency under concurrent clients: our server with dynamic batching against the same server
without batching and against CTranslate2 driven one sentence at a time, in one run.

Three servers (`hf-attention-serve`, each in its own process on 127.0.0.1 and a free port) serve one model:

- `batched`: the defaults (dynamic batching, `--quantization auto`: the engine measured fastest on this machine);
- `unbatched`: the same with `--max_wait_ms 0 --max_batch_sentences 1` (one sentence per `generate()` call);
- `ct2`: the CTranslate2 engine (`--engine ctranslate2`, int8) one sentence per `translate_batch` call, as the usual
  hand-written FastAPI + CTranslate2 server does.

For N = 1, 8 and 32 concurrent clients, each client sends one sentence per request, a new one as soon as the last is
answered, until --requests requests are answered (aiohttp's client, 0.9 ms of CPU per request here: httpx's took
2.5 ms, so that one process driving 32 clients on this 2-core machine spread their requests over 100 ms and counted
its own queue in the latencies); the servers take turns in interleaved rounds and the figures are
medians over rounds. Every answer is checked against the sentence's translation alone, so nothing is lost, duplicated
or mixed up. The model is --model, or a random-weight Transformer (Table 3's base by default) with a BPE tokenizer
trained on the sentences; sentences are Multi30k's test set (../shared/data/multi30k) when present, else the toy
corpus. A random model never stops early: every translation is --max_new_tokens tokens.

    python scripts/benchmark_serve.py                        # base, 3 rounds of 128 requests per N
    python scripts/benchmark_serve.py --soak 10000           # also 10,000 requests at 32 clients: losses, RSS growth

The last line: `serving throughput at 32 clients vs unbatched: R.RRx, p99 latency: P ms` (the batched server's p99 at
32 clients). --json FILE writes every figure.
"""

import asyncio
import gzip
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp
from transformers import HfArgumentParser

from hf_attention import hardware
from hf_attention.configuration_hf_attention import require_positive_integers
from hf_attention.serving.process import ServerProcess

MULTI30K = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "multi30k"
SERVERS = {
    "batched": [],
    "unbatched": ["--max_wait_ms", "0", "--max_batch_sentences", "1"],
    "ct2": ["--engine", "ctranslate2", "--quantization", "int8", "--max_wait_ms", "0", "--max_batch_sentences", "1"],
}


@dataclass
class ServeBenchmarkArguments:
    model: str = field(default="", metadata={"help": "A model folder (default: a random-weight --preset model)."})
    preset: str = field(default="base", metadata={"help": "Size of the random model (Table 3's base)."})
    vocab_size: int = field(default=8000, metadata={"help": "Vocabulary of the random model's tokenizer."})
    servers: str = field(default=",".join(SERVERS), metadata={"help": f"Comma-separated: {', '.join(SERVERS)}."})
    clients: str = field(default="1,8,32", metadata={"help": "Comma-separated numbers of concurrent clients."})
    requests: int = field(default=128, metadata={"help": "Requests per measurement (server, clients, round)."})
    rounds: int = field(default=3, metadata={"help": "Interleaved rounds."})
    max_new_tokens: int = field(default=32, metadata={"help": "Tokens per translation."})
    num_beams: int = field(default=1, metadata={"help": "Beam size of every request."})
    soak: int = field(default=0, metadata={"help": "Then this many requests at the most clients to `batched`."})
    json: str = field(default="", metadata={"help": "Write every figure to this file."})

    def __post_init__(self):
        positive = ("requests", "rounds", "max_new_tokens", "num_beams", "vocab_size")
        try:
            require_positive_integers({f"--{name}": getattr(self, name) for name in positive})
        except ValueError as error:
            sys.exit(f"error: {error}")
        unknown = set(self.servers.split(",")) - set(SERVERS)
        if unknown or "batched" not in self.servers.split(","):
            sys.exit(f"error: --servers {self.servers}: give batched and any of {', '.join(SERVERS)}.")
        if not all(part.isdigit() and int(part) > 0 for part in self.clients.split(",")):
            sys.exit(f"error: --clients {self.clients}: must be positive integers, comma-separated.")
        if self.model and not Path(self.model).is_dir():
            sys.exit(f"error: --model {self.model}: not a folder.")


def benchmark_sentences() -> list[str]:
    if (MULTI30K / "test_2016_flickr.en.gz").is_file():
        with gzip.open(MULTI30K / "test_2016_flickr.en.gz", "rt", encoding="utf-8") as lines:
            return [line.strip() for line in lines if line.strip()]
    from hf_attention.data import toy_translation_corpus

    return [pair["translation"]["en"] for pair in toy_translation_corpus(1000)]


def random_model(folder: Path, sentences: list[str], args: ServeBenchmarkArguments) -> Path:
    """A random-weight model of --preset size with a BPE tokenizer trained on `sentences`, saved in `folder`."""
    import torch

    from hf_attention import HfAttentionConfig, HfAttentionForConditionalGeneration
    from hf_attention.data.tokenization import train_tokenizer

    tokenizer = train_tokenizer(sentences, vocab_size=args.vocab_size)
    special = {name: getattr(tokenizer, name) for name in ("pad_token_id", "bos_token_id", "eos_token_id")}
    torch.manual_seed(0)
    config = HfAttentionConfig.from_preset(args.preset, vocab_size=len(tokenizer), dropout=0.0, **special)
    model = HfAttentionForConditionalGeneration(config).eval()
    model.generation_config.forced_eos_token_id = None
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


async def drive(url: str, sentences: list[str], clients: int, requests: int, args) -> dict:
    """`clients` concurrent clients, one sentence per request, until `requests` are answered: sentences/s, latency
    percentiles, and the answers (in request order)."""
    answers, latencies, next_request = [None] * requests, [], iter(range(requests))

    async def client(session: aiohttp.ClientSession) -> None:
        for index in next_request:
            body = {"text": sentences[index % len(sentences)], "max_new_tokens": args.max_new_tokens,
                    "num_beams": args.num_beams}  # fmt: skip
            started = time.perf_counter()
            async with session.post(url + "/v1/translate", json=body) as response:
                response.raise_for_status()
                answer = await response.json()
            latencies.append(time.perf_counter() - started)
            answers[index] = answer["translations"][0]["text"]

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(clients)))
        seconds = time.perf_counter() - started
    latencies.sort()
    return {
        "sentences_per_second": requests / seconds,
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "answers": answers,
    }


def resident_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    (args,) = HfArgumentParser(ServeBenchmarkArguments).parse_args_into_dataclasses()
    print(hardware.describe(), flush=True)
    sentences = benchmark_sentences()
    names, counts = args.servers.split(","), [int(part) for part in args.clients.split(",")]
    with tempfile.TemporaryDirectory(prefix="hf_attention-serve-bench-") as temporary:
        model = args.model or str(random_model(Path(temporary) / "model", sentences, args))
        flags = [model, "--max_new_tokens", str(args.max_new_tokens), "--log_level", "warning"]
        servers = {name: ServerProcess([*flags, *SERVERS[name]], wait_until_ready=False) for name in names}
        try:
            for server in servers.values():
                server.__enter__()
            for server in servers.values():
                server.wait_for_health(time.monotonic() + 600)
            results = measure(servers, sentences, counts, args)
        finally:
            for server in servers.values():
                server.stop()
    report(results, names, counts, args)


def measure(servers: dict, sentences: list[str], counts: list[int], args) -> dict:
    sentences = sentences[: args.requests]  # the pool every measurement draws from, in turn
    reference = asyncio.run(drive(servers["batched"].url, sentences, 1, len(sentences), args))
    expected = reference["answers"]  # each sentence's translation, alone
    figures = {name: {count: [] for count in counts} for name in servers}
    for round_number in range(args.rounds):
        for count in counts:
            for name, server in servers.items():
                result = asyncio.run(drive(server.url, sentences, count, args.requests, args))
                answers = result.pop("answers")
                result["lost"] = sum(answer is None for answer in answers)
                # answers that differ from the sentence's translation alone: none in float32; with int8 weights
                # (fbgemm quantises a whole batch's activations with one scale) a near-tie can flip; CTranslate2's
                # int8 differs from torch's in the last digits anyway
                result["differ"] = sum(a != expected[i % len(expected)] for i, a in enumerate(answers))
                figures[name][count].append(result)
                speed, p50, p99 = result["sentences_per_second"], result["p50_ms"], result["p99_ms"]
                print(f"round {round_number + 1} {name:9s} {count:3d} clients: {speed:7.1f} sentences/s, "
                      f"p50 {p50:7.1f} ms, p99 {p99:7.1f} ms, {result['lost']} lost, {result['differ']} differ from "
                      "alone", flush=True)  # fmt: skip
    results = {name: {count: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
                      for count, runs in by_count.items()} for name, by_count in figures.items()}  # fmt: skip
    if args.soak:
        results["soak"] = soak(servers["batched"], sentences, expected, max(counts), args)
    return results


def soak(server, sentences: list[str], expected: list[str], clients: int, args) -> dict:
    """`args.soak` requests at `clients` clients: every answer present and right, and the server's RSS growth after a
    warm-up of a tenth of them."""
    warm_up = asyncio.run(drive(server.url, sentences, clients, max(args.soak // 10, 1), args))
    before = resident_mb(server.process.pid)
    result = asyncio.run(drive(server.url, sentences, clients, args.soak, args))
    after = resident_mb(server.process.pid)
    answers = result.pop("answers")
    lost = sum(answer is None for answer in answers)
    differ = sum(a is not None and a != expected[i % len(expected)] for i, a in enumerate(answers))
    del warm_up
    return {**result, "requests": args.soak, "lost": lost, "differ": differ, "rss_before_mb": before,
            "rss_after_mb": after, "rss_growth": after / before - 1}  # fmt: skip


def report(results: dict, names: list[str], counts: list[int], args) -> None:
    print(f"\nmedians over {args.rounds} rounds of {args.requests} one-sentence requests "
          f"({args.max_new_tokens} new tokens, beam {args.num_beams}):")  # fmt: skip
    print("| server | " + " | ".join(f"{n} clients: sentences/s, p50, p99 (ms)" for n in counts) + " |")
    print("| --- |" + " --- |" * len(counts))
    for name in names:
        cells = [f"{r['sentences_per_second']:.1f}, {r['p50_ms']:.0f}, {r['p99_ms']:.0f}"
                 for r in (results[name][n] for n in counts)]  # fmt: skip
        print(f"| {name} | " + " | ".join(cells) + " |")
    most, batched = max(counts), results["batched"]
    if "ct2" in results:
        ratio = batched[most]["sentences_per_second"] / results["ct2"][most]["sentences_per_second"]
        print(f"serving throughput at {most} clients vs CTranslate2 one sentence at a time: {ratio:.2f}x")
    print(f"p99 at {most} clients / p50 of 1 client: {batched[most]['p99_ms'] / batched[min(counts)]['p50_ms']:.2f}")
    if "soak" in results:
        soak_figures = results["soak"]
        print(f"soak: {soak_figures['requests']} requests at {most} clients, {soak_figures['lost']} lost, "
              f"{soak_figures['differ']} differ from alone, RSS {soak_figures['rss_before_mb']:.0f} -> "
              f"{soak_figures['rss_after_mb']:.0f} MB ({100 * soak_figures['rss_growth']:+.1f}%)")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"arguments": asdict(args), "machine": hardware.describe(),
                                               "results": results}, indent=1))  # fmt: skip
    ratio = (
        batched[most]["sentences_per_second"] / results["unbatched"][most]["sentences_per_second"]
        if "unbatched" in results
        else float("nan")
    )
    p99 = batched[most]["p99_ms"]
    print(f"serving throughput at {most} clients vs unbatched: {ratio:.2f}x, p99 latency: {p99:.0f} ms")


if __name__ == "__main__":
    main()
