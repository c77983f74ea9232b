"""`scripts/evaluate_model.py` (console `hf-attention-evaluate`): translate a test set with a saved model through
any engine of `translate.py` (beam search with either length penalty, or minimum Bayes risk over samples), and score
it (BLEU, chrF)."""

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser, set_seed

from ..configuration_hf_attention import require_positive_integers
from ..data import read_parallel_corpus
from ..data.tokenization import check_tokenizer_source
from ..metrics.evaluation import score_translations
from .mbr import MBR_METRICS
from .translate import DTYPES, ENGINES, load_engine, translate_hypotheses


@dataclass
class EvaluationArguments:
    model_dir: str = field(metadata={"help": "A saved model folder (with its tokenizer) or a Hub repo id."})
    test_file: str = field(
        metadata={"help": "Parallel test data: a .tsv or .jsonl file, or a prefix P with files P.SRC and P.TGT."}
    )
    source_lang: str = field(default="en", metadata={"help": "Source language code."})
    target_lang: str = field(default="de", metadata={"help": "Target language code."})
    output_file: str = field(default="", metadata={"help": "Where the JSON report goes (default: stdout only)."})
    engine: str = field(default="torch", metadata={"help": f"Inference engine: {', '.join(ENGINES)}."})
    num_beams: int = field(default=4, metadata={"help": "Beam size."})
    max_new_tokens: int = field(default=128, metadata={"help": "Longest translation, in tokens."})
    batch_size: int = field(default=32, metadata={"help": "Sentences per generate() call."})
    max_samples: int = field(default=0, metadata={"help": "Score only the first N pairs (0: all)."})
    device: str = field(default="cpu", metadata={"help": "cpu or cuda."})
    dtype: str = field(default="float32", metadata={"help": f"The model's dtype: {', '.join(DTYPES)}."})
    quantization: str | None = field(
        default=None, metadata={"help": "torch: int8 or bf16 (optimize_for_inference); ctranslate2: its weight type."}
    )
    progress: bool = field(default=True, metadata={"help": "Show a progress bar on stderr."})
    compile: bool = field(default=False, metadata={"help": "Decode with a static cache and a compiled step."})
    length_penalty_style: str | None = field(
        default=None,
        metadata={"help": "Beam search: gnmt (§6.1's) or transformers (length^α); default: the model's."},
    )
    mbr: int = field(
        default=0, metadata={"help": "Minimum Bayes risk over N samples in place of beam search (0: off)."}
    )
    mbr_metric: str = field(default="chrf", metadata={"help": "MBR's utility: chrf or bleu."})
    seed: int | None = field(default=None, metadata={"help": "Seed of the sampling (--mbr)."})


def evaluate_saved_model(args: EvaluationArguments) -> dict:
    """Translate the test set with a saved model and score it; the report holds the scores and signatures."""
    if args.max_samples < 0:
        raise ValueError(f"--max_samples {args.max_samples}: must be 0 (all) or more.")
    check_tokenizer_source("--model_dir", args.model_dir)
    require_positive_integers(
        {f"--{name}": getattr(args, name) for name in ("num_beams", "max_new_tokens", "batch_size")}
    )
    if args.mbr < 0 or args.mbr == 1 or args.mbr_metric not in MBR_METRICS:
        raise ValueError(f"--mbr {args.mbr} --mbr_metric {args.mbr_metric}: MBR needs 2 or more samples (0: off) "
                         f"and one of {', '.join(MBR_METRICS)}.")  # fmt: skip
    engine = load_engine(args.engine, args.model_dir, args.quantization, args.device, args.dtype,
                         num_beams=args.num_beams, max_new_tokens=args.max_new_tokens,
                         compile=args.compile, length_penalty_style=args.length_penalty_style)  # fmt: skip
    test = read_parallel_corpus(args.test_file, args.source_lang, args.target_lang)
    if args.max_samples:
        test = test.select(range(min(args.max_samples, len(test))))
    sources = [pair[args.source_lang] for pair in test["translation"]]
    references = [pair[args.target_lang] for pair in test["translation"]]
    if args.seed is not None:
        set_seed(args.seed)
    found = translate_hypotheses(engine, sources, args.batch_size, progress=args.progress, mbr=args.mbr,
                                 mbr_metric=args.mbr_metric)  # fmt: skip
    translations = [best.text for best, *_ in found]
    return {
        "model": args.model_dir,
        "test_file": args.test_file,
        "pair": f"{args.source_lang}-{args.target_lang}",
        "engine": args.engine,
        "sentences": len(sources),
        "num_beams": 1 if args.mbr else args.num_beams,  # MBR samples one token at a time
        "length_penalty_style": args.length_penalty_style or "the model's",
        "mbr": f"{args.mbr} samples, {args.mbr_metric}" if args.mbr else "off",
        **score_translations(translations, references),
        "translations": translations,
        "examples": [
            {"source": s, "translation": t, "reference": r}
            for s, t, r in list(zip(sources, translations, references, strict=True))[:5]
        ],
    }


def main(argv: list[str] | None = None) -> None:
    (args,) = HfArgumentParser(EvaluationArguments).parse_args_into_dataclasses(args=argv)
    output_file = Path(args.output_file) if args.output_file else None
    try:
        report = evaluate_saved_model(args)
    except (OSError, ValueError) as error:  # ParallelDataError is a ValueError
        sys.exit(f"error: {error}")
    translations = report.pop("translations")
    text = json.dumps(report, indent=2, ensure_ascii=False)
    if output_file:  # the report, and every hypothesis beside it (one per line)
        output_file.parent.mkdir(parents=True, exist_ok=True)
        output_file.write_text(text + "\n", encoding="utf-8")
        hypotheses = output_file.with_suffix(".translations.txt")
        hypotheses.write_text("".join(f"{line}\n" for line in translations), encoding="utf-8")
        print(f"translations in {hypotheses}", file=sys.stderr)
    print(text)
    print(f"BLEU {report['bleu']:.2f} (cased: {report['bleu_signature']}), lowercased BLEU "
          f"{report['bleu_lowercase']:.2f} ({report['bleu_lowercase_signature']}), chrF {report['chrf']:.2f}",
          file=sys.stderr)  # fmt: skip
