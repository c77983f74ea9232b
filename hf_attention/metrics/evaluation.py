"""BLEU and chrF with sacreBLEU through `evaluate` (local metric modules, no network), and scoring a saved model.

`evaluate.load("sacrebleu")` downloads the metric's code from the Hub at run time; the same metrics ship in
`hf_attention/metrics/` and load by path, so scoring works offline and gives sacreBLEU's own numbers and signature.
"""

from collections.abc import Callable
from pathlib import Path

import evaluate
import numpy as np
from transformers import (
    EvalPrediction,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from ..configuration_hf_attention import require_positive_integers
from ..inference.translate import TorchEngine, translate_sentences

METRICS_DIR = Path(__file__).parent


HELPER_MODULES = ("__init__", "evaluation", "sacrebleu_inputs")  # in metrics/, but not metrics


def load_metric(name: str) -> evaluate.EvaluationModule:
    """`"sacrebleu"` or `"chrf"`, from the module shipped in the package."""
    path = METRICS_DIR / f"{name}.py"
    if not path.is_file() or name in HELPER_MODULES:
        choices = sorted(module.stem for module in METRICS_DIR.glob("*.py") if module.stem not in HELPER_MODULES)
        raise ValueError(f"No local metric {name!r}; choose one of {choices}.")
    return evaluate.load(str(path))


def score_translations(predictions: list[str], references: list[str]) -> dict[str, float | str]:
    """Corpus BLEU and chrF of detokenized translations against one reference each, with sacreBLEU signatures.

    `bleu` is cased sacreBLEU (13a tokenization, `case:mixed` in its signature), what WMT reports; `bleu_lowercase`
    is the same on lowercased text (`case:lc`), which most papers on small test sets (Multi30k, IWSLT) report and
    which reads higher. The two are named apart so that nobody compares one with the other.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} translations for {len(references)} references.")
    references = [[reference] for reference in references]
    sacrebleu = load_metric("sacrebleu")
    bleu = sacrebleu.compute(predictions=predictions, references=references)
    lowercased = sacrebleu.compute(predictions=predictions, references=references, lowercase=True)
    chrf = load_metric("chrf").compute(predictions=predictions, references=references)
    return {
        "bleu": bleu["score"],
        "bleu_lowercase": lowercased["score"],
        "chrf": chrf["score"],
        "bleu_signature": bleu["signature"],
        "bleu_lowercase_signature": lowercased["signature"],
        "chrf_signature": chrf["signature"],
    }


def build_compute_metrics(tokenizer: PreTrainedTokenizerBase) -> Callable[[EvalPrediction], dict[str, float]]:
    """`compute_metrics` for `Seq2SeqTrainer` with `predict_with_generate`: cased and lowercased BLEU and chrF of the
    decoded outputs."""

    def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
        generated, labels = prediction.predictions, prediction.label_ids
        generated = np.where(generated < 0, tokenizer.pad_token_id, generated)  # Trainer pads with -100
        labels = np.where(labels < 0, tokenizer.pad_token_id, labels)
        predictions = [text.strip() for text in tokenizer.batch_decode(generated, skip_special_tokens=True)]
        references = [text.strip() for text in tokenizer.batch_decode(labels, skip_special_tokens=True)]
        scores = score_translations(predictions, references)
        return {"bleu": scores["bleu"], "bleu_lowercase": scores["bleu_lowercase"], "chrf": scores["chrf"]}

    return compute_metrics


def translate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    sources: list[str],
    num_beams: int = 4,
    max_new_tokens: int = 128,
    batch_size: int = 32,
) -> list[str]:
    """Beam-search translations of `sources`, in order, from length-sorted batches (`inference/translate.py`'s path).

    Each batch stops at `max_new_tokens` or at twice its longest source plus 10 tokens, whichever is smaller (like
    Marian's and fairseq's length limits), so an untrained model does not generate at full length for every sentence.
    """
    require_positive_integers(
        {"--num_beams": num_beams, "--max_new_tokens": max_new_tokens, "--batch_size": batch_size}
    )
    return translate_sentences(TorchEngine(model, tokenizer, num_beams, max_new_tokens), sources, batch_size)
