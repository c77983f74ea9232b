"""How `scripts/translate.py` writes what it found: translations, n-best lists with scores, scored targets.

`--output_format text` (the default):

- a translation per line; with `--scores` or `--n_best` N > 1, one line per hypothesis, best first, as tab-separated
  `SENTENCE_INDEX  SCORE  TRANSLATION` (the index counts input lines from 0, as fairseq's and Marian's n-best lists
  do);
- with `--alignments`, each translation line ends with a tab and its word alignment, Moses `i-j` pairs (source
  word i, target word j, from 0);
- with `--score_targets`: each pair's total log-probability, one per line.

`--output_format jsonl`: one JSON object per input line,
`{"translation": BEST, "hypotheses": [{"text": ..., "score": ..., "tokens": [...], "token_scores": [...]}, ...]}`
(`score` with `--scores` or `--n_best` > 1; `tokens` and `token_scores`, each token's log-probability, with
`--token_scores`; `alignment`, `"0-0 1-2 ..."`, with `--alignments`); with `--score_targets`:
`{"source": ..., "target": ..., "score": ..., "tokens": [...], "token_scores": [...]}`.
"""

import json

from .alignment import Alignment, format_alignment
from .scoring import TargetScore

OUTPUT_FORMATS = ("text", "jsonl")


def format_hypotheses(found: list[list], output_format: str, with_scores: bool,
                      token_scores: list[list[TargetScore]] | None = None,
                      alignments: list[list[Alignment]] | None = None) -> str:  # fmt: skip
    """The file's text for each sentence's hypotheses (`translate.Hypothesis`, best first), with their alignments
    (one list per sentence, one alignment per hypothesis) when given."""

    def aligned(index: int, rank: int) -> str:
        return f"\t{format_alignment(alignments[index][rank])}" if alignments is not None else ""

    if output_format == "jsonl":
        lines = []
        for index, hypotheses in enumerate(found):
            entries = []
            for rank, hypothesis in enumerate(hypotheses):
                entry = {"text": hypothesis.text}
                if with_scores:
                    entry["score"] = hypothesis.score
                if token_scores is not None:
                    scored = token_scores[index][rank]
                    entry["tokens"], entry["token_scores"] = scored.tokens, scored.token_scores
                if alignments is not None:
                    entry["alignment"] = format_alignment(alignments[index][rank])
                entries.append(entry)
            lines.append(json.dumps({"translation": hypotheses[0].text, "hypotheses": entries}, ensure_ascii=False))
        return "".join(f"{line}\n" for line in lines)
    if not with_scores:
        return "".join(f"{hypotheses[0].text}{aligned(index, 0)}\n" for index, hypotheses in enumerate(found))
    return "".join(
        f"{index}\t{hypothesis.score:.6f}\t{hypothesis.text}{aligned(index, rank)}\n"
        for index, hypotheses in enumerate(found)
        for rank, hypothesis in enumerate(hypotheses)
    )


def format_target_scores(sources: list[str], targets: list[str], scores: list[TargetScore], output_format: str) -> str:
    """The file's text for scored (source, target) pairs."""
    if output_format == "jsonl":
        return "".join(
            json.dumps(
                {
                    "source": source,
                    "target": target,
                    "score": scored.total,
                    "tokens": scored.tokens,
                    "token_scores": scored.token_scores,
                },
                ensure_ascii=False,
            )
            + "\n"  # fmt: skip
            for source, target, scored in zip(sources, targets, scores, strict=True)
        )
    return "".join(f"{scored.total:.6f}\n" for scored in scores)
