"""What the local sacreBLEU metrics share: their input features and how references reach sacreBLEU.

`evaluate.load(path)` copies this file beside the metric module that imports it (`from .sacrebleu_inputs import`).
"""

import datasets

# One or several references per prediction, as the Hub's "sacrebleu" and "chrf" metrics accept.
FEATURES = [
    datasets.Features(
        {
            "predictions": datasets.Value("string", id="sequence"),
            "references": datasets.Sequence(datasets.Value("string", id="sequence"), id="references"),
        }
    ),
    datasets.Features(
        {
            "predictions": datasets.Value("string", id="sequence"),
            "references": datasets.Value("string", id="sequence"),
        }
    ),
]


def reference_streams(references: list, metric: str) -> list[list[str]]:
    """Per-prediction references -> sacreBLEU's reference streams (stream i holds every prediction's i-th reference).

    Raises:
        ValueError: predictions with different numbers of references.
    """
    references = [[reference] if isinstance(reference, str) else reference for reference in references]
    references_per_prediction = len(references[0]) if references else 1
    if any(len(refs) != references_per_prediction for refs in references):
        raise ValueError(f"{metric} needs the same number of references for every prediction.")
    return [[refs[i] for refs in references] for i in range(references_per_prediction)]
