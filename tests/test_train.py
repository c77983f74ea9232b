"""The training job end to end on the toy corpus: artefacts, BLEU, model card, fine-tuning, output-folder guard,
multi-process training, resume after SIGKILL, checkpoints that appear only when complete."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from hf_attention import HfAttentionConfig, HfAttentionForConditionalGeneration
from hf_attention.data import toy_translation_corpus
from hf_attention.training.arguments import parse_arguments
from hf_attention.training.job import main, run
from hf_attention.training.trainer import (
    STAGING_DIR,
    CheckpointSafeSeq2SeqTrainer,
    FsdpUnsupportedError,
    share_embedding_modules,
)

from .helpers import IN_CI, padded_batch, toy_tokenizer

# accelerate is a dependency: under CI a missing launcher is a broken install, and its tests fail rather than skip.
needs_accelerate_launcher = pytest.mark.skipif(
    shutil.which("accelerate") is None and not (Path(sys.executable).parent / "accelerate").exists() and not IN_CI,
    reason="the accelerate launcher is not installed",
)

ROOT = Path(__file__).parent.parent
# A small, fast run: 4000 toy pairs, tiny model, short generations.
QUICK = [
    "--toy_corpus", "--toy_train_size", "4000", "--toy_eval_size", "20", "--vocab_size", "300",
    "--per_device_train_batch_size", "32", "--warmup_steps", "150", "--learning_rate_scale", "2",
    "--generation_max_length", "32", "--logging_steps", "10", "--seed", "0",
]  # fmt: skip


def card_metadata(folder: Path) -> dict:
    return yaml.safe_load((folder / "README.md").read_text().split("---")[1])


def test_training_learns_and_writes_model_tokenizer_card_curves_and_results(tmp_path, capsys):
    output_dir = tmp_path / "run"
    main([*QUICK, "--output_dir", str(output_dir), "--max_steps", "500", "--eval_strategy", "steps",
          "--eval_steps", "250", "--save_steps", "250"])  # fmt: skip
    printed = capsys.readouterr().out
    results = json.loads((output_dir / "results.json").read_text())
    assert results["bleu_after"] > results["bleu_before"] + 20, results
    assert f"test BLEU {results['bleu_before']:.1f} -> {results['bleu_after']:.1f}" in printed
    assert results["bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a")
    assert results["bleu_lowercase_signature"].startswith("nrefs:1|case:lc|eff:no|tok:13a")
    assert f"lowercased BLEU {results['bleu_lowercase_after']:.1f}" in printed

    model = AutoModelForSeq2SeqLM.from_pretrained(output_dir)
    assert isinstance(model, HfAttentionForConditionalGeneration)
    decoding = model.generation_config  # §6.1's decoding survives the reload, our own fields included
    assert (decoding.num_beams, decoding.length_penalty, decoding.length_penalty_style) == (4, 0.6, "gnmt")
    assert decoding.max_new_tokens_over_source == 50
    assert AutoTokenizer.from_pretrained(output_dir).pad_token_id == model.config.pad_token_id
    assert (output_dir / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == ["checkpoint-250", "checkpoint-500"]

    metadata = card_metadata(output_dir)
    assert metadata["language"] == ["en", "de"] and metadata["license"] == "apache-2.0"
    assert metadata["pipeline_tag"] == "translation" and "base_model" not in metadata
    scores = {(m["type"], m.get("config")): m["value"] for m in metadata["model-index"][0]["results"][0]["metrics"]}
    assert scores == {("bleu", None): round(results["bleu_after"], 2), ("chrf", None): round(results["chrf_after"], 2),
                      ("bleu", "lowercase"): round(results["bleu_lowercase_after"], 2)}  # fmt: skip
    card = (output_dir / "README.md").read_text()
    assert results["bleu_lowercase_signature"] in card and "| BLEU (lowercased) |" in card
    assert results["bleu_signature"] in card and "| adam_beta2 | 0.98 |" in card and "| adam_epsilon | 1e-09 |" in card

    # Fine-tuning the saved model: its tokenizer is reused and the card's text names the base model.
    finetuned = tmp_path / "finetuned"
    main([*QUICK, "--output_dir", str(finetuned), "--model_name_or_path", str(output_dir), "--max_steps", "20",
          "--save_strategy", "no"])  # fmt: skip
    assert "base_model" not in card_metadata(finetuned)  # a local folder is no Hub id; the text names it
    assert f"fine-tuned from `{output_dir}`" in (finetuned / "README.md").read_text()
    assert (finetuned / "tokenizer.json").read_bytes() == (output_dir / "tokenizer.json").read_bytes()


def test_paper_recipe_is_the_default_and_every_number_is_overridable(tmp_path):
    _, _, training_args = parse_arguments(["--output_dir", str(tmp_path)])
    assert (training_args.adam_beta1, training_args.adam_beta2, training_args.adam_epsilon) == (0.9, 0.98, 1e-9)
    assert training_args.lr_scheduler_type == "inverse_sqrt" and training_args.warmup_steps == 4000
    assert training_args.label_smoothing_factor == 0.1 and training_args.weight_decay == 0.0
    resolved = training_args.with_paper_learning_rate(d_model=512)
    assert resolved.learning_rate == pytest.approx(512**-0.5 * 4000**-0.5)
    assert training_args.learning_rate == 0  # the user's arguments are never written into
    overrides = ["--adam_beta2", "0.99", "--learning_rate", "3e-4"]
    _, _, overridden = parse_arguments(["--output_dir", str(tmp_path), *overrides])
    overridden = overridden.with_paper_learning_rate(d_model=512)
    assert overridden.adam_beta2 == 0.99 and overridden.learning_rate == 3e-4


def test_a_folder_holding_a_model_is_never_overwritten_without_the_flag(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SystemExit, match="already holds a saved model; pass --overwrite_output_dir"):
        main([*QUICK, "--output_dir", str(tmp_path), "--max_steps", "1"])
    assert (tmp_path / "config.json").read_text() == "{}"


def test_bad_corpus_files_stop_the_run_with_the_file_named(tmp_path):
    (tmp_path / "train.en").write_text("one\ntwo\n")
    (tmp_path / "train.de").write_text("eins\n")
    arguments = ["--output_dir", str(tmp_path / "out"), "--train_file", str(tmp_path / "train")]
    with pytest.raises(SystemExit, match=r"train\.en has 2 lines but .*train\.de has 1"):
        main([*arguments, "--validation_file", str(tmp_path / "train"), "--test_file", str(tmp_path / "train")])
    (tmp_path / "train.de").write_text("eins\nzwei\n")
    with pytest.raises(SystemExit, match="--validation_split_percentage 0: the data has no validation split"):
        main([*arguments, "--validation_split_percentage", "0"])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("options", [["--activation_checkpointing"], ["--bf16"]], ids=["checkpointing", "bf16"])
def test_memory_and_precision_options_train(tmp_path, options):
    summary = run(*parse_arguments([*QUICK, "--output_dir", str(tmp_path), "--max_steps", "5", "--save_strategy",
                                    "no", "--toy_eval_size", "4", *options]))  # fmt: skip
    assert summary.steps == 5 and summary.bleu_after >= 0


def test_a_failure_during_a_save_leaves_no_checkpoint_that_looks_complete(tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(CheckpointSafeSeq2SeqTrainer, "_save_rng_state", crash)
    with pytest.raises(KeyboardInterrupt):
        main([*QUICK, "--output_dir", str(tmp_path), "--max_steps", "10", "--save_steps", "5"])
    assert [p.name for p in tmp_path.iterdir()] == [STAGING_DIR]  # the partial save stays out of sight
    assert (tmp_path / STAGING_DIR / "checkpoint-5" / "model.safetensors").exists()


def launch(arguments: list[str], log: Path, **environment: str) -> subprocess.Popen:
    """Start a run in a subprocess, its output going to `log` (a pipe could fill up and stall it)."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **environment}
    with open(log, "w") as output:
        return subprocess.Popen(arguments, cwd=ROOT, env=environment, stdout=output, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip


def finish(process: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    """Waits for a launched run; a run still going after `timeout` seconds is killed with every process it started
    (a launcher's workers too, which would otherwise outlive the test) and fails the test with its log's end."""
    try:
        returncode = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        pytest.fail(f"the run was still going after {timeout:g} s:\n{log.read_text()[-5000:]}")
    assert returncode == 0, log.read_text()[-5000:]


FSDP = ["--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
        "--fsdp_reshard_after_forward", "true"]  # fmt: skip


def two_processes(port: int, *distribution: str) -> list[str]:
    accelerate = shutil.which("accelerate") or str(Path(sys.executable).parent / "accelerate")
    return [accelerate, "launch", *distribution, "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
            "tests/distributed_train.py"]  # fmt: skip


def toy_corpus_files(tmp_path: Path, pairs: int, train: int, validation: int = 20) -> list[str]:
    """The toy corpus as train/val/test JSON lines files, and the job's flags that read them (a small tokenizer,
    cached; short greedy evaluation; the run in tmp_path/run)."""
    data = tmp_path / "data"
    data.mkdir()
    rows = toy_translation_corpus(pairs, seed=4)
    splits = {"train": rows[:train], "val": rows[train : train + validation], "test": rows[train + validation :]}
    for name, part in splits.items():
        (data / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in part))
    return ["--train_file", str(data / "train.jsonl"), "--validation_file", str(data / "val.jsonl"),
            "--test_file", str(data / "test.jsonl"), "--vocab_size", "150", "--cache_dir", str(tmp_path / "cache"),
            "--generation_max_length", "6", "--generation_num_beams", "1", "--test_before_training", "false",
            "--max_source_length", "64", "--max_target_length", "64",
            "--output_dir", str(tmp_path / "run")]  # fmt: skip


@pytest.mark.slow  # test_reliability's run killed anywhere covers it in the default suite
def test_run_killed_after_a_checkpoint_resumes_to_the_same_parameters(tmp_path):
    arguments = [*QUICK, "--max_steps", "150", "--save_steps", "20", "--toy_eval_size", "4"]
    # Every run in a subprocess with the same thread count, so that floating-point sums run in the same order.
    log = tmp_path / "log.txt"
    finish(launch([sys.executable, "scripts/train.py", *arguments, "--output_dir", str(tmp_path / "whole")], log), log)

    killed_dir = tmp_path / "killed"
    process = launch([sys.executable, "scripts/train.py", *arguments, "--output_dir", str(killed_dir)], log)
    first_checkpoint = killed_dir / "checkpoint-20"
    deadline = time.monotonic() + 120
    while not first_checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, log.read_text()[-5000:]
    assert not (killed_dir / "model.safetensors").exists()

    with pytest.raises(SystemExit, match="already holds files"):  # a killed run is not silently restarted
        main([*arguments, "--output_dir", str(killed_dir)])
    resume = ["--output_dir", str(killed_dir), "--resume_from_checkpoint", "latest"]
    finish(launch([sys.executable, "scripts/train.py", *arguments, *resume], log), log)
    expected = load_file(tmp_path / "whole" / "model.safetensors")
    resumed = load_file(killed_dir / "model.safetensors")
    assert expected.keys() == resumed.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(resumed[name], tensor, atol=1e-6, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_the_best_checkpoint_survives_a_resume_and_is_the_model_loaded_at_the_end(tmp_path):
    # The highest evaluation loss is "best" here, so that the best checkpoint is an early one, not the last.
    arguments = ["--toy_corpus", "--vocab_size", "120", "--per_device_train_batch_size", "8",
                 "--generation_max_length", "8", "--generation_num_beams", "1", "--warmup_steps", "2",
                 "--toy_eval_size", "4", "--toy_train_size", "200", "--save_steps", "2", "--eval_strategy", "steps",
                 "--eval_steps", "2", "--load_best_model_at_end", "--metric_for_best_model", "loss",
                 "--greater_is_better", "true", "--save_total_limit", "2", "--seed", "3",
                 "--output_dir", str(tmp_path)]  # fmt: skip
    main([*arguments, "--max_steps", "4"])  # stopped after checkpoint-4, as a killed run would be
    state = json.loads((tmp_path / "checkpoint-4" / "trainer_state.json").read_text())
    best = state["best_model_checkpoint"]
    assert Path(best).is_dir() and Path(best).parent == tmp_path  # a checkpoint that exists, not its staging path
    main([*arguments, "--max_steps", "8", "--resume_from_checkpoint", "latest"])
    state = json.loads((tmp_path / "checkpoint-8" / "trainer_state.json").read_text())
    losses = {entry["step"]: entry["eval_loss"] for entry in state["log_history"] if entry.get("step") and
              "eval_loss" in entry}  # the evaluation before training (step 0) has no checkpoint  # fmt: skip
    best = Path(state["best_model_checkpoint"])
    assert best == tmp_path / f"checkpoint-{max(losses, key=losses.get)}" and best.is_dir()  # kept by the rotation
    final, chosen = load_file(tmp_path / "model.safetensors"), load_file(best / "model.safetensors")
    assert all(torch.equal(final[name], chosen[name]) for name in final)


def test_a_checkpoint_that_names_its_staging_folder_as_best_is_repaired_on_resume(tmp_path):
    from transformers import TrainerState

    from hf_attention.training.trainer import STAGING_DIR, repair_best_checkpoint_path

    (tmp_path / "checkpoint-2").mkdir()
    state_path = tmp_path / "checkpoint-2" / "trainer_state.json"
    TrainerState(best_model_checkpoint=str(tmp_path / STAGING_DIR / "checkpoint-2")).save_to_json(state_path)
    repair_best_checkpoint_path(str(state_path))
    assert json.loads(state_path.read_text())["best_model_checkpoint"] == str(tmp_path / "checkpoint-2")


@needs_accelerate_launcher
@pytest.mark.slow  # the FSDP test below trains two DDP processes too, in the default suite
def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path):
    # SGD, not Adam: Adam's normalised first steps turn float-rounding noise in near-zero gradients into full-size
    # steps, which hides the comparison; SGD compares the gradients themselves.
    arguments = [*QUICK, "--max_steps", "6", "--save_strategy", "no", "--toy_eval_size", "4", "--optim", "sgd",
                 "--learning_rate", "0.5", "--lr_scheduler_type", "constant",
                 "--config_overrides", "dropout=0"]  # fmt: skip
    # On a machine without GPUs `--multi_gpu` is how accelerate starts several (gloo, CPU) processes.
    log = tmp_path / "log.txt"
    two = [str(tmp_path / "two"), *arguments, "--per_device_train_batch_size", "16", "--output_dir", f"{tmp_path}/2"]
    one = [str(tmp_path / "one"), *arguments, "--per_device_train_batch_size", "32", "--output_dir", f"{tmp_path}/1"]
    finish(launch([*two_processes(29517, "--multi_gpu"), *two], log), log)
    finish(launch([sys.executable, "tests/distributed_train.py", *one], log), log)

    rank0, rank1 = load_file(tmp_path / "two" / "rank0.safetensors"), load_file(tmp_path / "two" / "rank1.safetensors")
    reference = load_file(tmp_path / "one" / "rank0.safetensors")
    for name, tensor in reference.items():
        assert torch.equal(rank0[name], rank1[name]), name
        torch.testing.assert_close(rank0[name], tensor, atol=1e-5, rtol=1e-4, msg=name)


@needs_accelerate_launcher
@pytest.mark.parametrize(
    "streaming",
    [  # 17 s each; test_two_processes_end_every_epoch_together streams in two processes in the default suite
        pytest.param([], marks=pytest.mark.slow),
        pytest.param(["--streaming"], marks=pytest.mark.slow),  # the epoch test below streams in the default suite
        pytest.param(["--streaming", "--max_tokens", "64"], marks=pytest.mark.slow),
    ],
    ids=["cached", "streaming", "tokens"],
)
def test_two_processes_prepare_the_data_once_and_stay_in_step(tmp_path, streaming):
    """The main process trains the tokenizer and tokenises; the other loads both from the cache. A stream is split
    across the processes (and each cuts its part into token batches). Either way the two processes end with the same
    parameters."""
    arguments = [*toy_corpus_files(tmp_path, pairs=400, train=360), "--max_steps", "4", "--save_strategy", "no",
                 "--per_device_train_batch_size", "8", *streaming]  # fmt: skip
    log = tmp_path / "log.txt"
    finish(launch([*two_processes(29519, "--multi_gpu"), str(tmp_path / "out"), *arguments], log), log)
    work = [json.loads((tmp_path / "out" / f"work{rank}.json").read_text()) for rank in range(2)]
    assert [rank["tokenizer_trainings"] for rank in work] == [1, 0]
    if not streaming:  # the stream is tokenised as it is read, by each process for its own part
        assert work[0]["map_results_written"] > 0 and work[1]["map_results_written"] == 0
    rank0, rank1 = (load_file(tmp_path / "out" / f"rank{rank}.safetensors") for rank in range(2))
    for name, tensor in rank0.items():
        assert torch.equal(tensor, rank1[name]), name


@needs_accelerate_launcher
@pytest.mark.slow  # 20 s of two processes; the one-process budget test runs in the default suite
def test_two_processes_stop_on_the_time_budget_at_the_same_step(tmp_path):
    """The main process's clock decides when --max_train_minutes is spent, so neither process waits in a collective
    for a step the other never takes: here the second process's clock runs 4 s ahead (with its own clock deciding,
    the main process waited in the next step's all-reduce until the test's timeout)."""
    arguments = [*toy_corpus_files(tmp_path, pairs=400, train=360), "--max_steps", "100000", "--save_steps", "5",
                 "--per_device_train_batch_size", "8", "--max_train_minutes", "0.15"]  # fmt: skip
    log = tmp_path / "log.txt"
    process = launch([*two_processes(29531, "--multi_gpu"), str(tmp_path / "out"), *arguments], log,
                     HF_ATTENTION_SECOND_CLOCK_AHEAD="4")  # fmt: skip
    finish(process, log)
    rank0, rank1 = (load_file(tmp_path / "out" / f"rank{rank}.safetensors") for rank in range(2))
    for name, tensor in rank0.items():
        assert torch.equal(tensor, rank1[name]), name
    last = max(int(path.name.split("-")[1]) for path in (tmp_path / "run").glob("checkpoint-*"))
    state = json.loads((tmp_path / "run" / f"checkpoint-{last}" / "trainer_state.json").read_text())
    assert 0 < state["global_step"] == last < 100000  # stopped by the budget, with a checkpoint at that step


@needs_accelerate_launcher
@pytest.mark.parametrize(
    "batching",
    [  # a stream cut into token batches in the default suite; sentence batches and map-style token batches slow
        ["--streaming", "--max_tokens", "112", "--shuffle_buffer_size", "50"],
        pytest.param(["--streaming", "--per_device_train_batch_size", "8"], marks=pytest.mark.slow),
        pytest.param(["--max_tokens", "128"], marks=pytest.mark.slow),
    ],
    ids=["stream-tokens", "stream-sentences", "map-tokens"],
)
def test_two_processes_end_every_epoch_together(tmp_path, batching):
    """Issue 24's item 2: the two processes' parts of a stream differ (161 pairs: 81 and 80), and so do the batches
    cut from them; each process ended its epochs at its own step, and the epoch's save and evaluation paired
    different collectives (gloo: "collective mismatch"). Now every epoch ends at the same step on both, through
    several epochs, with gradient accumulation 2 and a save and an evaluation at each epoch's end. Each process
    leaves the group after a barrier (without one, the second process once in ~50 runs deadlocked tearing gloo down
    straight after the evaluation's gather)."""
    arguments = [*toy_corpus_files(tmp_path, pairs=200, train=161), "--max_steps", "16",
                 "--gradient_accumulation_steps", "2", "--save_strategy", "epoch", "--eval_strategy", "epoch",
                 *batching]  # fmt: skip
    log = tmp_path / "log.txt"
    finish(launch([*two_processes(29527, "--multi_gpu"), str(tmp_path / "out"), *arguments], log), log)
    work = [json.loads((tmp_path / "out" / f"work{rank}.json").read_text()) for rank in range(2)]
    epochs = work[0]["epoch_end_steps"]
    assert work[1]["epoch_end_steps"] == epochs and len(epochs) >= 3, epochs  # several epochs, ended together
    assert [rank["tokenizer_trainings"] for rank in work] == [1, 0]
    for rank in range(2):
        left = json.loads((tmp_path / "out" / f"left{rank}.json").read_text())
        assert left == {"collective": "barrier"}, rank
    saved = sorted(int(path.name.split("-")[1]) for path in (tmp_path / "run").glob("checkpoint-*"))
    assert saved == epochs[-len(saved) :]  # each epoch's checkpoint (the oldest rotated away)
    rank0, rank1 = (load_file(tmp_path / "out" / f"rank{rank}.safetensors") for rank in range(2))
    for name, tensor in rank0.items():
        assert torch.equal(tensor, rank1[name]), name


@needs_accelerate_launcher
def test_two_processes_evaluate_a_saved_model_as_one_does(tmp_path):
    """--do_eval / --do_predict without --do_train on two processes: the evaluation, split between them and gathered
    without the copies that complete the last batches, equals one process's; the main process alone predicts and
    writes; both leave the group after a barrier (not straight after the evaluation's gather, see the test above)."""
    model_dir = tmp_path / "model"
    tokenizer = toy_tokenizer()
    config = HfAttentionConfig.from_preset("tiny", vocab_size=len(tokenizer), max_position_embeddings=64)
    torch.manual_seed(0)
    HfAttentionForConditionalGeneration(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    corpus = toy_corpus_files(tmp_path, pairs=60, train=20, validation=21)  # 21: the parts differ (11 and 10)
    files = corpus[corpus.index("--validation_file") : corpus.index("--vocab_size")]
    # One sentence a batch: the evaluation loss, a mean over batches, does not depend on how they were cut.
    arguments = ["--model_name_or_path", str(model_dir), *files, "--do_eval", "--do_predict",
                 "--per_device_eval_batch_size", "1", "--generation_max_length", "6", "--generation_num_beams", "1",
                 "--max_source_length", "64", "--max_target_length", "64"]  # fmt: skip
    main([*arguments, "--output_dir", str(tmp_path / "one")])
    log = tmp_path / "log.txt"
    two = [*two_processes(29533, "--multi_gpu"), str(tmp_path / "out"), *arguments, "--output_dir", f"{tmp_path}/two"]
    finish(launch(two, log), log)
    for rank in range(2):
        left = json.loads((tmp_path / "out" / f"left{rank}.json").read_text())
        assert left == {"collective": "barrier"}, rank
    one, both = (json.loads((tmp_path / run / "eval_results.json").read_text()) for run in ("one", "two"))
    assert both["eval_samples"] == one["eval_samples"] == 21
    assert both["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-5)
    assert both["eval_chrf"] == pytest.approx(one["eval_chrf"], rel=1e-9)  # the same 21 translations, no copies
    predicted = [(tmp_path / run / "generated_predictions.txt").read_text() for run in ("one", "two")]
    assert predicted[0] == predicted[1] and len(predicted[0].splitlines()) == 19


@needs_accelerate_launcher
def test_two_fsdp_processes_end_with_the_parameters_of_two_ddp_processes(tmp_path):
    """FSDP2 through accelerate shards the model along `_no_split_modules` (gloo, on CPU: see distributed_train.py)
    and trains, averages, evaluates and saves the same model as DDP."""
    arguments = [*QUICK, "--max_steps", "6", "--save_steps", "2", "--average_last_n_checkpoints", "2",
                 "--toy_eval_size", "4", "--optim", "sgd", "--learning_rate", "0.5", "--lr_scheduler_type", "constant",
                 "--config_overrides", "dropout=0", "--per_device_train_batch_size", "16", "--eval_strategy", "no",
                 "--do_train", "--do_eval", "--do_predict"]  # fmt: skip
    log = tmp_path / "log.txt"
    ddp = [*two_processes(29521, "--multi_gpu"), str(tmp_path / "ddp"), *arguments, "--output_dir", f"{tmp_path}/d"]
    finish(launch(ddp, log), log)
    for checkpoint in sorted((tmp_path / "d").glob("checkpoint-*")):  # every rank's files made it into the swap
        assert {"rng_state_0.pth", "rng_state_1.pth"} <= {path.name for path in checkpoint.iterdir()}, checkpoint
    # Two processes resumed from checkpoint-4 take the uninterrupted run's steps 5 and 6 (each rank its own RNG).
    shutil.copytree(tmp_path / "d", tmp_path / "r")
    shutil.rmtree(tmp_path / "r" / "checkpoint-6")
    resumed = [*two_processes(29525, "--multi_gpu"), str(tmp_path / "resumed"), *arguments, "--output_dir",
               f"{tmp_path}/r", "--resume_from_checkpoint", f"{tmp_path}/r/checkpoint-4"]  # fmt: skip
    finish(launch(resumed, log), log)
    uninterrupted, again = (load_file(tmp_path / run / "checkpoint-6" / "model.safetensors") for run in ("d", "r"))
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(again[name], tensor, atol=1e-6, rtol=1e-5, msg=name)
    fsdp = [*two_processes(29523, *FSDP, "--fsdp_state_dict_type", "FULL_STATE_DICT"), str(tmp_path / "fsdp"),
            *arguments, "--output_dir", f"{tmp_path}/f"]  # fmt: skip
    finish(launch(fsdp, log, HF_ATTENTION_FSDP_ON_CPU="1"), log)

    work = [json.loads((tmp_path / "fsdp" / f"work{rank}.json").read_text()) for rank in range(2)]
    assert {"FSDPEncoderLayer", "FSDPDecoderLayer"} <= set(work[0]["sharded_modules"])
    whole = HfAttentionForConditionalGeneration.from_pretrained(tmp_path / "d").num_parameters()
    assert [rank["local_parameters"] < whole for rank in work] == [True, True]
    assert work[0]["local_parameters"] + work[1]["local_parameters"] == whole  # each holds its own half
    for rank in range(2):  # the gathered parameters at the end of training
        reference = load_file(tmp_path / "ddp" / f"rank{rank}.safetensors")
        sharded = load_file(tmp_path / "fsdp" / f"rank{rank}.safetensors")
        for name, tensor in reference.items():
            torch.testing.assert_close(sharded[name], tensor, atol=1e-5, rtol=1e-4, msg=name)
    averaged_ddp, averaged_fsdp = (load_file(tmp_path / run / "model.safetensors") for run in ("d", "f"))
    assert averaged_ddp.keys() == averaged_fsdp.keys()
    for name, tensor in averaged_ddp.items():
        torch.testing.assert_close(averaged_fsdp[name], tensor, atol=1e-5, rtol=1e-4, msg=name)
    last = load_file(tmp_path / "ddp" / "rank0.safetensors")["model.shared.weight"]
    assert not torch.equal(averaged_fsdp["model.shared.weight"], last)  # the saved model is the average
    evaluated = [json.loads((tmp_path / run / "eval_results.json").read_text()) for run in ("d", "f")]
    assert evaluated[1]["eval_loss"] == pytest.approx(evaluated[0]["eval_loss"], rel=1e-4)
    predicted = [(tmp_path / run / "generated_predictions.txt").read_text() for run in ("d", "f")]
    assert predicted[0] == predicted[1]


@needs_accelerate_launcher
@pytest.mark.slow  # 15 s of launching two processes for a refusal
def test_fsdp_with_sharded_checkpoints_refuses_averaging_before_training(tmp_path):
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    (output_dir / "notes.txt").write_text("mine")
    arguments = [*QUICK, "--max_steps", "4", "--save_steps", "2", "--average_last_n_checkpoints", "2",
                 "--output_dir", str(output_dir), "--overwrite_output_dir"]  # fmt: skip
    log = tmp_path / "log.txt"
    sharded = [*two_processes(29525, *FSDP, "--fsdp_state_dict_type", "SHARDED_STATE_DICT"), str(tmp_path / "o")]
    process = launch([*sharded, *arguments], log, HF_ATTENTION_FSDP_ON_CPU="1")
    assert process.wait(timeout=300) != 0
    assert "--average_last_n_checkpoints 2: averaging reads whole weights, but FSDP saves one shard" in log.read_text()
    assert [path.name for path in output_dir.iterdir()] == ["notes.txt"]


def test_the_test_set_is_scored_before_training_only_when_asked(tmp_path, capsys):
    run(*parse_arguments([*QUICK, "--output_dir", str(tmp_path), "--max_steps", "2", "--save_strategy", "no",
                          "--toy_eval_size", "4", "--test_before_training", "false"]))  # fmt: skip
    assert json.loads((tmp_path / "results.json").read_text())["bleu_before"] is None
    assert "BLEU before training" not in (tmp_path / "README.md").read_text()


def test_before_fsdp_one_embedding_module_takes_every_place_of_the_tied_matrix(tiny_config):
    model = HfAttentionForConditionalGeneration(tiny_config).eval()
    batch = padded_batch([7, 4, 6], max_length=7)
    with torch.no_grad():
        before = model(**batch, decoder_input_ids=batch["input_ids"]).logits
        share_embedding_modules(model)
        after = model(**batch, decoder_input_ids=batch["input_ids"]).logits
    shared = model.model.shared
    assert model.model.encoder.embed_tokens is shared and model.model.decoder.embed_tokens is shared
    assert model.lm_head.weight is shared.weight
    assert torch.equal(after, before)
    assert set(model.state_dict()) == set(HfAttentionForConditionalGeneration(tiny_config).state_dict())


def test_fsdp_refuses_a_target_embedding_tied_only_to_the_output_projection(tiny_config):
    config = type(tiny_config)(**{**tiny_config.to_dict(), "share_encoder_decoder_embeddings": False,
                                  "decoder_vocab_size": 77})  # fmt: skip
    model = HfAttentionForConditionalGeneration(config)
    assert model.lm_head.weight is model.model.decoder.embed_tokens.weight
    with pytest.raises(FsdpUnsupportedError, match="separate vocabularies"):
        share_embedding_modules(model)
