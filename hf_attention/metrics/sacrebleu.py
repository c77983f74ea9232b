"""SacreBLEU as an `evaluate` metric, loadable by path with no network: `evaluate.load(".../metrics/sacrebleu.py")`.

Same inputs and outputs as the Hub's "sacrebleu" metric (which `evaluate.load("sacrebleu")` downloads at run time),
plus `signature`, the sacreBLEU signature that makes a score reproducible (Post, 2018).
"""

import evaluate
import sacrebleu

from .sacrebleu_inputs import FEATURES, reference_streams

_CITATION = """@inproceedings{post-2018-call,
    title = "A Call for Clarity in Reporting {BLEU} Scores",
    author = "Post, Matt",
    booktitle = "Proceedings of the Third Conference on Machine Translation: Research Papers",
    year = "2018",
    pages = "186--191",
}"""
_DESCRIPTION = "Corpus BLEU computed by sacreBLEU on detokenized text, with its signature."
_KWARGS_DESCRIPTION = """
Args:
    predictions: list of translations (str).
    references: list of lists of references (str), the same number of references for every prediction.
    smooth_method, smooth_value, force, lowercase, tokenize, use_effective_order: as `sacrebleu.BLEU`.
Returns:
    score, counts, totals, precisions, bp, sys_len, ref_len, signature.
Example:
    >>> bleu = evaluate.load("path/to/sacrebleu.py")
    >>> bleu.compute(predictions=["hello there"], references=[["hello there"]])["score"]
    100.00000000000004
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Sacrebleu(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            homepage="https://github.com/mjpost/sacreBLEU",
            inputs_description=_KWARGS_DESCRIPTION,
            features=FEATURES,
            reference_urls=["https://github.com/mjpost/sacreBLEU"],
        )

    def _compute(
        self,
        predictions,
        references,
        smooth_method="exp",
        smooth_value=None,
        force=False,
        lowercase=False,
        tokenize=None,
        use_effective_order=False,
    ):
        transposed_references = reference_streams(references, "sacrebleu")
        bleu = sacrebleu.BLEU(
            lowercase=lowercase,
            force=force,
            tokenize=tokenize,
            smooth_method=smooth_method,
            smooth_value=smooth_value,
            effective_order=use_effective_order,
        )
        output = bleu.corpus_score(predictions, transposed_references)
        return {
            "score": output.score,
            "counts": output.counts,
            "totals": output.totals,
            "precisions": output.precisions,
            "bp": output.bp,
            "sys_len": output.sys_len,
            "ref_len": output.ref_len,
            "signature": str(bleu.get_signature()),
        }
