"""Translating a file: `scripts/translate.py --model M --input FILE --output FILE` (console `hf-attention-translate`).

Sentences are sorted by length and cut into batches (`--batch_size` sentences, or `--max_tokens` padded tokens), so a
batch wastes little on padding; what was found is written in input order, in one go, once every input was checked.
The engines (`--engine torch|ctranslate2|onnx`) are `engines.py`'s; besides the best translation the command writes
n-best lists with scores (`--n_best`, `--scores`, `--output_format jsonl`, `--token_scores`: `output_formats.py`),
scores given translations (`--score_targets`: `scoring.py`), samples (`--do_sample`) and chooses among samples by
minimum Bayes risk (`--mbr`: `mbr.py`), writes word alignments (`--alignments`: `alignment.py`), meets lexical
constraints (`--constraints`: `constraints_hf_attention.py`), and decodes with an ensemble of models (`--model A
--model B`: `ensemble.py`). `scripts/evaluate_model.py` translates through the same path.
"""

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm
from transformers import HfArgumentParser, set_seed

from .. import hardware
from ..configuration_hf_attention import require_positive_integers
from ..constraints_hf_attention import LexicalConstraints
from ..data.batching import cut_into_batches
from .alignment import check_alignment_layer
from .allocator import reuse_freed_memory
from .engines import (  # noqa: F401 - the engines' names, also importable from here as before
    DTYPES,
    ENGINES,
    CTranslate2Engine,
    Engine,
    Hypothesis,
    OnnxEngine,
    Sampling,
    TorchEngine,
    check_engine_options,
    import_ctranslate2,
    load_engine,
)
from .errors import ExportError, TranslationError
from .mbr import MBR_METRICS, mbr_select
from .output_formats import OUTPUT_FORMATS, format_hypotheses, format_target_scores
from .scoring import score

# With --compile left to "auto", files shorter than this decode uncompiled: compiling a step takes 20-40 s, longer than
# decoding a short file takes (Multi30k's 1,000 test sentences, beam 4: 12-14 s in every engine).
COMPILE_FROM_SENTENCES = 1000


def length_sorted_batches(lengths: list[int], batch_size: int, max_tokens: int | None = None) -> list[list[int]]:
    """Indices of the sentences, longest first, in batches of at most `batch_size` sentences, or (with `max_tokens`)
    of at most `max_tokens` padded tokens (sentences × the longest): `data.batching.cut_into_batches`."""
    if max_tokens:
        return cut_into_batches(lengths, max_tokens, longest_first=True)
    return cut_into_batches(lengths, None, max_rows=batch_size, longest_first=True)


def read_lines(path: str, flag: str = "--input") -> list[str]:
    """The lines of `path` (`-`: standard input), without their line ends.

    Raises:
        TranslationError: the file is missing, or a line is not UTF-8 (its number named).
    """
    if path == "-":
        data = sys.stdin.buffer.read()
    else:
        try:
            data = Path(path).read_bytes()
        except OSError as error:
            raise TranslationError(f"{flag} {path}: {error.strerror or error}.") from None
    lines = data.splitlines()
    for number, line in enumerate(lines, start=1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as error:
            raise TranslationError(
                f"{flag} {path}: line {number} is not UTF-8 (byte {line[error.start]:#04x} at column "
                f"{error.start + 1})."
            ) from None
    return [line.decode("utf-8") for line in lines]


def translate_hypotheses(
    engine: Engine, sentences: list[str], batch_size: int = 32, max_tokens: int | None = None, progress: bool = False,
    n_best: int = 1, scores: bool = False, sampling: Sampling | None = None, mbr: int = 0, mbr_metric: str = "chrf",
    prefixes: list[str] | None = None, constraints: list[LexicalConstraints | None] | None = None,
    alignments: bool = False,
) -> list[list[Hypothesis]]:  # fmt: skip
    """The `n_best` hypotheses of each of `sentences` (with scores when asked for), in their order, from
    length-sorted batches; with `mbr` N, the one of N samples that `mbr_select` prefers; with `prefixes` (one per
    sentence, "" for none), translations that continue them; with `constraints` (one per sentence, None for none),
    translations that meet them."""
    found: list[list[Hypothesis]] = [[] for _ in sentences]
    lengths = [engine.token_count(sentence) for sentence in sentences] if max_tokens else [len(s) for s in sentences]
    with tqdm(total=len(sentences), disable=not progress, unit="sentence", file=sys.stderr) as bar:
        for batch in length_sorted_batches(lengths, batch_size, max_tokens):
            starts = [prefixes[i] for i in batch] if prefixes else None
            wanted = [constraints[i] for i in batch] if constraints else None
            if mbr:
                drawing = sampling or Sampling(epsilon_cutoff=0.02)
                samples = engine.translate([sentences[i] for i in batch], n_best=mbr, scores=scores,
                                           sampling=drawing, prefixes=starts)  # fmt: skip
                hypotheses = [[found[mbr_select([h.text for h in found], mbr_metric)]] for found in samples]
            else:
                hypotheses = engine.translate([sentences[i] for i in batch], n_best=n_best, scores=scores,
                                              sampling=sampling, prefixes=starts, constraints=wanted,
                                              alignments=alignments)  # fmt: skip
            for index, hypotheses_of_one in zip(batch, hypotheses, strict=True):
                found[index] = hypotheses_of_one
            bar.update(len(batch))
    return found


CONSTRAINT_KEYS = ("constraints", "avoid")


def read_constraints(path: str, sentences: int) -> list[tuple[list[str], list[str]] | None]:
    """Each line's (include, avoid) phrases from a file of JSON lines (Sockeye's `constraints` and `avoid` keys; a
    `text` key, Sockeye's source, is allowed and ignored); None for an empty line or `{}`.

    Raises:
        TranslationError: another number of lines than `sentences`, or a line that is not such an object (its
            number named).
    """
    lines = read_lines(path, "--constraints")
    if len(lines) != sentences:
        raise TranslationError(f"--constraints {path}: {len(lines)} lines for {sentences} in --input; give one "
                               "(possibly empty) per source line.")  # fmt: skip
    found = []
    for number, line in enumerate(lines, start=1):
        try:
            entry = json.loads(line) if line.strip() else {}
        except json.JSONDecodeError as error:
            raise TranslationError(f"--constraints {path}: line {number} is not JSON ({error.msg}).") from None
        unknown = set(entry) - {*CONSTRAINT_KEYS, "text"} if isinstance(entry, dict) else None
        phrases = [entry.get(key, []) for key in CONSTRAINT_KEYS] if isinstance(entry, dict) else None
        if (
            unknown is None
            or unknown
            or any(
                not isinstance(given, list) or not all(isinstance(p, str) and p.strip() for p in given)
                for given in phrases
            )
        ):
            listed = f" (unknown keys: {', '.join(sorted(unknown))})" if unknown else ""
            raise TranslationError(f"--constraints {path}: line {number} must be an object whose \"constraints\" "
                                   f"and \"avoid\" are lists of non-empty phrases{listed}.")  # fmt: skip
        found.append((phrases[0], phrases[1]) if any(phrases) else None)
    return found


def translate_sentences(
    engine: Engine, sentences: list[str], batch_size: int = 32, max_tokens: int | None = None, progress: bool = False
) -> list[str]:
    """Translations of `sentences`, in their order, from length-sorted batches."""
    return [best.text for best, *_ in translate_hypotheses(engine, sentences, batch_size, max_tokens, progress)]


@dataclass
class TranslateArguments:
    model: list[str] = field(
        metadata={
            "help": "An hf_attention model folder or Hub id (or, for ctranslate2, an export); give --model again "
            "for an ensemble (torch engine), which averages the models' log-probabilities at every step.",
            "action": "append",
        }
    )
    input: str = field(default="-", metadata={"help": "Source sentences, one per line (UTF-8); - for stdin."})
    output: str = field(default="-", metadata={"help": "Where the translations go, one per line; - for stdout."})
    engine: str = field(default="torch", metadata={"help": f"Inference engine: {', '.join(ENGINES)}."})
    quantization: str | None = field(
        default="auto",
        metadata={
            "help": "auto: the fastest measured for this machine and workload (torch: hf_attention.hardware's choice; "
            "ctranslate2: its own 'auto'); torch: int8 or bf16 (optimize_for_inference); ctranslate2: int8, "
            "float32, ...; none: the weights as saved."
        },
    )
    device: str = field(default="cpu", metadata={"help": "cpu or cuda."})
    dtype: str = field(default="float32", metadata={"help": f"torch engine: {', '.join(DTYPES)}."})
    batch_size: int = field(default=32, metadata={"help": "Sentences per batch."})
    max_tokens: int | None = field(
        default=None, metadata={"help": "Padded source tokens per batch, in place of --batch_size."}
    )
    num_beams: int | None = field(
        default=None, metadata={"help": "Beam size (default: the model's; 4 with ctranslate2)."}
    )
    max_new_tokens: int = field(default=256, metadata={"help": "Longest translation, in tokens."})
    progress: bool = field(default=True, metadata={"help": "Show a progress bar on stderr."})
    n_best: int = field(
        default=1, metadata={"help": "Hypotheses per sentence, best first, with their scores (at most --num_beams)."}
    )
    scores: bool = field(default=False, metadata={"help": "Write each hypothesis's score (its log-probability)."})
    output_format: str = field(
        default="text", metadata={"help": "text (a line per translation; TSV with scores) or jsonl (see the docs)."}
    )
    token_scores: bool = field(
        default=False, metadata={"help": "jsonl, torch engine: each hypothesis's tokens and their log-probabilities."}
    )
    score_targets: str | None = field(
        default=None,
        metadata={"help": "Score these translations of --input (a line each) instead of translating (torch engine)."},
    )
    length_penalty_style: str | None = field(
        default=None,
        metadata={
            "help": "Beam search: gnmt (§6.1's ((5 + length) / 6)^α) or transformers (length^α); default: the "
            "model's generation config."
        },  # fmt: skip
    )
    target_prefix: str | None = field(
        default=None,
        metadata={
            "help": "A file of translation starts, one per --input line (empty: none), that each translation "
            "continues (torch and ctranslate2 engines)."
        },  # fmt: skip
    )
    do_sample: bool = field(default=False, metadata={"help": "Sample translations in place of beam search."})
    top_k: int | None = field(default=None, metadata={"help": "Sampling: from the k likeliest tokens only."})
    top_p: float | None = field(default=None, metadata={"help": "Sampling: from the smallest set of mass p."})
    temperature: float | None = field(default=None, metadata={"help": "Sampling: divide the logits by this."})
    epsilon_cutoff: float | None = field(
        default=None, metadata={"help": "Sampling: drop tokens below this probability (torch and onnx engines)."}
    )
    seed: int | None = field(default=None, metadata={"help": "Seed of the sampling, for reproducible samples."})
    mbr: int = field(
        default=0,
        metadata={"help": "Minimum Bayes risk: sample N translations, keep the one closest to the others (0: off)."},
    )
    mbr_metric: str = field(default="chrf", metadata={"help": "MBR's utility: chrf or bleu."})
    constraints: str | None = field(
        default=None,
        metadata={
            "help": 'Lexical constraints, a JSON line per --input line: {"constraints": [phrases that must appear], '
            '"avoid": [phrases that must not]} (Sockeye\'s keys; an empty line or {}: none). Torch and onnx engines.'
        },
    )
    alignments: bool = field(
        default=False,
        metadata={
            "help": "Write each hypothesis's word alignment, Moses i-j pairs from cross-attention (torch and "
            "ctranslate2 engines)."
        },
    )
    alignment_layer: int | None = field(
        default=None, metadata={"help": "The decoder layer whose cross-attention aligns (default: the penultimate)."}
    )
    alignment_head: int | None = field(
        default=None, metadata={"help": "One cross-attention head to align with (default: the heads' mean)."}
    )
    compile: bool | None = field(
        default=None,
        metadata={
            "help": "torch engine: decode with a static cache and a compiled step (optimize_for_inference); "
            "default: as --quantization auto chooses for this machine."
        },
    )

    def __post_init__(self):
        # `--model A --model B` (and `--model A B`) arrive as a list per flag: one list of models
        self.model = [name for group in self.model for name in ([group] if isinstance(group, str) else group)]


def write_atomically(path: str, text: str) -> None:
    """`text` into `path`, which appears whole or not at all (and may be the input file)."""
    if path == "-":
        sys.stdout.write(text)
        return
    target = Path(path)
    staging = target.with_name(f".{target.name}.writing")
    staging.write_text(text, encoding="utf-8")
    os.replace(staging, target)


def check_output_options(args: TranslateArguments) -> None:
    """Refuses output options that do not go together, before anything is loaded or written.

    Raises:
        TranslationError: the flag and the reason, in one line.
    """
    positive = ("batch_size", "max_tokens", "num_beams", "max_new_tokens", "n_best")
    require_positive_integers({f"--{name}": getattr(args, name) for name in positive}, TranslationError)
    for name in ("top_k", "top_p", "temperature", "epsilon_cutoff"):
        value = getattr(args, name)
        if value is not None and not (args.do_sample or args.mbr):
            raise TranslationError(f"--{name} {value}: a sampling option; give --do_sample or --mbr N.")
        if value is not None and (value <= 0 or (name in ("top_p", "epsilon_cutoff") and value >= 1)):
            allowed = "between 0 and 1" if name in ("top_p", "epsilon_cutoff") else "positive"
            raise TranslationError(f"--{name} {value}: must be {allowed}.")
    if args.mbr < 0 or args.mbr == 1:
        raise TranslationError(f"--mbr {args.mbr}: the number of samples to choose from must be 2 or more (0: off).")
    if args.mbr_metric not in MBR_METRICS:
        raise TranslationError(f"--mbr_metric {args.mbr_metric}: must be one of {', '.join(MBR_METRICS)}.")
    if (args.do_sample or args.mbr) and args.num_beams not in (None, 1):
        raise TranslationError(f"--num_beams {args.num_beams}: sampling and --mbr draw one sample at a time; "
                               "leave --num_beams out.")  # fmt: skip
    if args.mbr and args.n_best > 1:
        raise TranslationError(f"--n_best {args.n_best}: --mbr keeps one translation per sentence.")
    if args.epsilon_cutoff is not None and args.engine == "ctranslate2":
        raise TranslationError("--epsilon_cutoff: CTranslate2 samples with --top_k, --top_p and --temperature only.")
    if args.target_prefix and args.engine == "onnx":
        raise TranslationError("--target_prefix: the onnx graphs decode one token per step from the start; use the "
                               "torch or ctranslate2 engine.")  # fmt: skip
    if args.target_prefix and args.score_targets:
        raise TranslationError("--target_prefix: --score_targets scores whole given translations; give one or the "
                               "other.")  # fmt: skip
    if args.output_format not in OUTPUT_FORMATS:
        raise TranslationError(f"--output_format {args.output_format}: must be one of {', '.join(OUTPUT_FORMATS)}.")
    if args.num_beams is not None and args.n_best > args.num_beams and not args.do_sample:
        raise TranslationError(f"--n_best {args.n_best}: more than --num_beams {args.num_beams}; the n best come "
                               "from a beam at least as wide.")  # fmt: skip
    if args.token_scores and args.output_format != "jsonl":
        raise TranslationError("--token_scores: per-token scores are written with --output_format jsonl.")
    if (args.token_scores or args.score_targets) and args.engine != "torch":
        flag = "--token_scores" if args.token_scores else "--score_targets"
        raise TranslationError(f"{flag}: scores tokens with the torch engine's model, not with {args.engine}.")
    if args.constraints and (args.engine == "ctranslate2" or args.do_sample or args.mbr or args.score_targets):
        other = "--score_targets" if args.score_targets else "sampling" if args.do_sample or args.mbr else args.engine
        raise TranslationError(f"--constraints: a beam search of the torch engine; not with {other}.")
    if (args.alignment_layer is not None or args.alignment_head is not None) and not args.alignments:
        raise TranslationError("--alignment_layer/--alignment_head: alignment options; give --alignments.")
    if args.alignments and (args.engine == "onnx" or args.score_targets):
        reason = "--score_targets scores, it does not translate" if args.score_targets else "the onnx graphs give none"
        raise TranslationError(f"--alignments: aligns with the model's cross-attention; {reason}.")
    if args.alignments and args.engine != "torch" and (args.alignment_layer is not None or args.alignment_head):
        raise TranslationError("--alignment_layer/--alignment_head: CTranslate2 aligns with the layer and heads "
                               "chosen when the model was exported.")  # fmt: skip
    if args.alignments and args.mbr:
        raise TranslationError("--alignments: --mbr chooses among samples; align the chosen translations with "
                               "hf_attention.align.")  # fmt: skip
    if args.output != "-" and not Path(args.output).parent.is_dir():
        raise TranslationError(f"--output {args.output}: its folder does not exist.")


def main(argv: list[str] | None = None) -> None:
    (args,) = HfArgumentParser(TranslateArguments).parse_args_into_dataclasses(args=argv)
    try:
        check_output_options(args)
        sentences = read_lines(args.input)
        targets = read_lines(args.score_targets, "--score_targets") if args.score_targets else None
        if targets is not None and len(targets) != len(sentences):
            raise TranslationError(f"--score_targets {args.score_targets}: {len(targets)} lines for "
                                   f"{len(sentences)} in --input; give one translation per source line.")  # fmt: skip
        prefixes = read_lines(args.target_prefix, "--target_prefix") if args.target_prefix else None
        if prefixes is not None and len(prefixes) != len(sentences):
            raise TranslationError(f"--target_prefix {args.target_prefix}: {len(prefixes)} lines for "
                                   f"{len(sentences)} in --input; give one start per source line.")  # fmt: skip
        wanted = read_constraints(args.constraints, len(sentences)) if args.constraints else None
        quantization = None if (args.quantization or "none").lower() == "none" else args.quantization
        # compiling takes tens of seconds: "auto" compiles only for files long enough to gain that back
        compile_step = args.compile
        if compile_step is None and len(sentences) < COMPILE_FROM_SENTENCES:
            compile_step = False
        print(hardware.describe(), file=sys.stderr)
        reuse_freed_memory()
        engine = load_engine(args.engine, args.model, quantization, args.device, args.dtype,
                             num_beams=args.num_beams, max_new_tokens=args.max_new_tokens,
                             compile=compile_step, batch_size=args.batch_size,
                             length_penalty_style=args.length_penalty_style)  # fmt: skip
        if args.n_best > engine.num_beams and not args.do_sample:
            raise TranslationError(f"--n_best {args.n_best}: more than the model's {engine.num_beams} beams; "
                                   "give --num_beams.")  # fmt: skip
        constraints = None
        if wanted is not None:
            constraints = [engine.lexical_constraints(*phrases) if phrases else None for phrases in wanted]
            for number, given in enumerate(constraints, start=1):
                if given and given.token_count > args.max_new_tokens:
                    raise TranslationError(
                        f"--constraints {args.constraints}: line {number} has {given.token_count} constraint "
                        f"tokens, more than --max_new_tokens {args.max_new_tokens}."
                    )
        if args.alignments and args.engine == "torch":  # an ensemble aligns with its first model
            try:
                check_alignment_layer(engine.aligner, args.alignment_layer, args.alignment_head)
            except ValueError as error:
                raise TranslationError(f"--{error}") from None
            engine.alignment_layer, engine.alignment_head = args.alignment_layer, args.alignment_head
        started = time.perf_counter()
        if targets is not None:
            scored = score(engine.model, engine.tokenizer, sentences, targets, args.batch_size)
            text = format_target_scores(sentences, targets, scored, args.output_format)
            done = f"scored {len(sentences)} translations"
        else:
            with_scores = args.scores or args.n_best > 1
            sampling = None
            if args.do_sample or args.mbr:
                options = {name: getattr(args, name) for name in ("top_k", "top_p", "temperature", "epsilon_cutoff")}
                sampling = (
                    Sampling(**options) if args.do_sample or any(v is not None for v in options.values()) else None
                )
            if args.seed is not None:
                set_seed(args.seed)
                if args.engine == "ctranslate2":
                    import_ctranslate2().set_random_seed(args.seed)
            found = translate_hypotheses(engine, sentences, args.batch_size, args.max_tokens, args.progress,
                                         n_best=args.n_best, scores=with_scores, sampling=sampling, mbr=args.mbr,
                                         mbr_metric=args.mbr_metric, prefixes=prefixes,
                                         constraints=constraints, alignments=args.alignments)  # fmt: skip
            token_scores = None
            if args.token_scores:
                token_scores = [score(engine.model, engine.tokenizer, [sentence] * len(hypotheses),
                                      [list(h.token_ids) for h in hypotheses]) for sentence, hypotheses in
                                zip(sentences, found, strict=True)]  # fmt: skip
            alignments = [[h.alignment for h in hypotheses] for hypotheses in found] if args.alignments else None
            text = format_hypotheses(found, args.output_format, with_scores, token_scores, alignments)
            words = sum(len(hypotheses[0].text.split()) for hypotheses in found)
            done = f"translated {len(sentences)} sentences ({words} words)"
        seconds = time.perf_counter() - started
    except (ExportError, OSError, TranslationError, ValueError) as error:
        sys.exit(f"error: {error}")
    write_atomically(args.output, text)
    print(f"{done} in {seconds:.1f} s: {len(sentences) / max(seconds, 1e-9):.1f} sentences/s "
          f"({args.engine}, {getattr(engine, 'setting', quantization or args.dtype)}, {args.device})",
          file=sys.stderr)  # fmt: skip
