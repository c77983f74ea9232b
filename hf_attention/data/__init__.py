"""Parallel text for training and evaluation: where it comes from, how it is tokenised and batched."""

from .preprocessing import LengthReport, tokenize_pairs
from .readers import ParallelDataError, read_parallel_corpus
from .toy import number_in_english, number_in_german, toy_translation_corpus, toy_translation_dataset

__all__ = [
    "LengthReport",
    "ParallelDataError",
    "number_in_english",
    "number_in_german",
    "read_parallel_corpus",
    "tokenize_pairs",
    "toy_translation_corpus",
    "toy_translation_dataset",
]
