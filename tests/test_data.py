"""The embedded toy corpus and dataset tokenisation."""

import pytest

from hf_attention.data import number_in_english, number_in_german, tokenize_pairs, toy_translation_dataset
from hf_attention.tokenization import train_tokenizer


@pytest.mark.parametrize(
    "number, english, german",
    [
        (7, "seven", "sieben"),
        (13, "thirteen", "dreizehn"),
        (40, "forty", "vierzig"),
        (21, "twenty one", "ein und zwanzig"),
        (305, "three hundred five", "drei hundert fünf"),
        (1121, "one thousand one hundred twenty one", "ein tausend ein hundert ein und zwanzig"),
        (9999, "nine thousand nine hundred ninety nine", "neun tausend neun hundert neun und neunzig"),
    ],
)
def test_numbers_are_written_out_in_both_languages(number, english, german):
    assert number_in_english(number) == english
    assert number_in_german(number) == german


def test_toy_corpus_is_deterministic_and_varied():
    first, again = toy_translation_dataset(300, seed=3), toy_translation_dataset(300, seed=3)
    assert first["translation"] == again["translation"]
    assert first["translation"] != toy_translation_dataset(300, seed=4)["translation"]
    assert len({pair["en"] for pair in first["translation"]}) > 290
    for pair in first["translation"]:
        assert pair["de"].split()[0] in {"ich", "wir", "sie"} and pair["en"].split()[0] in {"i", "we", "they"}


def test_pairs_are_tokenized_with_eos_terminated_labels():
    dataset = toy_translation_dataset(50)
    tokenizer = train_tokenizer([p[lang] for p in dataset["translation"] for lang in ("en", "de")], vocab_size=120)
    tokenized = tokenize_pairs(dataset, tokenizer, "en", "de", max_length=6)
    assert set(tokenized.column_names) == {"input_ids", "attention_mask", "labels"}
    assert all(len(ids) <= 6 and ids[-1] == tokenizer.eos_token_id for ids in tokenized["input_ids"])
    assert all(labels[-1] == tokenizer.eos_token_id for labels in tokenized["labels"])
