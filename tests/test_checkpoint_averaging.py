"""The paper's finishing steps (§6.1): averaging the last checkpoints, and beam search with a length penalty and an
output limit of source length + 50, saved as the trained model's decoding defaults."""

import json
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerControl, TrainerState

from hf_attention import HfAttentionConfig, HfAttentionForConditionalGeneration
from hf_attention.training.checkpoint_averaging import main as average
from hf_attention.training.job import main as train
from hf_attention.training.trainer import WallClockCallback

# A run of a few seconds on the toy corpus that saves a checkpoint every 2 steps.
RUN = ["--toy_corpus", "--vocab_size", "120", "--per_device_train_batch_size", "8", "--generation_max_length", "8",
       "--generation_num_beams", "2", "--warmup_steps", "2", "--toy_eval_size", "4", "--toy_train_size", "200",
       "--max_steps", "6", "--save_steps", "2", "--logging_steps", "2", "--seed", "3"]  # fmt: skip


def mean_of(files: list) -> dict[str, torch.Tensor]:
    tensors = [load_file(file) for file in files]
    return {name: sum(t[name].double() for t in tensors) / len(tensors) for name in tensors[0]}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("run") / "out"
    train([*RUN, "--output_dir", str(output_dir), "--average_last_n_checkpoints", "2"])
    return output_dir


def test_the_training_job_averages_the_last_checkpoints_into_the_final_model(run):
    checkpoints = [run / f"checkpoint-{step}" / "model.safetensors" for step in (4, 6)]
    expected, final = mean_of(checkpoints), load_file(run / "model.safetensors")
    assert expected.keys() == final.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(final[name].double(), tensor, rtol=0, atol=1e-7, msg=name)
    assert not torch.equal(final["model.shared.weight"], load_file(checkpoints[-1])["model.shared.weight"])
    assert "| average_last_n_checkpoints | 2 |" in (run / "README.md").read_text()


def test_the_averaging_script_takes_a_run_and_the_last_n_checkpoints(run, tmp_path, capsys):
    average(["--inputs", str(run), "--num_checkpoints", "3", "--output_dir", str(tmp_path / "averaged")])
    assert "averaged 3 checkpoints (checkpoint-2, checkpoint-4, checkpoint-6)" in capsys.readouterr().out
    checkpoints = [run / f"checkpoint-{step}" / "model.safetensors" for step in (2, 4, 6)]
    averaged = load_file(tmp_path / "averaged" / "model.safetensors")
    for name, tensor in mean_of(checkpoints).items():
        torch.testing.assert_close(averaged[name].double(), tensor, rtol=0, atol=1e-7, msg=name)
    assert (tmp_path / "averaged" / "tokenizer.json").is_file()
    HfAttentionForConditionalGeneration.from_pretrained(tmp_path / "averaged")  # strict: every tensor fits


def test_averaging_refuses_too_few_checkpoints_and_different_architectures(run, tmp_path):
    with pytest.raises(SystemExit, match="--num_checkpoints 4: there are 3 checkpoints"):
        average(["--inputs", str(run), "--num_checkpoints", "4", "--output_dir", str(tmp_path / "out")])
    other = tmp_path / "other"
    HfAttentionForConditionalGeneration(
        HfAttentionConfig.from_preset("tiny", vocab_size=120, d_model=32)
    ).save_pretrained(other)
    inputs = [str(run / "checkpoint-6"), str(other)]
    with pytest.raises(SystemExit, match=r"different architectures \(d_model: 32 vs 64\)"):
        average(["--inputs", *inputs, "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "options, message",
    [
        (["--average_last_n_checkpoints", "4"], r"--save_steps 2 over 6 steps saves 3 checkpoints"),
        (["--average_last_n_checkpoints", "3", "--save_total_limit", "2"], "--save_total_limit 2 keeps only 2"),
        (["--average_last_n_checkpoints", "2", "--save_strategy", "no"], "the run saves no checkpoints"),
        (["--average_last_n_checkpoints", "3", "--save_steps", "0.5"], r"--save_steps 0.5 over 6 steps saves 2 "),
        (
            [
                "--average_last_n_checkpoints",
                "3",
                "--save_strategy",
                "epoch",
                "--max_steps",
                "-1",
                "--num_train_epochs",
                "2",
            ],
            "--save_strategy epoch over 2 epochs saves 2 checkpoints",
        ),
        (
            [
                "--average_last_n_checkpoints",
                "4",
                "--save_steps",
                "10",
                "--max_steps",
                "-1",
                "--num_train_epochs",
                "1",
            ],
            "--save_steps 10 over 25 steps saves 3 checkpoints",
        ),  # 200 pairs in batches of 8: 25 steps an epoch
    ],
    ids=["steps", "kept", "no-saves", "fraction", "epochs", "steps-of-epochs"],
)
def test_averaging_that_cannot_happen_stops_the_run_before_it_writes(tmp_path, options, message):
    with pytest.raises(SystemExit, match=message):
        train([*RUN, "--output_dir", str(tmp_path / "out"), *options])
    assert not (tmp_path / "out").exists()


def test_a_fractional_save_interval_is_counted_as_transformers_counts_it(tmp_path):
    output = tmp_path / "out"  # every ceil(6 × 0.25) = 2 steps: checkpoints 2, 4, 6
    train([*RUN, "--output_dir", str(output), "--save_steps", "0.25", "--average_last_n_checkpoints", "3"])
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    expected = mean_of([output / f"checkpoint-{step}" / "model.safetensors" for step in (2, 4, 6)])
    saved = load_file(output / "model.safetensors")
    assert all(torch.allclose(saved[name].double(), expected[name], atol=1e-6) for name in saved)


def test_averaging_that_fails_after_training_keeps_the_last_weights_and_says_so(tmp_path, monkeypatch):
    from hf_attention.training import job
    from hf_attention.training.checkpoint_averaging import CheckpointAveragingError

    def unreadable(*args):
        raise CheckpointAveragingError("checkpoint-6 holds other tensors than checkpoint-4.")

    monkeypatch.setattr(job, "find_checkpoints", unreadable)
    output = tmp_path / "out"
    with pytest.raises(SystemExit, match="holds the last weights, not the average") as stopped:
        train([*RUN, "--output_dir", str(output), "--average_last_n_checkpoints", "2"])
    assert "checkpoint-6 holds other tensors" in str(stopped.value)
    last = load_file(output / "checkpoint-6" / "model.safetensors")
    saved = load_file(output / "model.safetensors")
    assert all(torch.equal(saved[name], last[name]) for name in saved)  # the run's work is kept


def test_the_trained_model_decodes_as_the_paper_by_default(run):
    saved = json.loads((run / "generation_config.json").read_text())
    assert saved["length_penalty"] == 0.6 and saved["max_new_tokens_over_source"] == 50
    assert saved["length_penalty_style"] == "gnmt"  # §6.1's penalty: ((5 + |Y|) / 6)^α
    assert saved["max_new_tokens"] == 8 and "max_length" not in saved


def test_outputs_stop_at_the_source_length_plus_the_configured_margin():
    torch.manual_seed(0)
    model = HfAttentionForConditionalGeneration(HfAttentionConfig.from_preset("tiny", vocab_size=100)).eval()
    model.generation_config.max_new_tokens_over_source = 3
    source = torch.tensor([[5, 6, 7, 8, 2]])
    never_stop = {"min_new_tokens": 100}  # the end token is suppressed, so only the limit stops generation
    assert model.generate(source, **never_stop).shape[1] == 1 + 5 + 3  # start token, source length + 3
    assert model.generate(source, max_new_tokens=2, **never_stop).shape[1] == 1 + 2  # the caller's limit wins
    model.generation_config.max_new_tokens = 4  # an absolute cap below source + 3
    assert model.generate(input_ids=source, **never_stop).shape[1] == 1 + 4


def test_logged_entries_carry_the_wall_clock_time_for_time_to_quality_curves(run):
    state = json.loads((run / "checkpoint-6" / "trainer_state.json").read_text())
    times = [entry["wall_seconds"] for entry in state["log_history"]]
    assert times and times == sorted(times) and times[-1] > 0


def test_a_spent_time_budget_stops_training_at_that_step_with_a_checkpoint(tmp_path):
    output = tmp_path / "out"  # a budget spent before the first step ends: training stops after step 1
    train([*RUN, "--output_dir", str(output), "--max_train_minutes", "1e-6"])
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-1"]
    state = json.loads((output / "checkpoint-1" / "trainer_state.json").read_text())
    assert state["global_step"] == 1 and state["max_steps"] == 6
    last = load_file(output / "checkpoint-1" / "model.safetensors")
    saved = load_file(output / "model.safetensors")  # the final model is the last step's
    assert all(torch.equal(saved[name], last[name]) for name in saved)


def test_a_negative_time_budget_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(SystemExit, match="--max_train_minutes -1: must be 0"):
        train([*RUN, "--output_dir", str(tmp_path / "out"), "--max_train_minutes", "-1"])
    assert not (tmp_path / "out").exists()


def test_averaging_into_a_folder_that_holds_its_inputs_is_refused_and_deletes_nothing(run, tmp_path):
    held = sorted(path.name for path in run.iterdir())
    for output in (run, run.parent):
        with pytest.raises(SystemExit, match=f"--output_dir {output} holds --inputs {run}: replacing it would delete"):
            average(["--inputs", str(run), "--output_dir", str(output), "--overwrite_output_dir"])
    assert sorted(path.name for path in run.iterdir()) == held


def test_averaging_checkpoints_that_lack_a_tensor_fails_loudly(run, tmp_path):
    """Tied weights are saved once and count as present; any other tensor missing is named, never left at its
    initial value."""
    from safetensors.torch import save_file
    from transformers import AutoModelForSeq2SeqLM

    from hf_attention.training.checkpoint_averaging import CheckpointAveragingError, average_into_model

    checkpoints = sorted(run.glob("checkpoint-*"))[-2:]
    model = AutoModelForSeq2SeqLM.from_pretrained(checkpoints[-1])
    average_into_model(model, checkpoints)  # complete checkpoints, tied embeddings saved once: fine
    damaged = []
    for checkpoint in checkpoints:
        copy = tmp_path / checkpoint.name
        copy.mkdir()
        for file in checkpoint.iterdir():
            if file.is_file():
                (copy / file.name).write_bytes(file.read_bytes())
        tensors = load_file(copy / "model.safetensors")
        removed = next(name for name in tensors if name.endswith("fc1.weight"))
        del tensors[removed]
        save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
        damaged.append(copy)
    with pytest.raises(CheckpointAveragingError, match=rf"missing \['{removed}'\]"):
        average_into_model(model, damaged)


def fake_clock(monkeypatch, seconds_per_reading: float) -> None:
    """The job's wall clock advances `seconds_per_reading` each time it is read (from now, when the job starts)."""
    now, readings = time.perf_counter(), iter(range(10**6))
    monkeypatch.setattr(WallClockCallback, "clock", staticmethod(lambda: now + seconds_per_reading * next(readings)))


def test_the_cool_down_scales_the_schedule_by_the_budget_left_and_reaches_zero_at_its_end(monkeypatch):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    callback = WallClockCallback(started=0.0, budget_minutes=10, cooldown_minutes=4)
    callback.cool(scheduler)
    callback.cool(scheduler)  # once only
    args = type("Args", (), {"device": "cpu", "world_size": 1, "save_strategy": "steps"})()
    control = TrainerControl()
    monkeypatch.setattr(WallClockCallback, "clock", staticmethod(lambda: 0.0))
    callback.on_train_begin(args, TrainerState(), control)
    for minute, factor in ((0, 1.0), (6, 1.0), (8, 0.5), (9, 0.25), (10, 0.0)):
        monkeypatch.setattr(WallClockCallback, "clock", staticmethod(lambda minute=minute: minute * 60.0))
        callback.on_step_end(args, TrainerState(), control)
        optimizer.step()
        scheduler.step()
        assert scheduler.get_last_lr() == [pytest.approx(0.5 * factor)], minute
    assert control.should_training_stop


def test_a_run_with_a_cool_down_ends_its_budget_at_a_learning_rate_near_zero(tmp_path, monkeypatch):
    fake_clock(monkeypatch, seconds_per_reading=2.0)  # ~2 readings a step: the 2-minute budget ends near step 30
    output = tmp_path / "out"
    train([*RUN, "--output_dir", str(output), "--max_steps", "100", "--save_steps", "100", "--logging_steps", "1",
           "--warmup_steps", "2", "--max_train_minutes", "2", "--lr_cooldown_minutes", "1"])  # fmt: skip
    state = json.loads(next(output.glob("checkpoint-*/trainer_state.json")).read_text())
    rates = [entry["learning_rate"] for entry in state["log_history"] if "learning_rate" in entry]
    assert 10 < state["global_step"] < 100
    peak = max(rates)
    assert rates[-1] < 0.1 * peak  # cooled to (nearly) nothing as the time ran out
    assert all(rates[i + 1] <= rates[i] for i in range(len(rates) // 2, len(rates) - 1))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lr_cooldown_minutes", "5"], "--lr_cooldown_minutes 5: must be 0 \\(off\\), or above 0 and at most"),
        (["--max_train_minutes", "3", "--lr_cooldown_minutes", "4"], "at most --max_train_minutes \\(3"),
        (["--max_train_minutes", "3", "--lr_cooldown_minutes", "1", "--lr_scheduler_type", "reduce_lr_on_plateau",
          "--eval_strategy", "steps", "--eval_steps", "2"], "--lr_cooldown_minutes 1 with --lr_scheduler_type reduce"),
    ],
)  # fmt: skip
def test_a_cool_down_without_a_budget_to_end_is_refused_before_anything_is_written(tmp_path, flags, message):
    with pytest.raises(SystemExit, match=message):
        train([*RUN, "--output_dir", str(tmp_path / "out"), *flags])
    assert not (tmp_path / "out").exists()
