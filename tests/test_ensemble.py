"""Ensembles (`EnsembleForConditionalGeneration`, `translate.py --model A --model B`): an ensemble of one decodes as
its model does, an ensemble of two as a hand computation of the members' averaged log-probabilities, and members that
cannot decode as one are refused with the reason."""

import shutil

import pytest
import torch
from transformers import AutoTokenizer

from hf_attention import (
    EnsembleForConditionalGeneration,
    HfAttentionConfig,
    HfAttentionForConditionalGeneration,
    score,
)
from hf_attention.inference.translate import main

from .helpers import save_perturbed_copy, save_toy_translation_model, toy_tokenizer

SOURCE = torch.tensor([[5, 6, 7, 8, 2], [9, 10, 11, 2, 0]])
MASK = (SOURCE != 0).long()


def tiny_model(seed: int, **overrides) -> HfAttentionForConditionalGeneration:
    torch.manual_seed(seed)
    config = HfAttentionConfig.from_preset("tiny", vocab_size=overrides.pop("vocab_size", 60), **overrides)
    return HfAttentionForConditionalGeneration(config).eval()


def hand_log_probs(models, prefix: torch.Tensor, combination: str = "log_linear") -> torch.Tensor:
    """The ensemble's next-token log-probabilities after `prefix` (B, T), from full forward passes of each member."""
    with torch.no_grad():
        member = torch.stack(
            [
                m(input_ids=SOURCE, attention_mask=MASK, decoder_input_ids=prefix).logits[:, -1].log_softmax(-1)
                for m in models
            ]  # fmt: skip
        )
    if combination == "linear":
        return (member.exp().mean(0)).log()
    return member.mean(0).log_softmax(-1)


@pytest.mark.parametrize(
    "options",
    [{"num_beams": 1}, {"num_beams": 3, "num_return_sequences": 2}, {"do_sample": True, "top_k": 5}],
    ids=["greedy", "beam", "sampling"],
)
def test_an_ensemble_of_one_decodes_as_its_model(options):
    model = tiny_model(0)
    ensemble = EnsembleForConditionalGeneration([model]).eval()
    outputs = []
    for decoder in (model, ensemble):
        torch.manual_seed(1)
        outputs.append(decoder.generate(SOURCE, attention_mask=MASK, max_new_tokens=8, return_dict_in_generate=True,
                                        output_scores=True, **options))  # fmt: skip
    alone, together = outputs
    assert torch.equal(alone.sequences, together.sequences)
    if options.get("num_beams", 1) > 1:
        torch.testing.assert_close(alone.sequences_scores, together.sequences_scores)
    else:  # greedy and sampling: each step's scores are the model's logits shifted by a constant, as processed
        for mine, theirs in zip(alone.scores, together.scores, strict=True):
            assert torch.equal(mine.isfinite(), theirs.isfinite())
            torch.testing.assert_close(mine.log_softmax(-1), theirs.log_softmax(-1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("combination", ["log_linear", "linear"])
def test_greedy_search_of_two_follows_the_hand_averaged_log_probabilities(combination):
    models = [tiny_model(0), tiny_model(1)]
    ensemble = EnsembleForConditionalGeneration(models, combination=combination).eval()
    output = ensemble.generate(SOURCE, attention_mask=MASK, max_new_tokens=6, min_new_tokens=6, num_beams=1,
                               return_dict_in_generate=True, output_scores=True)  # fmt: skip
    prefix = torch.full((2, 1), models[0].config.decoder_start_token_id)
    for step, scores in enumerate(output.scores):
        expected = hand_log_probs(models, prefix, combination)
        expected[:, models[0].config.eos_token_id] = -float("inf")  # min_new_tokens holds the end back
        expected = expected.log_softmax(-1)
        torch.testing.assert_close(scores.log_softmax(-1), expected, rtol=1e-4, atol=1e-4)
        chosen = output.sequences[:, step + 1]
        assert torch.equal(chosen, expected.argmax(-1))
        prefix = torch.cat([prefix, chosen[:, None]], dim=1)


def test_beam_search_of_two_scores_its_hypotheses_by_the_hand_averaged_log_probabilities():
    models = [tiny_model(0), tiny_model(1)]
    ensemble = EnsembleForConditionalGeneration(models).eval()
    output = ensemble.generate(SOURCE, attention_mask=MASK, max_new_tokens=6, num_beams=3, num_return_sequences=3,
                               length_penalty=1.0, return_dict_in_generate=True, output_scores=True)  # fmt: skip
    eos = models[0].config.eos_token_id
    for row, (sequence, found) in enumerate(zip(output.sequences, output.sequences_scores, strict=True)):
        source_row = row // 3
        tokens = sequence.tolist()
        length = tokens.index(eos) + 1 if eos in tokens else len(tokens)  # no end: stopped at max_new_tokens
        total = 0.0
        for position in range(1, length):
            log_probs = hand_log_probs(models, sequence[None, :position].expand(2, -1))[source_row]
            total += log_probs[tokens[position]].item()
        assert found.item() == pytest.approx(total / (length - 1), abs=1e-4)


def test_scoring_with_an_ensemble_sums_its_averaged_log_probabilities(tmp_path):
    first = save_toy_translation_model(tmp_path / "a")
    second = save_perturbed_copy(first, tmp_path / "b", scale=0.05)
    models = [HfAttentionForConditionalGeneration.from_pretrained(f).eval() for f in (first, second)]
    tokenizer = AutoTokenizer.from_pretrained(first)
    ensemble = EnsembleForConditionalGeneration(models).eval()
    (found,) = score(ensemble, tokenizer, ["we buy two dogs"], ["wir kaufen"])
    batch = tokenizer(["we buy two dogs"], return_tensors="pt")
    labels = tokenizer(text_target=["wir kaufen"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        member = torch.stack([m(**batch, labels=labels).logits.log_softmax(-1) for m in models])
    expected = member.mean(0).log_softmax(-1).gather(-1, labels[..., None]).sum().item()
    assert found.total == pytest.approx(expected, abs=1e-4)


def test_the_command_line_decodes_with_the_python_ensemble(tmp_path):
    first = save_toy_translation_model(tmp_path / "a")
    second = save_perturbed_copy(first, tmp_path / "b", scale=0.2)
    sources = ["we buy two dogs", "i see cats"]
    source = tmp_path / "source.txt"
    source.write_text("\n".join(sources) + "\n", encoding="utf-8")
    output = tmp_path / "out.txt"
    main(["--model", str(first), "--model", str(second), "--input", str(source), "--output", str(output),
          "--num_beams", "2", "--max_new_tokens", "10", "--quantization", "none", "--batch_size", "1"])  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(first)
    members = [HfAttentionForConditionalGeneration.from_pretrained(f).eval() for f in (first, second)]
    ensemble = EnsembleForConditionalGeneration(members).eval()
    expected = []
    for sentence in sources:
        generated = ensemble.generate(**tokenizer([sentence], return_tensors="pt"), num_beams=2, max_new_tokens=10)
        expected.append(tokenizer.decode(generated[0], skip_special_tokens=True).strip())
    assert output.read_text(encoding="utf-8").splitlines() == expected
    alone = tmp_path / "alone.txt"
    main(["--model", str(first), "--input", str(source), "--output", str(alone), "--num_beams", "2",
          "--max_new_tokens", "10", "--quantization", "none", "--batch_size", "1"])  # fmt: skip
    assert alone.read_text(encoding="utf-8") != output.read_text(encoding="utf-8")  # the second member counts


def test_members_that_cannot_decode_as_one_are_refused():
    with pytest.raises(ValueError, match=r"models\[1\]: vocab_size 61 differs"):
        EnsembleForConditionalGeneration([tiny_model(0), tiny_model(1, vocab_size=61)])
    with pytest.raises(ValueError, match=r"models\[1\]: eos_token_id 3 differs"):
        EnsembleForConditionalGeneration([tiny_model(0), tiny_model(1, eos_token_id=3)])
    with pytest.raises(ValueError, match="one positive weight per model"):
        EnsembleForConditionalGeneration([tiny_model(0), tiny_model(1)], weights=[1.0])
    with pytest.raises(ValueError, match="combination 'mean'"):
        EnsembleForConditionalGeneration([tiny_model(0)], combination="mean")
    with pytest.raises(ValueError, match="models: an ensemble needs at least one model"):
        EnsembleForConditionalGeneration([])
    with pytest.raises(ValueError, match="cache_implementation 'static'"):
        EnsembleForConditionalGeneration([tiny_model(0)]).generate(SOURCE, cache_implementation="static")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--engine", "ctranslate2"], "--model: 2 models make an ensemble, which the torch engine decodes"),
        ([], "its tokenizer's vocabulary differs"),
    ],
    ids=["engine", "tokenizer"],
)
def test_ensembles_the_command_line_cannot_decode_are_refused_before_anything_is_written(
    tmp_path, capsys, extra, message
):
    first = save_toy_translation_model(tmp_path / "a")
    second = tmp_path / "b"
    shutil.copytree(first, second)
    if not extra:
        toy_tokenizer(vocab_size=120).save_pretrained(second)
    source = tmp_path / "source.txt"
    source.write_text("we buy two dogs\n", encoding="utf-8")
    output = tmp_path / "out.txt"
    with pytest.raises(SystemExit) as stopped:
        main(["--model", str(first), "--model", str(second), "--input", str(source), "--output", str(output),
              "--quantization", "none" if not extra else "int8", *extra])  # fmt: skip
    assert message in str(stopped.value) and not output.exists()
