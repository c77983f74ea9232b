"""R-Drop and the moving average of the weights (issue 27): each loss and update against a hand computation, and the
training job's checkpoints, final model, averaging and resume with them."""

import copy
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from torch.nn import functional
from transformers import AutoTokenizer, DataCollatorForSeq2Seq

from hf_attention import HfAttentionForConditionalGeneration
from hf_attention.data import tokenize_pairs, toy_translation_dataset
from hf_attention.data.subword_regularization import SOURCE_TEXT, TARGET_TEXT, BpeDropoutCollator
from hf_attention.training.arguments import PaperTrainingArguments, parse_arguments
from hf_attention.training.job import main, run
from hf_attention.training.regularization import EMA_WEIGHTS_NAME, WeightMovingAverage, doubled
from hf_attention.training.trainer import CheckpointSafeSeq2SeqTrainer

from .helpers import padded_batch, toy_tokenizer
from .test_train import QUICK


def batch(model) -> dict:
    """Three pairs, padded, with the labels and decoder inputs a data collator gives."""
    source, target = padded_batch([6, 4, 5], max_length=6, seed=1), padded_batch([4, 5, 2], max_length=5, seed=2)
    labels = target["input_ids"].masked_fill(target["attention_mask"].eq(0), -100)
    return {**source, "labels": labels, "decoder_input_ids": model.prepare_decoder_input_ids_from_labels(labels)}


def with_dropout(config, dropout: float):
    config = copy.deepcopy(config)
    config.dropout = dropout
    return config


def trainer_for(model, tmp_path, **options) -> CheckpointSafeSeq2SeqTrainer:
    return CheckpointSafeSeq2SeqTrainer(model=model, args=PaperTrainingArguments(output_dir=str(tmp_path), **options))


@pytest.mark.parametrize("num_items_in_batch", [None, torch.tensor(20)])
def test_r_drop_loss_is_the_two_passes_mean_loss_plus_alpha_times_their_symmetric_kl(
    tiny_config, tmp_path, num_items_in_batch
):
    model = HfAttentionForConditionalGeneration(with_dropout(tiny_config, 0.3)).train()
    inputs = batch(model)
    trainer = trainer_for(model, tmp_path, r_drop_alpha=5.0, label_smoothing_factor=0.1)
    torch.manual_seed(7)
    loss = trainer.compute_loss(model, dict(inputs), num_items_in_batch=num_items_in_batch)

    # By hand: the same dropout masks (one pass over the doubled batch, the same seed), PyTorch's own formulas.
    labels = inputs["labels"]
    torch.manual_seed(7)
    logits = model(**doubled({k: v for k, v in inputs.items() if k != "labels"})).logits
    first, second = logits[:3][labels.ne(-100)], logits[3:][labels.ne(-100)]
    targets = labels[labels.ne(-100)]
    tokens = targets.numel() if num_items_in_batch is None else num_items_in_batch.item()
    cross_entropy = sum(functional.cross_entropy(half, targets, label_smoothing=0.1, reduction="sum")
                        for half in (first, second)) / (2 * tokens)  # fmt: skip
    log_p, log_q = functional.log_softmax(first, -1), functional.log_softmax(second, -1)
    kl = functional.kl_div(log_q, log_p, log_target=True, reduction="sum")  # KL(P‖Q)
    kl_back = functional.kl_div(log_p, log_q, log_target=True, reduction="sum")  # KL(Q‖P)
    expected = cross_entropy + 5.0 * 0.5 * (kl + kl_back) / tokens
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert (kl + kl_back).item() > 1e-3  # the passes differed: the KL term was really there

    # Without dropout the passes agree: R-Drop's loss is the plain loss; in evaluation R-Drop is off.
    quiet = HfAttentionForConditionalGeneration(tiny_config).train()
    plain = trainer_for(quiet, tmp_path).compute_loss(quiet, batch(quiet), num_items_in_batch=num_items_in_batch)
    r_drop = trainer_for(quiet, tmp_path, r_drop_alpha=5.0)
    torch.testing.assert_close(r_drop.compute_loss(quiet, batch(quiet), num_items_in_batch=num_items_in_batch), plain)
    model.eval()
    torch.testing.assert_close(trainer.compute_loss(model, batch(model)), trainer_for(model, tmp_path).compute_loss(
        model, batch(model)))  # fmt: skip


def averaged_then_moved(tiny_config, decay: float):
    """A model, its moving average started from its weights θ0, and θ0 itself; the model's weights then move to
    θ1 = θ0 + 1."""
    model = HfAttentionForConditionalGeneration(tiny_config)
    start = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    average = WeightMovingAverage(model, decay=decay)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
    return model, average, start


def test_the_moving_average_follows_its_formula_and_saves_as_the_model_does(tiny_config, tmp_path):
    model, average, start = averaged_then_moved(tiny_config, decay=0.9)
    average.update(model)
    average.update(model)  # θ1 twice: 0.81·θ0 + 0.19·θ1
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(average.averages[name], 0.81 * start[name] + 0.19 * parameter.detach())
    average.save(model, tmp_path / EMA_WEIGHTS_NAME)
    saved = load_file(tmp_path / EMA_WEIGHTS_NAME)
    fresh = HfAttentionForConditionalGeneration(tiny_config)
    fresh.load_state_dict(saved, strict=False)
    fresh.tie_weights()
    for name, parameter in fresh.named_parameters():  # a model loaded from it holds the averages, tied ones too
        torch.testing.assert_close(parameter, average.averages[name])
    again = WeightMovingAverage(HfAttentionForConditionalGeneration(tiny_config), decay=0.9)
    again.load(tmp_path / EMA_WEIGHTS_NAME)
    assert all(torch.equal(again.averages[name], value) for name, value in average.averages.items())
    with pytest.raises(ValueError, match="--ema_decay 1.0: must lie strictly between 0 and 1"):
        WeightMovingAverage(model, decay=1.0)


def test_the_moving_average_s_decay_warms_up_with_the_step_so_the_initial_weights_fade(tiny_config):
    model, average, start = averaged_then_moved(tiny_config, decay=0.999)
    average.update(model, step=1)  # d_1 = 2/11
    average.update(model, step=2)  # d_2 = 3/12
    kept = 2 / 11 * 3 / 12  # what is left of θ0
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(average.averages[name], kept * start[name] + (1 - kept) * parameter.detach())
    average.update(model, step=100_000)  # long after the warm-up: the decay asked for
    for name, parameter in model.named_parameters():
        expected = 0.999 * kept * start[name] + (1 - 0.999 * kept) * parameter.detach()
        torch.testing.assert_close(average.averages[name], expected)


EMA_RUN = [*QUICK, "--max_steps", "6", "--save_steps", "2", "--toy_eval_size", "4", "--ema_decay", "0.9",
           "--r_drop_alpha", "1", "--config_overrides", "dropout=0.1", "--test_before_training", "false"]  # fmt: skip


def test_the_final_model_is_the_moving_average_averaged_over_checkpoints_and_a_resume_continues_it(tmp_path):
    """Each checkpoint holds the moving average; with --average_last_n_checkpoints 2 the final model is the mean
    of the last two checkpoints' averages; a run resumed from checkpoint-4 continues the average exactly."""
    whole = tmp_path / "whole"
    run(*parse_arguments([*EMA_RUN, "--average_last_n_checkpoints", "2", "--output_dir", str(whole)]))
    averages = [load_file(whole / f"checkpoint-{step}" / EMA_WEIGHTS_NAME) for step in (4, 6)]
    final = load_file(whole / "model.safetensors")
    for name, tensor in final.items():
        torch.testing.assert_close(tensor, (averages[0][name] + averages[1][name]) / 2, rtol=1e-6, atol=1e-7)
    last = load_file(whole / "checkpoint-6" / "model.safetensors")
    assert not torch.equal(last["model.shared.weight"], averages[1]["model.shared.weight"])  # an average, not θ

    resumed = tmp_path / "resumed"
    shutil.copytree(whole, resumed)
    shutil.rmtree(resumed / "checkpoint-6")
    run(*parse_arguments([*EMA_RUN, "--average_last_n_checkpoints", "2", "--output_dir", str(resumed),
                          "--resume_from_checkpoint", str(resumed / "checkpoint-4")]))  # fmt: skip
    continued = load_file(resumed / "checkpoint-6" / EMA_WEIGHTS_NAME)
    for name, tensor in averages[1].items():
        torch.testing.assert_close(continued[name], tensor, rtol=1e-5, atol=1e-6)


def test_without_averaging_the_final_model_is_the_last_moving_average_or_the_weights_when_asked(tmp_path):
    run(*parse_arguments([*EMA_RUN, "--output_dir", str(tmp_path / "ema")]))
    final, average = load_file(tmp_path / "ema" / "model.safetensors"), load_file(
        tmp_path / "ema" / "checkpoint-6" / EMA_WEIGHTS_NAME)  # fmt: skip
    assert final.keys() == average.keys() and all(torch.equal(final[name], average[name]) for name in final)
    run(*parse_arguments([*EMA_RUN, "--ema_final_model", "false", "--output_dir", str(tmp_path / "last")]))
    last = tmp_path / "last"
    final, weights = load_file(last / "model.safetensors"), load_file(last / "checkpoint-6" / "model.safetensors")
    assert all(torch.equal(final[name], weights[name]) for name in final)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--r_drop_alpha", "-1"], "--r_drop_alpha -1.0: must be 0 \\(off\\) or more"),
        (["--ema_decay", "1"], "--ema_decay 1.0: must be 0 \\(off\\), or above 0 and below 1"),
        (["--bpe_dropout", "1"], "--bpe_dropout 1.0: must be 0 \\(off\\), or above 0 and below 1"),
        (["--bpe_dropout", "0.1", "--pad_to_max_length"], "--bpe_dropout 0.1 with --pad_to_max_length"),
        (["--bpe_dropout", "0.1", "--guided_alignment", "links.txt"], "--bpe_dropout 0.1 with --guided_alignment"),
        (["--bpe_dropout", "0.1", "--tokenizer_model", "unigram"], "--bpe_dropout 0.1: the tokenizer is Unigram, not"),
    ],
)
def test_bad_regularisation_flags_stop_the_run_before_anything_is_written(tmp_path, flags, message):
    with pytest.raises(SystemExit, match=message):
        main([*QUICK, *flags, "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def toy_rows(tokenizer, pairs: int = 40, **options):
    corpus = toy_translation_dataset(pairs)
    return tokenize_pairs(corpus, tokenizer, "en", "de", max_length=64, keep_text=True, **options)[0]


def test_bpe_dropout_segments_each_batch_anew_into_the_same_text_and_leaves_the_tokenizer_alone():
    tokenizer = toy_tokenizer()
    rows = list(toy_rows(tokenizer))
    padding = DataCollatorForSeq2Seq(tokenizer)
    collate = BpeDropoutCollator(padding, tokenizer, 0.5, 64, 64)
    torch.manual_seed(0)
    first, second = collate(rows), collate(rows)
    for batch in (first, second):
        for side, text in (("input_ids", SOURCE_TEXT), ("labels", TARGET_TEXT)):
            ids = [[i for i in row if i not in (-100, tokenizer.pad_token_id)] for row in batch[side].tolist()]
            assert tokenizer.batch_decode(ids, skip_special_tokens=True) == [row[text] for row in rows]
            assert all(row[-1] == tokenizer.eos_token_id for row in ids)
        assert batch["attention_mask"].sum() == batch["input_ids"].ne(tokenizer.pad_token_id).sum()
    usual = sum(len(row["input_ids"]) for row in rows)
    assert first["attention_mask"].sum() > usual  # merges skipped: more, shorter subwords
    assert not torch.equal(first["input_ids"], second["input_ids"])  # drawn anew for each batch
    assert tokenizer(rows[0][SOURCE_TEXT])["input_ids"] == rows[0]["input_ids"]  # the run's tokenizer unchanged
    without_text = [{k: v for k, v in row.items() if k not in (SOURCE_TEXT, TARGET_TEXT)} for row in rows]
    assert all(torch.equal(collate(without_text)[k], padding(without_text)[k]) for k in first)  # validation rows
    unchanged = BpeDropoutCollator(padding, tokenizer, 0.0, 64, 64)(rows)  # no merge skipped: the usual batch
    assert all(torch.equal(unchanged[k], padding(without_text)[k]) for k in first)


def test_bpe_dropout_cuts_a_resegmented_pair_to_the_maximum_lengths_keeping_its_end():
    tokenizer = toy_tokenizer()
    rows = list(toy_rows(tokenizer))
    batch = BpeDropoutCollator(DataCollatorForSeq2Seq(tokenizer), tokenizer, 0.9, 6, 5)(rows)
    assert batch["input_ids"].shape[1] == 6 and batch["labels"].shape[1] == 5
    assert all(tokenizer.eos_token_id in row for row in batch["input_ids"].tolist())
    assert all(row[-1] == tokenizer.eos_token_id for row in batch["labels"].tolist())


def test_the_training_job_with_bpe_dropout_trains_on_resegmented_pairs_and_saves_the_usual_tokenizer(
    tmp_path, recorded_batches
):
    run(*parse_arguments([*QUICK, "--max_steps", "3", "--toy_eval_size", "4", "--bpe_dropout", "0.3",
                          "--test_before_training", "false", "--output_dir", str(tmp_path / "run")]))  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "run")
    assert json.loads((tmp_path / "run" / "tokenizer.json").read_text())["model"]["dropout"] is None
    rows = [[i for i in row if i != tokenizer.pad_token_id] for batch in recorded_batches[:3] for row in batch]
    texts = tokenizer.batch_decode(rows, skip_special_tokens=True)
    resegmented = [row != tokenizer(text)["input_ids"] for row, text in zip(rows, texts, strict=True)]
    assert len(rows) == 96 and sum(resegmented) > 48, sum(resegmented)  # most pairs split otherwise than usual
