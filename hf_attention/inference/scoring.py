"""Scoring given translations: each target's log-probability given its source under teacher forcing (fairseq's
`--score-reference`, CTranslate2's `score_batch`), `hf_attention.score(model, tokenizer, sources, targets)`.

A target's score is the sum of its tokens' log-probabilities, the end-of-sentence token included when the tokenizer
adds it (a string target) or when the ids hold it (ids from `generate()`): for `generate()`'s own output, the sum of
the log-probabilities of the tokens it chose, step by step.
"""

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..data.batching import cut_into_batches


@dataclass(frozen=True)
class TargetScore:
    """One target's log-probability: `total` = sum(`token_scores`), one entry per target token in `tokens`."""

    total: float
    token_scores: list[float]
    tokens: list[str]


def score(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    sources: list[str],
    targets: list[str] | list[list[int]],
    batch_size: int = 32,
) -> list[TargetScore]:
    """The log-probability of each target given its source, token by token.

    Args:
        model: an encoder-decoder model (hf_attention's or any transformers seq2seq model).
        tokenizer: its tokenizer; targets given as text are tokenized with `text_target` (end token added).
        sources: the source sentences.
        targets: one target per source: text, or token ids (for example `generate()`'s sequences without the
            decoder start token and padding).
        batch_size: pairs per forward pass (length-sorted, so little is padding).

    Returns:
        One `TargetScore` per pair, in order.

    Raises:
        ValueError: as many targets as sources are needed, and no target may be empty.
    """
    if len(sources) != len(targets):
        raise ValueError(f"targets: {len(targets)} targets for {len(sources)} sources; give one per source.")
    if targets and isinstance(targets[0], str):
        target_ids = tokenizer(text_target=list(targets), truncation=True)["input_ids"]
    else:
        target_ids = [list(map(int, ids)) for ids in targets]
    empty = [index for index, ids in enumerate(target_ids) if not ids]
    if empty:
        raise ValueError(f"targets[{empty[0]}]: an empty target has no tokens to score.")
    found: list[TargetScore | None] = [None] * len(sources)
    lengths = [len(ids) for ids in target_ids]
    was_training = model.training
    model.eval()
    try:
        for batch in cut_into_batches(lengths, None, max_rows=batch_size, longest_first=True):
            encoded = tokenizer([sources[i] for i in batch], padding=True, truncation=True, return_tensors="pt")
            longest = max(lengths[i] for i in batch)
            labels = torch.full((len(batch), longest), -100, dtype=torch.long)
            for row, index in enumerate(batch):
                labels[row, : lengths[index]] = torch.tensor(target_ids[index])
            with torch.inference_mode():
                logits = model(**encoded.to(model.device), labels=labels.to(model.device)).logits.float()
            log_probs = logits.log_softmax(-1).gather(-1, labels.clamp(min=0).to(model.device)[..., None])[..., 0]
            for row, index in enumerate(batch):
                token_scores = log_probs[row, : lengths[index]].tolist()
                tokens = tokenizer.convert_ids_to_tokens(target_ids[index])
                found[index] = TargetScore(sum(token_scores), token_scores, tokens)
    finally:
        model.train(was_training)
    return found
