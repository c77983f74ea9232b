"""Minimum Bayes risk decoding: of N sampled translations, the one that agrees most with the others.

Sampling N translations and keeping the one with the highest average utility against the rest (chrF or BLEU, as a
stand-in for the reference the model's distribution implies) is the strongest simple quality gain at inference time
(Eikema & Aziz, 2020; Freitag et al., 2023, who sample with epsilon sampling, ε = 0.02, the default here when no
other sampling option is given).
"""

from sacrebleu.metrics import BLEU, CHRF

MBR_METRICS = ("chrf", "bleu")


def mbr_select(candidates: list[str], metric: str = "chrf") -> int:
    """The index of the candidate whose summed utility against every other candidate is highest (the first of equals).

    Args:
        candidates: translations of one source, e.g. samples.
        metric: `chrf` (sacreBLEU's chrF) or `bleu` (sentence BLEU, exponential smoothing).

    Raises:
        ValueError: an unknown metric, or no candidate.
    """
    if metric not in MBR_METRICS:
        raise ValueError(f"--mbr_metric {metric}: must be one of {', '.join(MBR_METRICS)}.")
    if not candidates:
        raise ValueError("mbr_select: no candidates to choose from.")
    scorer = CHRF() if metric == "chrf" else BLEU(effective_order=True)
    utilities = []
    for index, hypothesis in enumerate(candidates):
        others = [other for position, other in enumerate(candidates) if position != index]
        utilities.append(sum(scorer.sentence_score(hypothesis, [other]).score for other in others))
    return max(range(len(candidates)), key=lambda index: (utilities[index], -index))
