"""Guided-alignment training (`--guided_alignment FILE`): word links become subword links and a (B, T, S) matrix, the
loss is a hand computation's, the taught head's attention is the model's own, and a model trained with it aligns a
hand-aligned set (the toy corpus's, by construction) far better than its untaught heads; bad files and settings are
refused in one line before anything is written."""

import json
import math

import pytest
import torch
from transformers import AutoTokenizer

from hf_attention import HfAttentionConfig, HfAttentionForConditionalGeneration
from hf_attention.data.alignments import GuidedAlignmentCollator, subword_links
from hf_attention.data.toy import toy_aligned_corpus
from hf_attention.inference.alignment import align, alignment_error_rate
from hf_attention.training.guided_alignment import (
    capture_cross_attention_inputs,
    guided_alignment_loss,
    head_log_attention,
)
from hf_attention.training.job import main


def test_word_links_become_links_between_every_subword_of_the_two_words():
    source_words = [0, 1, 1, 2, None]  # "a bb+bb c </s>"
    target_words = [0, 0, 1, None]  # "x+x y </s>"
    assert subword_links("1-0 2-1", source_words, target_words) == [0, 1, 0, 2, 1, 1, 1, 2, 2, 3]
    assert subword_links("", source_words, target_words) == []
    with pytest.raises(ValueError, match="'1:0' is not a link"):
        subword_links("1:0", source_words, target_words)


def test_the_collator_marks_each_link_in_the_padded_batch():
    def inner(features):
        longest = max(len(f["input_ids"]) for f in features)
        return {"input_ids": torch.zeros(len(features), longest), "labels": torch.zeros(len(features), 3)}

    batch = GuidedAlignmentCollator(inner)([{"input_ids": [5, 6, 2], "alignment": [0, 1, 1, 0]},
                                            {"input_ids": [5, 2], "alignment": []}])  # fmt: skip
    expected = torch.zeros(2, 3, 3)
    expected[0, 0, 1] = expected[0, 1, 0] = 1.0
    assert torch.equal(batch["alignment_targets"], expected)


def test_the_loss_is_the_cross_entropy_from_the_links_to_the_attention():
    attention = torch.tensor([[[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4]]])
    targets = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0], [0.0, 0.0, 0.0]]])  # the last row has no links
    expected = (-math.log(0.7) + -(0.5 * math.log(0.1) + 0.5 * math.log(0.8))) / 2
    assert guided_alignment_loss(attention.log(), targets).item() == pytest.approx(expected)
    assert guided_alignment_loss(attention.log(), torch.zeros_like(targets)).item() == 0.0


def test_the_taught_head_s_attention_is_the_one_the_model_computes():
    torch.manual_seed(0)
    model = HfAttentionForConditionalGeneration(HfAttentionConfig.from_preset("tiny", vocab_size=50)).eval()
    model.set_attn_implementation("eager")
    source = torch.tensor([[5, 6, 7, 2], [8, 9, 2, 0]])
    mask = (source != 0).long()
    labels = torch.tensor([[10, 11, 2], [12, 2, -100]])
    with capture_cross_attention_inputs(model, 1) as captured, torch.no_grad():
        output = model(input_ids=source, attention_mask=mask, labels=labels, output_attentions=True)
    for head in range(model.config.decoder_attention_heads):
        mine = head_log_attention(model.get_decoder().layers[1].encoder_attn, captured["hidden_states"],
                                  captured["key_value_states"], mask, head).exp()  # fmt: skip
        theirs = output.cross_attentions[1][:, head]
        torch.testing.assert_close(mine * mask[:, None], theirs * mask[:, None], rtol=1e-5, atol=1e-6)


def write_toy_run(folder, pairs: int = 4000):
    folder.mkdir(parents=True, exist_ok=True)
    train = toy_aligned_corpus(pairs, 0)
    for name, rows in (("train", train), ("val", toy_aligned_corpus(10, 1))):
        (folder / f"{name}.jsonl").write_text(
            "".join(json.dumps({"translation": {"en": en, "de": de}}) + "\n" for en, de, _ in rows)
        )
    (folder / "train.align").write_text("".join(" ".join(f"{i}-{j}" for i, j in links) + "\n" for *_, links in train))
    return ["--train_file", str(folder / "train.jsonl"), "--validation_file", str(folder / "val.jsonl"),
            "--vocab_size", "300", "--per_device_train_batch_size", "32", "--warmup_steps", "150",
            "--learning_rate_scale", "2", "--generation_max_length", "32", "--seed", "0", "--save_strategy", "no",
            "--eval_strategy", "no", "--test_before_training", "false"]  # fmt: skip


def test_a_model_trained_with_guided_alignment_aligns_a_hand_aligned_set(tmp_path):
    arguments = write_toy_run(tmp_path / "data")
    output = tmp_path / "run"
    main([*arguments, "--output_dir", str(output), "--max_steps", "250", "--guided_alignment",
          str(tmp_path / "data" / "train.align"), "--guided_alignment_weight", "0.5"])  # fmt: skip
    model = HfAttentionForConditionalGeneration.from_pretrained(output)
    tokenizer = AutoTokenizer.from_pretrained(output)
    assert (model.generation_config.alignment_layer, model.generation_config.alignment_head) == (0, 0)
    held_out = toy_aligned_corpus(100, 99)  # pairs the model never saw, with their word links
    sources, targets, gold = zip(*held_out, strict=True)
    taught = alignment_error_rate(align(model, tokenizer, sources, targets), gold)  # the taught head, by default
    untaught = [alignment_error_rate(align(model, tokenizer, sources, targets, layer=0, head=head), gold)
                for head in (1, 2, 3)]  # fmt: skip
    print(f"alignment error rate on 100 hand-aligned toy pairs: taught head {taught:.3f}, untaught heads "
          f"{', '.join(f'{rate:.3f}' for rate in untaught)}")  # fmt: skip
    assert taught < 0.25 and taught < min(untaught) - 0.3


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda f: f.write_text("0-0\n"), "--guided_alignment {file}: 1 lines for 40 training pairs"),
        (lambda f: f.write_text("0-0\n" * 39 + "0:0\n"), "line 40: '0:0' is not a link i-j"),
        (None, "--guided_alignment_layer 5: the decoder has layers 0 to 1"),
    ],
    ids=["count", "malformed", "layer"],
)
def test_bad_alignment_files_and_settings_are_refused_before_anything_is_written(tmp_path, change, message):
    arguments = write_toy_run(tmp_path / "data", pairs=40)
    file = tmp_path / "data" / "train.align"
    extra = ["--guided_alignment_layer", "5"] if change is None else []
    if change is not None:
        change(file)
    output = tmp_path / "run"
    with pytest.raises(SystemExit) as stopped:
        main([*arguments, "--output_dir", str(output), "--max_steps", "1", "--guided_alignment", str(file), *extra])
    assert message.format(file=file) in str(stopped.value) and not output.exists()
    with pytest.raises(SystemExit) as stopped:
        main(["--toy_corpus", "--output_dir", str(output), "--guided_alignment", str(file)])
    assert "--toy_corpus does not hold in a file" in str(stopped.value) and not output.exists()
