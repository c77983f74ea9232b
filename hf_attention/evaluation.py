"""BLEU and chrF with sacreBLEU through `evaluate` (local metric modules, no network), and scoring a saved model.

`evaluate.load("sacrebleu")` downloads the metric's code from the Hub at run time; the same metrics ship in
`hf_attention/metrics/` and load by path, so scoring works offline and gives sacreBLEU's own numbers and signature.
"""

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import evaluate
import numpy as np
from transformers import (
    EvalPrediction,
    HfArgumentParser,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .data import read_parallel_corpus
from .tokenization import check_tokenizer_source
from .translation import DTYPES, ENGINES, TorchEngine, load_engine, translate_sentences

METRICS_DIR = Path(__file__).parent / "metrics"
HELPER_MODULES = ("__init__", "sacrebleu_inputs")  # in metrics/, but not metrics


def load_metric(name: str) -> evaluate.EvaluationModule:
    """`"sacrebleu"` or `"chrf"`, from the module shipped in the package."""
    path = METRICS_DIR / f"{name}.py"
    if not path.is_file() or name in HELPER_MODULES:
        choices = sorted(module.stem for module in METRICS_DIR.glob("*.py") if module.stem not in HELPER_MODULES)
        raise ValueError(f"No local metric {name!r}; choose one of {choices}.")
    return evaluate.load(str(path))


def score_translations(predictions: list[str], references: list[str]) -> dict[str, float | str]:
    """Corpus BLEU and chrF of detokenized translations against one reference each, with sacreBLEU signatures."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} translations for {len(references)} references.")
    bleu = load_metric("sacrebleu").compute(predictions=predictions, references=[[r] for r in references])
    chrf = load_metric("chrf").compute(predictions=predictions, references=[[r] for r in references])
    return {
        "bleu": bleu["score"],
        "chrf": chrf["score"],
        "bleu_signature": bleu["signature"],
        "chrf_signature": chrf["signature"],
    }


def build_compute_metrics(tokenizer: PreTrainedTokenizerBase) -> Callable[[EvalPrediction], dict[str, float]]:
    """`compute_metrics` for `Seq2SeqTrainer` with `predict_with_generate`: BLEU and chrF of the decoded outputs."""

    def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
        generated, labels = prediction.predictions, prediction.label_ids
        generated = np.where(generated < 0, tokenizer.pad_token_id, generated)  # Trainer pads with -100
        labels = np.where(labels < 0, tokenizer.pad_token_id, labels)
        predictions = [text.strip() for text in tokenizer.batch_decode(generated, skip_special_tokens=True)]
        references = [text.strip() for text in tokenizer.batch_decode(labels, skip_special_tokens=True)]
        scores = score_translations(predictions, references)
        return {"bleu": scores["bleu"], "chrf": scores["chrf"]}

    return compute_metrics


def translate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    sources: list[str],
    num_beams: int = 4,
    max_new_tokens: int = 128,
    batch_size: int = 32,
) -> list[str]:
    """Beam-search translations of `sources`, in order, from length-sorted batches (translation.py's path).

    Each batch stops at `max_new_tokens` or at twice its longest source plus 10 tokens, whichever is smaller (like
    Marian's and fairseq's length limits), so an untrained model does not generate at full length for every sentence.
    """
    for name, value in (("num_beams", num_beams), ("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
        if value < 1:
            raise ValueError(f"--{name} {value}: must be a positive integer.")
    return translate_sentences(TorchEngine(model, tokenizer, num_beams, max_new_tokens), sources, batch_size)


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


def evaluate_saved_model(args: EvaluationArguments) -> dict:
    """Translate the test set with a saved model and score it; the report holds the scores and signatures."""
    if args.max_samples < 0:
        raise ValueError(f"--max_samples {args.max_samples}: must be 0 (all) or more.")
    check_tokenizer_source("--model_dir", args.model_dir)
    for name in ("num_beams", "max_new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} {getattr(args, name)}: must be a positive integer.")
    engine = load_engine(args.engine, args.model_dir, args.quantization, args.device, args.dtype,
                         num_beams=args.num_beams, max_new_tokens=args.max_new_tokens,
                         compile=args.compile)  # fmt: skip
    test = read_parallel_corpus(args.test_file, args.source_lang, args.target_lang)
    if args.max_samples:
        test = test.select(range(min(args.max_samples, len(test))))
    sources = [pair[args.source_lang] for pair in test["translation"]]
    references = [pair[args.target_lang] for pair in test["translation"]]
    translations = translate_sentences(engine, sources, args.batch_size, progress=args.progress)
    return {
        "model": args.model_dir,
        "test_file": args.test_file,
        "pair": f"{args.source_lang}-{args.target_lang}",
        "engine": args.engine,
        "sentences": len(sources),
        "num_beams": args.num_beams,
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
    print(f"BLEU {report['bleu']:.2f} ({report['bleu_signature']}), chrF {report['chrf']:.2f}", file=sys.stderr)
