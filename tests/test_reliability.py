"""What a kill, a bad input or a bad checkpoint can and cannot do: never lose a user's files, never load a wrong model
silently, never turn the loss NaN. Each test is a case that once lost data or gave a silently wrong result."""

import gzip
import json
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSeq2SeqLM
from transformers.modeling_outputs import BaseModelOutput
from transformers.trainer_pt_utils import LabelSmoother

from hf_attention import HfAttentionConfig, HfAttentionForConditionalGeneration, HfAttentionModel
from hf_attention.data import ParallelDataError, read_parallel_corpus
from hf_attention.inference.evaluate import main as evaluate_main
from hf_attention.training.arguments import PaperTrainingArguments
from hf_attention.training.job import main
from hf_attention.training.trainer import CheckpointSafeSeq2SeqTrainer, TokenLabelSmoother

ROOT = Path(__file__).parent.parent
# A run of a few seconds: the toy corpus, a tiny vocabulary, short generations.
T = ["--toy_corpus", "--vocab_size", "120", "--per_device_train_batch_size", "8", "--generation_max_length", "8",
     "--generation_num_beams", "1", "--warmup_steps", "2", "--toy_eval_size", "5", "--toy_train_size", "200",
     "--seed", "7"]  # fmt: skip
T_FILES = [flag for flag in T if flag != "--toy_corpus"]  # for runs that name their own data


def tiny_model(**overrides) -> HfAttentionForConditionalGeneration:
    torch.manual_seed(0)
    return HfAttentionForConditionalGeneration(
        HfAttentionConfig.from_preset("tiny", vocab_size=100, dropout=0.0, **overrides)
    ).eval()


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def subprocess_environment() -> dict[str, str]:
    # The same thread count in every run, so floating-point sums run in the same order.
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def assert_same_parameters(expected_file: Path, actual_file: Path) -> None:
    expected, actual = load_file(expected_file), load_file(actual_file)
    assert expected.keys() == actual.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, atol=1e-6, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


# 1. A batch without any target token.


def test_a_batch_without_target_tokens_gives_zero_loss_and_zero_gradients():
    model = tiny_model().train()
    source = torch.tensor([[5, 6, 7, 2], [8, 9, 2, 0]])
    loss = model(input_ids=source, labels=torch.full((2, 2), -100)).loss
    loss.backward()
    assert loss.item() == 0.0
    assert all(not p.grad.any() for p in model.parameters() if p.grad is not None)


def test_label_smoothing_through_trainer_equals_transformers_and_cannot_turn_nan(tmp_path):
    model = tiny_model()
    arguments = PaperTrainingArguments(output_dir=str(tmp_path), learning_rate=1e-3)
    trainer = CheckpointSafeSeq2SeqTrainer(model=model, args=arguments)
    assert isinstance(trainer.label_smoother, TokenLabelSmoother) and trainer.label_smoother.epsilon == 0.1
    source = torch.tensor([[5, 6, 7, 2], [8, 9, 2, 0]])
    labels = torch.tensor([[5, 6, 2], [7, 2, -100]])
    outputs = model(input_ids=source, labels=labels)
    for count in (None, torch.tensor(9)):  # a micro-batch alone, or one of an accumulated update
        expected = LabelSmoother(epsilon=0.1)(outputs, labels, num_items_in_batch=count)
        torch.testing.assert_close(trainer.label_smoother(outputs, labels, num_items_in_batch=count), expected)
    no_labels = torch.full((2, 3), -100)
    decoder_input_ids = model.prepare_decoder_input_ids_from_labels(no_labels)  # Trainer pops the labels
    for count in (torch.tensor(0), None):
        no_targets = {"input_ids": source, "labels": no_labels, "decoder_input_ids": decoder_input_ids}
        assert trainer.compute_loss(model, no_targets, num_items_in_batch=count).item() == 0.0


# 2-4. Checkpoints whose weights do not match their config.


@pytest.fixture
def saved_model(tmp_path) -> Path:
    folder = tmp_path / "model"
    tiny_model().save_pretrained(folder)
    return folder


def test_a_renamed_tensor_is_refused_with_the_checkpoint_and_key_named(saved_model):
    weights = load_file(saved_model / "model.safetensors")
    weights["model.encoder.layers.0.fc9.weight"] = weights.pop("model.encoder.layers.0.fc1.weight")
    save_file(weights, saved_model / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model \(revision main\) do not match .*1 missing, e\.g\. "
                                         r"model\.encoder\.layers\.0\.fc1\.weight; 1 unexpected, e\.g\. "
                                         r"model\.encoder\.layers\.0\.fc9\.weight"):  # fmt: skip
        AutoModelForSeq2SeqLM.from_pretrained(saved_model)
    partial, info = AutoModelForSeq2SeqLM.from_pretrained(saved_model, strict=False, output_loading_info=True)
    assert info["missing_keys"] == {"model.encoder.layers.0.fc1.weight"}
    # Where the caller asks for the report, it gets it instead of an error (transformers' contract): not silent.
    reported, info = AutoModelForSeq2SeqLM.from_pretrained(saved_model, output_loading_info=True)
    assert info["missing_keys"] == {"model.encoder.layers.0.fc1.weight"}
    # No checkpoint, an explicit state dict: the caller chose the weights, and the rest is initialised.
    config = HfAttentionConfig.from_pretrained(saved_model)
    fresh = HfAttentionForConditionalGeneration.from_pretrained(None, config=config, state_dict={})
    assert fresh.config.d_model == config.d_model


@pytest.mark.parametrize("layers, kind", [(1, "unexpected"), (3, "missing")])
def test_a_config_edited_to_another_layer_count_is_refused(saved_model, layers, kind):
    config = json.loads((saved_model / "config.json").read_text())
    (saved_model / "config.json").write_text(json.dumps({**config, "encoder_layers": layers}))
    with pytest.raises(ValueError, match=rf"\d+ {kind}, e\.g\. model\.encoder\.layers\.\d\..*strict=False"):
        HfAttentionForConditionalGeneration.from_pretrained(saved_model)


def test_a_base_model_still_loads_into_the_class_with_the_tied_output_projection(tmp_path):
    base = HfAttentionModel(HfAttentionConfig.from_preset("tiny", vocab_size=100))
    base.save_pretrained(tmp_path)
    model = HfAttentionForConditionalGeneration.from_pretrained(tmp_path)
    torch.testing.assert_close(model.lm_head.weight, base.shared.weight, rtol=0, atol=0)


# 11. A save killed part-way.


@pytest.mark.parametrize("point", ["config", "weights", "before_swap", "after_swap"])
def test_a_killed_save_leaves_the_old_model_or_the_new_one_never_a_mix(tmp_path, point):
    folder = tmp_path / "model"
    old = tiny_model()
    old.save_pretrained(folder)
    (folder / "notes.txt").write_text("the user's notes")
    killed = subprocess.run([sys.executable, "tests/killed_during_save.py", str(folder), point], cwd=ROOT,
                            env=subprocess_environment(), capture_output=True, text=True)  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert any(p.name.startswith(".model.saving-") for p in tmp_path.iterdir())  # what the kill left behind

    loaded = HfAttentionForConditionalGeneration.from_pretrained(folder)
    assert any(p.name.startswith(".model.saving-") for p in tmp_path.iterdir())  # a load deletes nothing
    assert loaded.config.activation_function == ("gelu" if point == "after_swap" else "relu")
    loaded.save_pretrained(folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # the next save cleared it
    if point != "after_swap":
        for name, tensor in old.state_dict().items():
            torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0)
    assert (folder / "notes.txt").read_text() == "the user's notes"


def test_a_save_in_progress_elsewhere_is_never_taken_for_an_interrupted_one(tmp_path):
    """Another host's save (its machine id differs: its PID means nothing here), and a save of this host whose lock
    is held, are left alone by saves and loads; once the lock is free, the next save clears the folder."""
    from hf_attention.checkpoint_io_hf_attention import LOCK_SUFFIX, STAGING_MARK, machine_id

    folder = tmp_path / "model"
    tiny_model().save_pretrained(folder)
    elsewhere = tmp_path / f".model{STAGING_MARK}0badc0de-{os.getpid() + 10**6}-abcdef12"  # a dead PID, over there
    elsewhere.mkdir()
    running = tmp_path / f".model{STAGING_MARK}{machine_id()}-{os.getpid() + 10**6}-12345678"
    running.mkdir()
    lock = running.with_name(running.name + LOCK_SUFFIX)
    lock.touch()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'rb'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)", str(lock)],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        HfAttentionForConditionalGeneration.from_pretrained(folder).save_pretrained(folder)
        assert elsewhere.is_dir() and running.is_dir()
    finally:
        holder.kill()
        holder.wait()
    tiny_model().save_pretrained(folder)  # the lock is free now: that save provably ended
    assert not running.exists() and not lock.exists() and elsewhere.is_dir()


def test_saving_into_the_working_directory_keeps_it_and_saves_in_place(tmp_path, monkeypatch):
    folder = tmp_path / "model"
    folder.mkdir()
    monkeypatch.chdir(folder)
    (folder / "model-00001-of-00002.safetensors").write_text("an older sharded save")
    tiny_model().save_pretrained(".")
    tiny_model().save_pretrained(".")  # again, over it
    Path("notes.txt").write_text("the user's notes")  # the working directory is still the folder
    names = {path.name for path in folder.iterdir()}
    assert {"config.json", "model.safetensors", "notes.txt"} <= names
    assert "model-00001-of-00002.safetensors" not in names and not any(n.startswith(".saving-") for n in names)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # nothing staged beside it
    HfAttentionForConditionalGeneration.from_pretrained(".")


def test_a_mount_point_is_saved_into_in_place_and_a_half_moved_save_is_refused(tmp_path, monkeypatch):
    from hf_attention import checkpoint_io_hf_attention as checkpoint_io

    folder = tmp_path / "volume"
    folder.mkdir()
    mounted = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda path: Path(path) == folder or mounted(path))
    (folder / "notes.txt").write_text("the user's notes")
    old = tiny_model()
    old.save_pretrained(folder)
    moved = []

    def replace_then_fail(source, destination):  # the process dies after moving one file in
        if moved:
            raise KeyboardInterrupt("killed while moving files in")
        moved.append(destination)
        os.rename(source, destination)

    monkeypatch.setattr(checkpoint_io.os, "replace", replace_then_fail)
    with pytest.raises(KeyboardInterrupt):
        tiny_model(activation_function="gelu").save_pretrained(folder)
    monkeypatch.undo()
    monkeypatch.setattr(os.path, "ismount", lambda path: Path(path) == folder or mounted(path))
    with pytest.raises(OSError, match="was interrupted while moving its files in"):
        HfAttentionForConditionalGeneration.from_pretrained(folder)
    tiny_model(activation_function="gelu").save_pretrained(folder)  # a complete save makes it whole again
    loaded = HfAttentionForConditionalGeneration.from_pretrained(folder)
    assert loaded.config.activation_function == "gelu" and (folder / "notes.txt").read_text() == "the user's notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["volume"]


def test_a_run_that_would_replace_a_mount_point_is_refused_before_training(tmp_path, monkeypatch):
    from hf_attention.training.job import main as train

    folder = tmp_path / "volume"
    folder.mkdir()
    (folder / "earlier.txt").write_text("an earlier run's file")
    mounted = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda path: Path(path) == folder or mounted(path))
    with pytest.raises(SystemExit, match="it is a mount point, so a run that replaces it cannot train beside it"):
        train(["--toy_corpus", "--output_dir", str(folder), "--overwrite_output_dir", "--max_steps", "1"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["volume"]
    assert [p.name for p in folder.iterdir()] == ["earlier.txt"]


def test_a_save_keeps_the_folders_other_files_and_drops_older_weight_shards(tmp_path):
    (tmp_path / "model-00001-of-00002.safetensors").write_text("an older sharded save")
    (tmp_path / "tokenizer.json").write_text("{}")
    tiny_model().save_pretrained(tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert "tokenizer.json" in names and "model.safetensors" in names
    assert "model-00001-of-00002.safetensors" not in names


# 5-8. The training job's output folder.


@pytest.fixture
def finished_run(tmp_path) -> Path:
    output_dir = tmp_path / "run"
    main([*T, "--output_dir", str(output_dir), "--max_steps", "2", "--save_strategy", "no"])
    return output_dir


def test_a_misspelt_config_field_stops_the_run_and_names_the_closest_field(tmp_path):
    with pytest.raises(SystemExit, match="--config_overrides d_modle=128: no config field 'd_modle'; did you mean "
                                         "'d_model'"):  # fmt: skip
        main([*T, "--output_dir", str(tmp_path / "run"), "--config_overrides", "d_modle=128"])
    assert not (tmp_path / "run").exists()


def test_overwriting_with_a_missing_input_keeps_the_output_folder(finished_run, tmp_path):
    before = folder_bytes(finished_run)
    with pytest.raises(SystemExit, match="missing.tsv: no such file"):
        main([*T_FILES, "--output_dir", str(finished_run), "--overwrite_output_dir", "--train_file",
              str(tmp_path / "missing.tsv"), "--validation_file", "x", "--test_file", "x"])  # fmt: skip
    assert folder_bytes(finished_run) == before


def test_an_output_folder_holding_the_training_data_is_refused(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.tsv").write_text("we buy two dogs\twir kaufen zwei hunde\n")
    files = ["--train_file", str(data / "train.tsv"), "--validation_file", str(data / "train.tsv"),
             "--test_file", str(data / "train.tsv")]  # fmt: skip
    with pytest.raises(SystemExit, match=r"--output_dir .*data contains --train_file .*train\.tsv"):
        main([*T_FILES, "--output_dir", str(data), "--overwrite_output_dir", *files])
    assert (data / "train.tsv").read_text() == "we buy two dogs\twir kaufen zwei hunde\n"


def test_resuming_another_runs_checkpoint_into_a_folder_of_files_is_refused(tmp_path):
    other = tmp_path / "other"
    main([*T, "--output_dir", str(other), "--max_steps", "2", "--save_steps", "2"])
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "README.md").write_text("my notes")
    checkpoint = other / "checkpoint-2"
    with pytest.raises(SystemExit, match="holds files of another run .* pass --overwrite_output_dir"):
        main([*T, "--output_dir", str(mine), "--max_steps", "3", "--resume_from_checkpoint", str(checkpoint)])
    assert folder_bytes(mine) == {"README.md": b"my notes"}


def test_an_overwrite_replaces_the_folder_only_when_the_run_is_complete(finished_run, monkeypatch):
    before = folder_bytes(finished_run)

    def crash(*args, **kwargs):
        raise RuntimeError("the machine went down")

    with monkeypatch.context() as patch:
        patch.setattr(CheckpointSafeSeq2SeqTrainer, "train", crash)
        with pytest.raises(RuntimeError, match="went down"):
            main([*T, "--output_dir", str(finished_run), "--overwrite_output_dir", "--max_steps", "3"])
    assert folder_bytes(finished_run) == before

    (finished_run / "old-notes.txt").write_text("replaced with the rest")
    main([*T, "--output_dir", str(finished_run), "--overwrite_output_dir", "--max_steps", "3", "--save_steps", "3"])
    assert json.loads((finished_run / "results.json").read_text())["steps"] == 3
    assert not (finished_run / "old-notes.txt").exists()
    assert sorted(p.name for p in finished_run.parent.iterdir()) == ["run"]  # no staging folder left


# 9-10. Resume is exact, wherever the run was killed.


RESUMED = [*T, "--max_steps", "12", "--save_steps", "4"]  # the run the resume tests kill and resume


def run_quietly(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, env=subprocess_environment(), capture_output=True, text=True)


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory) -> Path:
    """The parameters every killed-and-resumed run must end with."""
    output_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    finished = run_quietly([sys.executable, "scripts/train.py", *RESUMED, "--output_dir", str(output_dir)])
    assert finished.returncode == 0, finished.stderr[-3000:]
    return output_dir


def kill_then_resume(point: str, output_dir: Path) -> None:
    """Kill a run at POINT (or let it finish), then resume it with `latest`: it must end at step 12."""
    if point == "finished":
        finished = run_quietly([sys.executable, "scripts/train.py", *RESUMED, "--output_dir", str(output_dir)])
        assert finished.returncode == 0, finished.stderr[-3000:]
    else:
        killed = run_quietly([sys.executable, "tests/killed_during_training.py", point, *RESUMED, "--output_dir",
                              str(output_dir)])  # fmt: skip
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
        assert not (output_dir / "model.safetensors").exists()
    resumed = run_quietly([sys.executable, "scripts/train.py", *RESUMED, "--output_dir", str(output_dir),
                           "--resume_from_checkpoint", "latest"])  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((output_dir / "results.json").read_text())["steps"] == 12, point


def test_a_run_killed_anywhere_resumes_to_the_parameters_of_an_uninterrupted_run(uninterrupted_run, tmp_path):
    points = ["step:6", "checkpoint:2", "final_save", "finished"]
    folders = [tmp_path / point.replace(":", "-") for point in points]
    with ThreadPoolExecutor(max_workers=2) as pool:  # one thread per process (OMP_NUM_THREADS=1): two at a time
        list(pool.map(kill_then_resume, points, folders))
    for folder in folders:
        assert_same_parameters(uninterrupted_run / "model.safetensors", folder / "model.safetensors")


# Bad input: one line that names the argument, the value and what is allowed.


@pytest.mark.parametrize(
    "options, message",
    [
        (["--config_overrides", "vocab_size=50"], "vocab_size comes from the tokenizer; use --vocab_size"),
        (["--config_overrides", "d_model=90"], r"`d_model` \(90\) must be divisible by `encoder_attention_heads`"),
        (["--vocab_size", "0"], "--vocab_size 0: must be at least 5"),
        (["--vocab_size", "10"], "--vocab_size 10: the training text alone needs 33 entries"),
        (["--max_source_length", "1"], "--max_source_length 1: must be at least 2"),
        (
            ["--max_source_length", "3"],
            "--max_source_length 3 / --max_target_length 128: every training pair is longer",
        ),
        (["--preset", "huge"], "--preset 'huge': choose one of base, big, tiny"),
        (["--too_long", "cut"], "--too_long 'cut': choose one of drop, truncate"),
        (["--resume_from_checkpoint", "latest"], "holds no complete checkpoint-N folder to resume from"),
        (["--generation_num_beams", "0"], "--generation_num_beams 0: must be a positive integer"),
        (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size 0: must be a positive integer"),
    ],
)
def test_bad_training_options_stop_the_run_before_anything_is_written(tmp_path, options, message):
    with pytest.raises(SystemExit, match=message):
        main([*T, "--output_dir", str(tmp_path / "run"), "--max_steps", "1", *options])
    assert not (tmp_path / "run").exists()


def test_a_model_folder_without_a_tokenizer_is_named(saved_model, tmp_path):
    with pytest.raises(SystemExit, match=r"--model_name_or_path .*model: the folder holds no tokenizer"):
        main([*T, "--output_dir", str(tmp_path / "run"), "--model_name_or_path", str(saved_model)])


def test_config_fields_are_checked_when_set_and_again_when_a_model_is_built():
    with pytest.raises(ValueError, match="`activation_function` must be one of .*got 'nope'"):
        HfAttentionConfig.from_preset("tiny", vocab_size=100, activation_function="nope")
    config = HfAttentionConfig.from_preset("tiny", vocab_size=100)
    config.encoder_attention_heads = 5
    with pytest.raises(ValueError, match=r"`d_model` \(64\) must be divisible by `encoder_attention_heads` \(5\)"):
        HfAttentionForConditionalGeneration(config)


@pytest.mark.parametrize(
    "inputs, message",
    [
        ({"input_ids": torch.zeros(0, 4, dtype=torch.long), "decoder_input_ids": torch.zeros(0, 2, dtype=torch.long)},
         r"`input_ids` is empty \(shape \(0, 4\)\)"),
        ({"input_ids": torch.zeros(2, 0, dtype=torch.long), "decoder_input_ids": torch.ones(2, 2, dtype=torch.long)},
         r"`input_ids` is empty \(shape \(2, 0\)\)"),
        ({"input_ids": torch.tensor([[5, 2]]), "decoder_input_ids": torch.zeros(1, 0, dtype=torch.long)},
         r"`decoder_input_ids` is empty"),
        ({"input_ids": torch.tensor([[5, 2]]), "labels": torch.zeros(1, 0, dtype=torch.long)}, r"`labels` is empty"),
        ({"encoder_outputs": BaseModelOutput(last_hidden_state=torch.zeros(3, 4, 64)),
          "decoder_input_ids": torch.tensor([[1, 5]])}, "`encoder_outputs` hold 3 source sequences but the decoder "
                                                        "inputs hold 1 targets"),
    ],
    ids=["empty batch", "empty source", "empty target", "empty labels", "batch mismatch"],
)  # fmt: skip
def test_malformed_model_inputs_are_named(inputs, message):
    with pytest.raises(ValueError, match=message):
        tiny_model()(**inputs)


def test_corrupt_or_malformed_data_files_name_the_file_and_line(tmp_path):
    whole = gzip.compress(b"".join(b"we buy %d dogs\twir kaufen %d hunde\n" % (i, i) for i in range(2000)))
    (tmp_path / "cut.tsv.gz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ParallelDataError, match=r"cut\.tsv\.gz:\d+: cannot be decompressed"):
        read_parallel_corpus(tmp_path / "cut.tsv.gz", "en", "de")
    (tmp_path / "bad.jsonl").write_text('{"translation": {"en": "one", "de": "eins"}}\n'
                                        '{"translation": {"en": 5, "de": null}}\n')  # fmt: skip
    with pytest.raises(ParallelDataError, match=r'bad\.jsonl:2: the "en" side must be text, got 5'):
        read_parallel_corpus(tmp_path / "bad.jsonl", "en", "de")


@pytest.mark.parametrize(
    "options, message",
    [
        (["--model_dir", "/no/such/dir"], "--model_dir /no/such/dir: no such folder"),
        (["--num_beams", "0"], "--num_beams 0: must be a positive integer"),
        (["--batch_size", "0"], "--batch_size 0: must be a positive integer"),
    ],
)
def test_bad_evaluation_options_are_named(finished_run, tmp_path, options, message):
    (tmp_path / "test.tsv").write_text("we buy two dogs\twir kaufen zwei hunde\n")
    with pytest.raises(SystemExit, match=message):
        evaluate_main(["--model_dir", str(finished_run), "--test_file", str(tmp_path / "test.tsv"), *options])


def test_an_interrupted_overwrite_resumes_from_its_own_checkpoints_with_latest(uninterrupted_run, tmp_path):
    """A replacing run trains in `.NAME.training`; killed there, `--resume_from_checkpoint latest` (or the path)
    with `--overwrite_output_dir` continues it instead of deleting it, and ends with the uninterrupted parameters."""
    target = tmp_path / "target"
    target.mkdir()
    (target / "old-notes.txt").write_text("the folder being replaced")
    killed = run_quietly([sys.executable, "tests/killed_during_training.py", "step:6", *RESUMED, "--output_dir",
                          str(target), "--overwrite_output_dir"])  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    staging = tmp_path / ".target.training"
    assert (staging / "checkpoint-4").is_dir()
    assert folder_bytes(target) == {"old-notes.txt": b"the folder being replaced"}
    with pytest.raises(SystemExit, match="belongs to an unfinished run that replaces .* pass --overwrite_output_dir"):
        main([*RESUMED, "--output_dir", str(target), "--resume_from_checkpoint", str(staging / "checkpoint-4")])
    assert (staging / "checkpoint-4").is_dir()
    resumed = run_quietly([sys.executable, "scripts/train.py", *RESUMED, "--output_dir", str(target),
                           "--overwrite_output_dir", "--resume_from_checkpoint", "latest"])  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((target / "results.json").read_text())["steps"] == 12
    assert not (target / "old-notes.txt").exists() and not staging.exists()
    assert_same_parameters(uninterrupted_run / "model.safetensors", target / "model.safetensors")
