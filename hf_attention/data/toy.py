"""The embedded toy corpus: English->German sentences with structure to learn, for the demo and the tests."""

import random

from datasets import Dataset

_EN_UNITS = "zero one two three four five six seven eight nine".split()
_EN_TEENS = "ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split()
_EN_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_DE_UNITS = "null eins zwei drei vier fünf sechs sieben acht neun".split()
_DE_TEENS = "zehn elf zwölf dreizehn vierzehn fünfzehn sechzehn siebzehn achtzehn neunzehn".split()
_DE_TENS = "_ _ zwanzig dreißig vierzig fünfzig sechzig siebzig achtzig neunzig".split()
_SUBJECTS = [("i", "ich", ""), ("we", "wir", "en"), ("they", "sie", "en")]
_VERBS = [("see", "seh"), ("buy", "kauf"), ("count", "zähl"), ("sell", "verkauf"), ("paint", "mal")]
_NOUNS = [("cats", "katzen"), ("dogs", "hunde"), ("houses", "häuser"), ("books", "bücher"), ("trees", "bäume")]


def number_words(number: int) -> tuple[list[str], list[str], list[tuple[int, int]]]:
    """1..9999 in English and German words, and which words translate which: (English, German, (i, j) pairs).

    4321 -> "four thousand three hundred twenty one", "vier tausend drei hundert ein und zwanzig": "twenty" is
    "zwanzig", "one" is "ein", and German's "und" translates no English word.
    """
    english, german, links = [], [], []

    def pair(english_word: str, german_word: str) -> None:
        links.append((len(english), len(german)))
        english.append(english_word)
        german.append(german_word)

    thousands, rest = divmod(number, 1000)
    hundreds, below_hundred = divmod(rest, 100)
    for count, english_unit, german_unit in ((thousands, "thousand", "tausend"), (hundreds, "hundred", "hundert")):
        if count:
            pair(_EN_UNITS[count], "ein" if count == 1 else _DE_UNITS[count])
            pair(english_unit, german_unit)
    tens, units = divmod(below_hundred, 10)
    if tens == 1:
        pair(_EN_TEENS[units], _DE_TEENS[units])
    elif tens and units:  # German says the units first: "ein und zwanzig"
        english += [_EN_TENS[tens], _EN_UNITS[units]]
        links += [(len(english) - 2, len(german) + 2), (len(english) - 1, len(german))]
        german += ["ein" if units == 1 else _DE_UNITS[units], "und", _DE_TENS[tens]]
    elif tens:
        pair(_EN_TENS[tens], _DE_TENS[tens])
    elif units:
        pair(_EN_UNITS[units], _DE_UNITS[units])
    return english, german, links


def number_in_english(number: int) -> str:
    """1..9999 in English words: 4321 -> "four thousand three hundred twenty one"."""
    words = []
    thousands, rest = divmod(number, 1000)
    hundreds, below_hundred = divmod(rest, 100)
    if thousands:
        words += [_EN_UNITS[thousands], "thousand"]
    if hundreds:
        words += [_EN_UNITS[hundreds], "hundred"]
    tens, units = divmod(below_hundred, 10)
    if tens == 1:
        words.append(_EN_TEENS[units])
    else:
        words += ([_EN_TENS[tens]] if tens else []) + ([_EN_UNITS[units]] if units else [])
    return " ".join(words)


def number_in_german(number: int) -> str:
    """1..9999 in German words, units before tens as German says them: 4321 -> "vier tausend drei hundert ein und
    zwanzig"."""
    words = []
    thousands, rest = divmod(number, 1000)
    hundreds, below_hundred = divmod(rest, 100)
    if thousands:
        words += ["ein" if thousands == 1 else _DE_UNITS[thousands], "tausend"]
    if hundreds:
        words += ["ein" if hundreds == 1 else _DE_UNITS[hundreds], "hundert"]
    tens, units = divmod(below_hundred, 10)
    if tens == 1:
        words.append(_DE_TEENS[units])
    elif tens and units:
        words += ["ein" if units == 1 else _DE_UNITS[units], "und", _DE_TENS[tens]]
    else:
        words += ([_DE_TENS[tens]] if tens else []) + ([_DE_UNITS[units]] if units else [])
    return " ".join(words)


def toy_translation_corpus(size: int, seed: int = 0) -> list[dict[str, dict[str, str]]]:
    """A deterministic English->German corpus with structure to learn: verb agreement and German number order.

    "we buy four hundred twenty one dogs" -> "wir kaufen vier hundert ein und zwanzig hunde"
    """
    return [{"translation": {"en": english, "de": german}} for english, german, _ in toy_aligned_corpus(size, seed)]


def toy_aligned_corpus(size: int, seed: int = 0) -> list[tuple[str, str, list[tuple[int, int]]]]:
    """`toy_translation_corpus`'s pairs with their word alignments, (English word, German word) pairs counted from 0:
    a hand-aligned set by construction, for guided-alignment training and the alignment error rate."""
    rng = random.Random(seed)
    rows = []
    for _ in range(size):
        subject_en, subject_de, ending = rng.choice(_SUBJECTS)
        verb_en, verb_de = rng.choice(_VERBS)
        noun_en, noun_de = rng.choice(_NOUNS)
        number = rng.choice([rng.randint(2, 99), rng.randint(100, 999), rng.randint(1000, 9999)])
        english_number, german_number, number_links = number_words(number)
        english = [subject_en, verb_en, *english_number, noun_en]
        german = [subject_de, verb_de + (ending or "e"), *german_number, noun_de]
        links = [(0, 0), (1, 1), *((i + 2, j + 2) for i, j in number_links), (len(english) - 1, len(german) - 1)]
        rows.append((" ".join(english), " ".join(german), links))
    return rows


def toy_translation_dataset(size: int, seed: int = 0) -> Dataset:
    return Dataset.from_list(toy_translation_corpus(size, seed))
