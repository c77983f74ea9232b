"""The training job speaks transformers' run_translation.py: its flags with their meaning, --do_train / --do_eval /
--do_predict and their output files, a single arguments file, --help with every default, the closest flag named for
a typo, and preprocessing that is done once and cached."""

import json
from pathlib import Path

import pytest
import yaml
from datasets import Dataset, DatasetDict, arrow_dataset

from hf_attention import HfAttentionConfig, HfAttentionForConditionalGeneration
from hf_attention.data import toy_translation_corpus
from hf_attention.data.tokenization import train_tokenizer
from hf_attention.training import job as run_translation
from hf_attention.training import prepare
from hf_attention.training.arguments import parse_arguments
from hf_attention.training.job import main

from .helpers import toy_tokenizer

# run_translation's flags, as in transformers' examples/pytorch/translation/README.md, with their values.
RUN_TRANSLATION_FLAGS = {
    "--dataset_config_name": "de-en", "--max_source_length": "32", "--max_target_length": "24",
    "--val_max_target_length": "16", "--source_prefix": "translate English to German: ", "--max_train_samples": "50",
    "--max_eval_samples": "6", "--max_predict_samples": "5", "--preprocessing_num_workers": "2",
    "--config_name": "some/config", "--cache_dir": "/tmp/cache", "--model_revision": "v1", "--dtype": "bfloat16",
    "--attn_implementation": "sdpa", "--num_beams": "3", "--forced_bos_token": "<s>", "--token": "hf_x",
    "--dataset_name": "wmt16", "--source_lang": "en", "--target_lang": "de", "--tokenizer_name": "tok",
}  # fmt: skip
SWITCHES = ["--overwrite_cache", "--trust_remote_code", "--do_train", "--do_eval", "--do_predict",
            "--pad_to_max_length", "--predict_with_generate", "--overwrite_output_dir"]  # fmt: skip


def test_every_run_translation_flag_is_accepted_with_its_meaning(tmp_path):
    argv = [item for pair in RUN_TRANSLATION_FLAGS.items() for item in pair] + SWITCHES
    model_args, data_args, training_args = parse_arguments([*argv, "--output_dir", str(tmp_path)])
    for flag, value in RUN_TRANSLATION_FLAGS.items():
        name = flag.removeprefix("--")
        parsed = next(getattr(group, name) for group in (model_args, data_args, training_args) if hasattr(group, name))
        assert str(parsed) == value, flag
    assert model_args.trust_remote_code and data_args.overwrite_cache and data_args.pad_to_max_length
    assert training_args.do_train and training_args.do_eval and training_args.do_predict


def test_help_shows_a_default_for_every_flag(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    blocks = text.split("\n  --")[1:]  # one per option, with its help text
    assert len(blocks) > 150
    missing = [block.split()[0] for block in blocks if "(default:" not in " ".join(block.split())]
    assert not missing, missing
    assert "--adam_beta2 ADAM_BETA2" in text and "(default: 0.98)" in text


def test_an_arguments_file_equals_the_command_line(tmp_path):
    argv = ["--output_dir", str(tmp_path / "out"), "--max_steps", "7", "--learning_rate", "0.002", "--toy_corpus",
            "--source_prefix", "x: "]  # fmt: skip
    values = {"output_dir": str(tmp_path / "out"), "max_steps": 7, "learning_rate": 0.002, "toy_corpus": True,
              "source_prefix": "x: "}  # fmt: skip
    (tmp_path / "args.json").write_text(json.dumps(values))
    (tmp_path / "args.yaml").write_text(yaml.safe_dump(values))

    def fields(groups) -> list[dict]:  # every value, without the process state transformers attaches
        return [{key: value for key, value in vars(group).items() if key != "distributed_state"} for group in groups]

    expected = fields(parse_arguments(argv))
    for name in ("args.json", "args.yaml"):
        assert fields(parse_arguments([str(tmp_path / name)])) == expected, name


def test_an_unknown_flag_names_the_closest_valid_one(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--lerning_rate", "3", "--output_dir", str(tmp_path)])
    assert "unrecognized argument --lerning_rate; did you mean --learning_rate?" in capsys.readouterr().err
    (tmp_path / "args.json").write_text(json.dumps({"max_source_lenght": 20}))
    with pytest.raises(SystemExit):
        main([str(tmp_path / "args.json")])
    assert "unknown key 'max_source_lenght'; did you mean max_source_length?" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def trained_model(tmp_path_factory) -> Path:
    """A tiny saved model with its tokenizer, standing in for `--model_name_or_path t5-small`."""
    folder = tmp_path_factory.mktemp("model")
    tokenizer = toy_tokenizer()
    config = HfAttentionConfig.from_preset("tiny", vocab_size=len(tokenizer), max_position_embeddings=64)
    HfAttentionForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def wmt_like_dataset(tmp_path_factory) -> Path:
    rows = toy_translation_corpus(120, seed=5)
    splits = DatasetDict({"train": Dataset.from_list(rows[:100]), "validation": Dataset.from_list(rows[100:110]),
                          "test": Dataset.from_list(rows[110:])})  # fmt: skip
    folder = tmp_path_factory.mktemp("wmt") / "saved"
    splits.save_to_disk(str(folder))
    return folder


def test_a_run_translation_command_line_runs_unchanged(tmp_path, trained_model, wmt_like_dataset):
    """transformers' README command, with our model in place of t5-small, and run_translation's outputs."""
    output_dir = tmp_path / "tst-translation"
    main(["--model_name_or_path", str(trained_model), "--do_train", "--do_eval", "--do_predict",
          "--source_lang", "en", "--target_lang", "de", "--source_prefix", "", "--dataset_name", str(wmt_like_dataset),
          "--output_dir", str(output_dir), "--per_device_train_batch_size=4", "--per_device_eval_batch_size=4",
          "--overwrite_output_dir", "--predict_with_generate", "--max_steps", "2", "--max_train_samples", "40",
          "--max_predict_samples", "7", "--num_beams", "2", "--val_max_target_length", "12",
          "--preprocessing_num_workers", "1", "--cache_dir", str(tmp_path / "cache"),
          "--save_strategy", "no"])  # fmt: skip
    predictions = (output_dir / "generated_predictions.txt").read_text().splitlines()
    predict_results = json.loads((output_dir / "predict_results.json").read_text())
    eval_results = json.loads((output_dir / "eval_results.json").read_text())
    assert len(predictions) == 7 and predict_results["predict_samples"] == 7 and "predict_bleu" in predict_results
    assert eval_results["eval_samples"] == 10 and "eval_bleu" in eval_results and "eval_loss" in eval_results
    results = json.loads((output_dir / "results.json").read_text())
    assert results["train_pairs"] == 40 and results["steps"] == 2


def test_predicting_alone_writes_its_files_and_replaces_them_only_when_asked(tmp_path, trained_model,
                                                                            wmt_like_dataset):  # fmt: skip
    output_dir = tmp_path / "predictions"
    output_dir.mkdir()
    (output_dir / "notes.txt").write_text("mine")
    arguments = ["--model_name_or_path", str(trained_model), "--do_predict", "--dataset_name", str(wmt_like_dataset),
                 "--output_dir", str(output_dir), "--max_predict_samples", "3", "--num_beams", "1",
                 "--generation_max_length", "6"]  # fmt: skip
    main(arguments)
    first = (output_dir / "generated_predictions.txt").read_text()
    assert len(first.splitlines()) == 3 and not (output_dir / "eval_results.json").exists()
    (output_dir / "generated_predictions.txt").write_text("an earlier run's predictions")
    with pytest.raises(SystemExit, match="already holds generated_predictions.txt, predict_results.json; pass --ove"):
        main(arguments)
    assert (output_dir / "generated_predictions.txt").read_text() == "an earlier run's predictions"
    main([*arguments, "--overwrite_output_dir"])
    assert (output_dir / "generated_predictions.txt").read_text() == first
    assert (output_dir / "notes.txt").read_text() == "mine"
    assert sorted(path.name for path in output_dir.iterdir()) == [
        "generated_predictions.txt", "notes.txt", "predict_results.json"]  # fmt: skip


def test_evaluating_without_a_model_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="--do_eval / --do_predict without --do_train .* give --model_name_or_path"):
        main(["--do_predict", "--toy_corpus", "--output_dir", str(tmp_path / "out")])


def test_num_beams_val_max_target_length_and_forced_bos_token_reach_the_generation_config(trained_model):
    model_args, data_args, training_args = parse_arguments(
        ["--num_beams", "3", "--val_max_target_length", "21", "--forced_bos_token", "</s>", "--output_dir", "x"]
    )
    training_args.generation_max_length = None
    model = HfAttentionForConditionalGeneration.from_pretrained(trained_model)
    tokenizer = toy_tokenizer()
    applied = run_translation.set_decoding_defaults(model, data_args, training_args, tokenizer)
    assert model.generation_config.num_beams == 3 and model.generation_config.max_length == 21
    assert (applied.generation_num_beams, applied.generation_max_length) == (3, 21)
    assert training_args.generation_max_length is None  # a copy: the user's arguments stay as given
    assert model.generation_config.forced_bos_token_id == tokenizer.eos_token_id
    data_args.forced_bos_token = "<no_such_token>"
    with pytest.raises(run_translation.TrainingArgumentError, match="--forced_bos_token <no_such_token>: not in"):
        run_translation.set_decoding_defaults(model, data_args, training_args, tokenizer)


def test_preprocessing_is_done_once_and_cached(tmp_path, monkeypatch):
    """A second job on the same data and settings trains no tokenizer and tokenizes nothing: both come from the
    cache (the Arrow files of `datasets`, the tokenizer kept beside them)."""
    data = tmp_path / "data"
    data.mkdir()
    rows = toy_translation_corpus(200, seed=1)
    for split, part in (("train", rows[:180]), ("val", rows[180:])):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in part))
    argv = ["--train_file", str(data / "train.jsonl"), "--validation_file", str(data / "val.jsonl"),
            "--vocab_size", "150", "--cache_dir", str(tmp_path / "cache"),
            "--output_dir", str(tmp_path / "out")]  # fmt: skip
    model_args, data_args, training_args = parse_arguments(argv)
    phases = run_translation.requested_phases(training_args)
    first = run_translation.prepare_data(model_args, data_args, training_args, phases)

    calls = []

    class RecordingWriter(arrow_dataset.ArrowWriter):  # `map` writes its results through one: a cache miss
        def __init__(self, *args, **kwargs):
            calls.append("map")
            super().__init__(*args, **kwargs)

    def recording_train_tokenizer(*args, **kwargs):
        calls.append("tokenizer")
        return train_tokenizer(*args, **kwargs)

    monkeypatch.setattr(arrow_dataset, "ArrowWriter", RecordingWriter)
    monkeypatch.setattr(prepare, "train_tokenizer", recording_train_tokenizer)
    again = run_translation.prepare_data(model_args, data_args, training_args, phases)
    assert calls == []
    assert again.train_dataset["input_ids"] == first.train_dataset["input_ids"]
    assert again.tokenizer.get_vocab() == first.tokenizer.get_vocab()
    data_args.overwrite_cache = True
    redone = run_translation.prepare_data(model_args, data_args, training_args, phases)
    assert calls[0] == "tokenizer" and "map" in calls  # the check above would see work done
    assert redone.train_dataset["input_ids"] == first.train_dataset["input_ids"]
