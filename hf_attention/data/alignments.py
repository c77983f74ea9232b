"""Word alignments of training pairs, for guided-alignment training (`--guided_alignment FILE`).

The file holds one line per training pair, in the training data's order, in Moses' layout: `0-0 1-2 2-1` links source
word i to target word j (whitespace-separated words, counted from 0; the layout fast_align, eflomal and awesome-align
write). An empty line is a pair without links. Tokenizing a pair turns its word links into subword links (every
subword of an aligned source word with every subword of its target word, as Garg et al., 2019 do), stored flat in the
`alignment` column; `GuidedAlignmentCollator` makes them a (B, T, S) matrix per batch.
"""

import re
from pathlib import Path

import torch

LINK = re.compile(r"(\d+)-(\d+)")


class AlignmentFileError(ValueError):
    """An alignment file that cannot be read, or does not pair with the training data (the line is named)."""


def parse_alignment(line: str) -> list[tuple[int, int]]:
    """`"0-0 1-2"` -> [(0, 0), (1, 2)].

    Raises:
        ValueError: a field that is not `i-j` (named).
    """
    links = []
    for field in line.split():
        match = LINK.fullmatch(field)
        if match is None:
            raise ValueError(f"{field!r} is not a link i-j of two word indices")
        links.append((int(match[1]), int(match[2])))
    return links


def read_alignment_file(path: str, pairs: int) -> list[str]:
    """The lines of `path`, checked: as many as `pairs`, each a list of `i-j` links.

    Raises:
        AlignmentFileError: a missing file, another number of lines, or a malformed line (its number named).
    """
    flag = f"--guided_alignment {path}"
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise AlignmentFileError(f"{flag}: {getattr(error, 'strerror', None) or error}.") from None
    if len(lines) != pairs:
        raise AlignmentFileError(f"{flag}: {len(lines)} lines for {pairs} training pairs; give one line (possibly "
                                 "empty) per pair, in the training data's order.")  # fmt: skip
    for number, line in enumerate(lines, start=1):
        try:
            parse_alignment(line)
        except ValueError as error:
            raise AlignmentFileError(f"{flag}: line {number}: {error}.") from None
    return lines


def subword_links(line: str, source_words: list[int | None], target_words: list[int | None]) -> list[int]:
    """The pair's word links as subword links, flat: [t0, s0, t1, s1, ...] with t a target token position and s a
    source token position; `source_words` / `target_words` give each token's word (None for special tokens)."""
    sources_of: dict[int, list[int]] = {}
    for position, word in enumerate(source_words):
        if word is not None:
            sources_of.setdefault(word, []).append(position)
    targets_of: dict[int, list[int]] = {}
    for position, word in enumerate(target_words):
        if word is not None:
            targets_of.setdefault(word, []).append(position)
    flat = []
    for source_word, target_word in parse_alignment(line):
        for t in targets_of.get(target_word, ()):
            for s in sources_of.get(source_word, ()):
                flat += [t, s]
    return flat


class GuidedAlignmentCollator:
    """Wraps a collator: the features' `alignment` (flat subword links) becomes the batch's `alignment_targets`, a
    (B, T, S) 0/1 matrix over the padded target and source positions; the rest is the wrapped collator's."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, features: list[dict]) -> dict:
        if not features or "alignment" not in features[0]:
            return self.collator(features)
        links = [feature.pop("alignment") for feature in features]
        batch = self.collator(features)
        targets = torch.zeros(len(features), batch["labels"].shape[1], batch["input_ids"].shape[1])
        for row, flat in enumerate(links):
            pairs = torch.tensor(list(flat), dtype=torch.long).view(-1, 2)
            if len(pairs):
                inside = (pairs[:, 0] < targets.shape[1]) & (pairs[:, 1] < targets.shape[2])  # cut by truncation
                targets[row, pairs[inside, 0], pairs[inside, 1]] = 1.0
        batch["alignment_targets"] = targets
        return batch

    def __getattr__(self, name):  # the wrapped collator's attributes (tokenizer, padding, ...)
        return getattr(self.collator, name)
