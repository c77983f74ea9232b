"""--streaming: training on a corpus read lazily, shuffled in a buffer, split across processes, resumable; and the
options that need the corpus size refused."""

import json
from contextlib import nullcontext

import pytest

from hf_attention.data import toy_translation_corpus
from hf_attention.training import job as run_translation
from hf_attention.training.arguments import PaperTrainingArguments, parse_arguments
from hf_attention.training.job import main, run


@pytest.fixture(scope="module")
def corpus_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stream")
    rows = toy_translation_corpus(330, seed=2)
    for name, part in (("train", rows[:300]), ("val", rows[300:315]), ("test", rows[315:])):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in part))
    return folder


def streaming_arguments(folder, *extra: str) -> list[str]:
    return ["--streaming", "--train_file", str(folder / "train.jsonl"), "--validation_file", str(folder / "val.jsonl"),
            "--test_file", str(folder / "test.jsonl"), "--vocab_size", "150", "--shuffle_buffer_size", "64",
            "--per_device_train_batch_size", "16", "--generation_max_length", "8", "--generation_num_beams", "1",
            "--warmup_steps", "2", "--test_before_training", "false", "--seed", "3", *extra]  # fmt: skip


def test_a_streamed_corpus_trains_and_is_scored(tmp_path, corpus_files):
    summary = run(*parse_arguments(streaming_arguments(corpus_files, "--max_steps", "4", "--save_strategy", "no",
                                                       "--output_dir", str(tmp_path / "run"))))  # fmt: skip
    assert summary.steps == 4 and summary.train_pairs is None and summary.test_sentences == 15
    assert "a stream of pairs" in run_translation.describe(summary)


def test_each_process_reads_its_own_part_of_the_stream(tmp_path, corpus_files, monkeypatch):
    """split_dataset_by_node: two processes' parts are disjoint and together the whole (shuffled) stream."""
    monkeypatch.setattr(PaperTrainingArguments, "main_process_first", lambda self, **kwargs: nullcontext())
    parts = {}
    for rank, world_size in ((0, 1), (0, 2), (1, 2)):
        monkeypatch.setattr(PaperTrainingArguments, "process_index", property(lambda self, rank=rank: rank))
        monkeypatch.setattr(PaperTrainingArguments, "world_size", property(lambda self, size=world_size: size))
        arguments = parse_arguments(streaming_arguments(corpus_files, "--max_steps", "4", "--output_dir", "x"))
        data = run_translation.prepare_data(*arguments, run_translation.requested_phases(arguments[2]))
        parts[rank, world_size] = [tuple(row["input_ids"]) for row in data.train_dataset]
    whole, first, second = parts[0, 1], parts[0, 2], parts[1, 2]
    assert len(whole) == 300 and len(first) == len(second) == 150
    assert sorted(first + second) == sorted(whole) and first != second


def test_a_resumed_stream_sees_the_batches_of_an_uninterrupted_run(tmp_path, corpus_files, recorded_batches):
    batches = recorded_batches
    arguments = streaming_arguments(corpus_files, "--max_steps", "6", "--save_steps", "4", "--eval_strategy", "no")
    run(*parse_arguments([*arguments, "--output_dir", str(tmp_path / "whole")]))
    uninterrupted = batches[:6]
    batches.clear()
    run(*parse_arguments([*arguments, "--output_dir", str(tmp_path / "resumed"),
                          "--resume_from_checkpoint", str(tmp_path / "whole" / "checkpoint-4")]))  # fmt: skip
    # the resumed run reads the stream up to where the checkpoint was, then trains on what the whole run trained on
    start = batches.index(uninterrupted[4])
    assert batches[start : start + 2] == uninterrupted[4:6] and start >= 4


def test_token_batches_from_a_stream_hold_at_most_max_tokens_and_resume(tmp_path, corpus_files, recorded_batches):
    """--streaming --max_tokens: batches cut from length-sorted pools of the stream; a resumed run sees the batches
    an uninterrupted run would."""
    batches = recorded_batches
    arguments = streaming_arguments(corpus_files, "--max_steps", "6", "--save_steps", "4", "--eval_strategy", "no",
                                    "--max_tokens", "160", "--max_source_length", "32",
                                    "--logging_steps", "2")  # fmt: skip
    run(*parse_arguments([*arguments, "--output_dir", str(tmp_path / "whole")]))
    uninterrupted = batches[:6]
    assert all(len(batch) * len(batch[0]) <= 160 for batch in uninterrupted)
    assert len({len(batch) for batch in uninterrupted}) > 1  # the number of pairs follows their length
    log = json.loads((tmp_path / "whole" / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
    assert any("padding_fraction" in entry for entry in log)
    batches.clear()
    run(*parse_arguments([*arguments, "--output_dir", str(tmp_path / "resumed"),
                          "--resume_from_checkpoint", str(tmp_path / "whole" / "checkpoint-4")]))  # fmt: skip
    start = batches.index(uninterrupted[4])
    assert batches[start : start + 2] == uninterrupted[4:6] and start >= 4


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "--streaming: the number of pairs is unknown, so give --max_steps"),
        (["--max_steps", "2", "--max_tokens", "100"], "--max_tokens 100 with --streaming: a streamed pair may have"),
        (["--max_steps", "2", "--train_sampling_strategy", "group_by_length"], "group_by_length with --streaming"),
    ],
)
def test_options_that_need_the_corpus_size_are_refused(tmp_path, corpus_files, extra, message):
    with pytest.raises(SystemExit, match=message):
        main([*streaming_arguments(corpus_files, *extra), "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_loader_workers_are_refused_for_a_stream_over_several_processes(tmp_path, corpus_files, monkeypatch):
    """The processes agree before each batch whether all have one (a collective): in the training process only."""
    from hf_attention.training.arguments import PaperTrainingArguments

    monkeypatch.setattr(PaperTrainingArguments, "world_size", property(lambda self: 2))
    arguments = streaming_arguments(corpus_files, "--max_steps", "2", "--dataloader_num_workers", "2")
    with pytest.raises(SystemExit, match="--dataloader_num_workers 2 with --streaming on several processes: .* use 0"):
        main([*arguments, "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_a_stream_without_a_validation_split_is_refused(tmp_path, corpus_files):
    arguments = [flag for flag in streaming_arguments(corpus_files) if "val.jsonl" not in flag]
    arguments.remove("--validation_file")
    with pytest.raises(SystemExit, match="--validation_split_percentage 5: holding out a percentage needs the corpus"):
        main([*arguments, "--max_steps", "2", "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
