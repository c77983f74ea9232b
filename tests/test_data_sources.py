"""Data sources of the training job: `datasets` datasets (local, saved, on the loopback Hub), data files of every
format, flat tables, held-out splits, and the one-line errors for what does not exist."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict

from hf_attention.data.sources import CorpusRequest, DataSourceError, load_corpus
from hf_attention.training.job import main

from .helpers import hub_environment
from .hub_server import LocalHub

ROOT = Path(__file__).resolve().parents[1]
PAIRS = [(f"the house number {i}", f"das haus nummer {i}") for i in range(40)]


def translation_rows(pairs=PAIRS) -> list[dict]:
    return [{"translation": {"en": en, "de": de}} for en, de in pairs]


def request(**fields) -> CorpusRequest:
    return CorpusRequest(source_lang="en", target_lang="de", **fields)


def pairs_of(dataset) -> list[tuple[str, str]]:
    return [(row["en"], row["de"]) for row in dataset["translation"]]


@pytest.fixture
def cache(tmp_path):
    return str(tmp_path / "cache")


def write_in_every_format(folder: Path) -> dict[str, Path]:
    """The same pairs as .tsv, .jsonl, .json, .csv (flat) and .parquet (translation rows)."""
    folder.mkdir(exist_ok=True)
    files = {kind: folder / f"train.{kind}" for kind in ("tsv", "jsonl", "json", "csv", "parquet")}
    files["tsv"].write_text("".join(f"{en}\t{de}\n" for en, de in PAIRS))
    files["jsonl"].write_text("".join(json.dumps(row) + "\n" for row in translation_rows()))
    files["json"].write_text(json.dumps(translation_rows()))
    files["csv"].write_text("english,german\n" + "".join(f"{en},{de}\n" for en, de in PAIRS))
    Dataset.from_list(translation_rows()).to_parquet(str(files["parquet"]))
    return files


def test_every_file_format_gives_the_same_pairs(tmp_path, cache):
    files = write_in_every_format(tmp_path)
    for kind, path in files.items():
        columns = {"source_column": "english", "target_column": "german"} if kind == "csv" else {}
        corpus = load_corpus(request(train_file=str(path), cache_dir=cache, **columns), needed=("train",))
        assert pairs_of(corpus["train"]) == PAIRS, kind
        assert corpus["train"].column_names == ["translation"]


def test_a_missing_validation_split_is_held_out_of_the_training_pairs(tmp_path, cache):
    path = write_in_every_format(tmp_path)["jsonl"]
    corpus = load_corpus(request(train_file=str(path), validation_split_percentage=10, seed=3, cache_dir=cache),
                         needed=("train", "validation"))  # fmt: skip
    train, validation = pairs_of(corpus["train"]), pairs_of(corpus["validation"])
    assert len(validation) == 4 and len(train) == 36 and sorted(train + validation) == sorted(PAIRS)
    again = load_corpus(request(train_file=str(path), validation_split_percentage=10, seed=3, cache_dir=cache),
                        needed=("train", "validation"))  # fmt: skip
    assert pairs_of(again["validation"]) == validation  # the same split for the same seed
    limited = load_corpus(request(train_file=str(path), max_train_samples=7, cache_dir=cache), needed=("train",))
    assert pairs_of(limited["train"]) == PAIRS[:7]


def test_a_saved_dataset_and_a_local_dataset_folder_load_by_name(tmp_path, cache):
    splits = DatasetDict({"train": Dataset.from_list(translation_rows()),
                          "test": Dataset.from_list(translation_rows(PAIRS[:3]))})  # fmt: skip
    splits.save_to_disk(str(tmp_path / "saved"))
    corpus = load_corpus(request(dataset_name=str(tmp_path / "saved"), cache_dir=cache), needed=("train", "test"))
    assert pairs_of(corpus["train"]) == PAIRS and pairs_of(corpus["test"]) == PAIRS[:3]

    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in translation_rows()))
    (folder / "validation.jsonl").write_text("".join(json.dumps(row) + "\n" for row in translation_rows(PAIRS[:2])))
    corpus = load_corpus(request(dataset_name=str(folder), cache_dir=cache), needed=("train", "validation"))
    assert pairs_of(corpus["validation"]) == PAIRS[:2]


@pytest.mark.parametrize(
    "fields, needed, message",
    [
        ({}, ("train",), "no data: give --dataset_name NAME, or --train_file"),
        ({"dataset_name": "{tmp}/nowhere"}, ("train",), "--dataset_name .*nowhere: no such dataset"),
        ({"dataset_name": "{tmp}/saved"}, ("train", "validation", "test"), "no 'test' split \\(it has: train\\)"),
        ({"dataset_name": "{tmp}/saved", "source_lang": "fr"}, ("train",), "--source_lang fr: .* languages de, en"),
        (
            {"train_file": "{tmp}/flat.csv", "source_column": "englsh", "target_column": "german"},
            ("train",),
            "--source_column 'englsh': .* has the columns english, german; did you mean 'english'\\?",
        ),
        ({"train_file": "{tmp}/flat.csv"}, ("train",), "not a 'translation' column; name the text columns"),
        ({"train_file": "{tmp}/data.xlsx"}, ("train",), "--train_file .*data.xlsx: unknown format .xlsx"),
        ({"train_file": "{tmp}/missing.parquet"}, ("train",), "--train_file .*missing.parquet: no such file"),
        ({"train_file": "{tmp}/broken.parquet"}, ("train",), "--train_file .*broken.parquet: not a readable parquet"),
        ({"toy_corpus": True, "train_file": "{tmp}/flat.csv"}, ("train",), "--toy_corpus: the embedded corpus"),
        (
            {
                "train_file": "{tmp}/flat.csv",
                "source_column": "english",
                "target_column": "german",
                "validation_split_percentage": 0,
            },
            ("train", "validation"),
            "--validation_split_percentage 0: the data has",
        ),
    ],  # fmt: skip
)
def test_what_does_not_exist_is_named_with_its_flag(tmp_path, cache, fields, needed, message):
    DatasetDict({"train": Dataset.from_list(translation_rows())}).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "flat.csv").write_text("english,german\na,b\n")
    (tmp_path / "data.xlsx").write_bytes(b"PK\x03\x04")
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    fields = {name: value.format(tmp=tmp_path) if isinstance(value, str) else value for name, value in fields.items()}
    with pytest.raises(DataSourceError, match=message):
        load_corpus(CorpusRequest(**{"source_lang": "en", "target_lang": "de", "cache_dir": cache, **fields}), needed)


def test_the_toy_corpus_is_used_only_when_asked_for(tmp_path):
    with pytest.raises(SystemExit, match="no data: give --dataset_name"):
        main(["--output_dir", str(tmp_path / "out"), "--max_steps", "1"])
    assert not (tmp_path / "out").exists()


TINY_WMT_CARD = b"""---
configs:
- config_name: de-en
  data_files:
  - split: train
    path: de-en/train.jsonl
  - split: validation
    path: de-en/validation.jsonl
  - split: test
    path: de-en/test.jsonl
---
# tiny-wmt: a few hundred toy pairs in wmt14's schema
"""


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()


@pytest.mark.slow  # 17 s; the hub client's round trips are tested in test_hub_roundtrip
def test_training_on_a_hub_dataset_through_the_hub_client(tmp_path):
    """`--dataset_name alice/tiny-wmt --dataset_config_name de-en`, served by the loopback Hub as the Hub serves
    datasets (a card with configs, jsonl data files), fetched by `datasets` through huggingface_hub's client."""
    from hf_attention.data import toy_translation_corpus

    rows = toy_translation_corpus(300, seed=0)
    files = {"README.md": TINY_WMT_CARD, "de-en/train.jsonl": jsonl(rows[:260]),
             "de-en/validation.jsonl": jsonl(rows[260:280]), "de-en/test.jsonl": jsonl(rows[280:])}  # fmt: skip
    arguments = ["--dataset_name", "alice/tiny-wmt", "--source_lang", "en", "--target_lang", "de",
                 "--vocab_size", "150", "--max_steps", "3", "--save_strategy", "no", "--generation_num_beams", "1",
                 "--generation_max_length", "8", "--test_before_training", "false"]  # fmt: skip
    with LocalHub() as hub:
        hub.add_repo("alice/tiny-wmt", files, repo_type="dataset")
        environment = hub_environment(hub, tmp_path / "alice")

        def train(*extra: str) -> subprocess.CompletedProcess:
            return subprocess.run(
                [sys.executable, "scripts/train.py", *arguments, *extra], capture_output=True, text=True,
                env=environment, cwd=ROOT, timeout=300, stdin=subprocess.DEVNULL,
            )  # fmt: skip

        wrong_config = train("--dataset_config_name", "en-fr", "--output_dir", str(tmp_path / "never"))
        assert wrong_config.returncode != 0
        assert "--dataset_config_name en-fr:" in wrong_config.stderr and "de-en" in wrong_config.stderr
        assert not (tmp_path / "never").exists()

        result = train("--dataset_config_name", "de-en", "--output_dir", str(tmp_path / "run"))
        assert result.returncode == 0, result.stderr[-3000:]
        called = hub.called(since_start=True)
    assert ("GET", "/api/datasets/{repo}/revision/{revision}") in called
    assert ("GET", "/datasets/{repo}/resolve/{revision}/{file}") in called
    summary = json.loads((tmp_path / "run" / "results.json").read_text())
    assert summary["train_pairs"] == 260 and summary["test_sentences"] == 20 and summary["scored_split"] == "test"
    assert summary["model_card"]["dataset_name"] == "alice/tiny-wmt"
