"""chrF (and chrF++) by sacreBLEU as an `evaluate` metric, loadable by path with no network.

Same inputs and outputs as the Hub's "chrf" metric, plus `signature`, sacreBLEU's signature for the score.
"""

import evaluate
import sacrebleu

from .sacrebleu_inputs import FEATURES, reference_streams

_CITATION = """@inproceedings{popovic-2015-chrf,
    title = "chr{F}: character n-gram {F}-score for automatic {MT} evaluation",
    author = "Popovi{\\'c}, Maja",
    booktitle = "Proceedings of the Tenth Workshop on Statistical Machine Translation",
    year = "2015",
    pages = "392--395",
}"""
_DESCRIPTION = "Corpus chrF computed by sacreBLEU, with its signature."
_KWARGS_DESCRIPTION = """
Args:
    predictions: list of translations (str).
    references: list of lists of references (str), the same number of references for every prediction.
    char_order, word_order (2 for chrF++), beta, lowercase, whitespace, eps_smoothing: as `sacrebleu.CHRF`.
Returns:
    score, char_order, word_order, beta, signature.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Chrf(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            homepage="https://github.com/mjpost/sacreBLEU#chrf--chrf",
            inputs_description=_KWARGS_DESCRIPTION,
            features=FEATURES,
            reference_urls=["https://github.com/m-popovic/chrF"],
        )

    def _compute(
        self,
        predictions,
        references,
        char_order=6,
        word_order=0,
        beta=2,
        lowercase=False,
        whitespace=False,
        eps_smoothing=False,
    ):
        transposed_references = reference_streams(references, "chrF")
        chrf = sacrebleu.CHRF(
            char_order=char_order,
            word_order=word_order,
            beta=beta,
            lowercase=lowercase,
            whitespace=whitespace,
            eps_smoothing=eps_smoothing,
        )
        output = chrf.corpus_score(predictions, transposed_references)
        return {
            "score": output.score,
            "char_order": output.char_order,
            "word_order": output.word_order,
            "beta": output.beta,
            "signature": str(chrf.get_signature()),
        }
