"""Lexically constrained beam search (`constraints_hf_attention.py`, `generate(constraints=...)`,
`translate.py --constraints`): without constraints it is transformers' beam search; with them every hypothesis
contains each required phrase and no avoided one, on cases where plain beam search does the opposite, with a beam
that does not grow; bad constraints are refused in one line before anything is written."""

import json

import pytest
import torch
from transformers import AutoTokenizer, LogitsProcessor, LogitsProcessorList

from hf_attention import EnsembleForConditionalGeneration, HfAttentionConfig, HfAttentionForConditionalGeneration
from hf_attention.constraints_hf_attention import LexicalConstraints, constrained_beam_search
from hf_attention.inference.translate import main

from .helpers import save_toy_translation_model

SOURCE = torch.tensor([[5, 6, 7, 8, 2], [9, 10, 11, 2, 0], [12, 13, 14, 15, 2]])
MASK = (SOURCE != 0).long()
EOS = 2


class EndSooner(LogitsProcessor):
    """Makes the end token likelier with every step, differently per hypothesis, so that beams finish at different
    lengths (an untrained model rarely ends on its own)."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.clone()
        scores[:, EOS] += 0.9 * (input_ids.shape[1] - 1) + (input_ids[:, -1] % 3).float()
        return scores


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return HfAttentionForConditionalGeneration(HfAttentionConfig.from_preset("tiny", vocab_size=60)).eval()


def ended(sequence: list[int]) -> list[int]:
    """The sequence up to its end token (the batch pads the rest)."""
    return sequence[: sequence.index(EOS) + 1] if EOS in sequence else sequence


def contains(sequence: list[int], phrase: tuple[int, ...]) -> bool:
    return any(tuple(sequence[i : i + len(phrase)]) == phrase for i in range(len(sequence) - len(phrase) + 1))


@pytest.mark.parametrize(
    "num_beams, num_return, length_penalty, style",
    [(3, 1, 1.0, "transformers"), (4, 3, 0.6, "transformers"), (4, 2, 0.0, "transformers"), (4, 2, 0.6, "gnmt")],
)
def test_without_constraints_it_is_transformers_beam_search(model, num_beams, num_return, length_penalty, style):
    options = dict(attention_mask=MASK, num_beams=num_beams, num_return_sequences=num_return, max_new_tokens=12,
                   length_penalty=length_penalty, length_penalty_style=style, return_dict_in_generate=True,
                   output_scores=True)  # fmt: skip
    plain = model.generate(SOURCE, logits_processor=LogitsProcessorList([EndSooner()]), **options)
    ours = model.generate(SOURCE, logits_processor=LogitsProcessorList([EndSooner()]),
                          custom_generate=constrained_beam_search, constraints=[None] * 3, **options)  # fmt: skip
    assert (plain.sequences == EOS).any(dim=1).all()  # the case covers hypotheses that end, at several lengths
    assert torch.equal(plain.sequences, ours.sequences)
    torch.testing.assert_close(plain.sequences_scores, ours.sequences_scores)


def test_every_hypothesis_meets_its_constraints_where_plain_search_does_not(model):
    options = dict(attention_mask=MASK, num_beams=4, num_return_sequences=2, max_new_tokens=12)
    plain = model.generate(SOURCE, logits_processor=LogitsProcessorList([EndSooner()]), **options).tolist()
    include = [(40, 41), (33,)]
    avoid = (plain[0][1],)  # the token plain search chose first for sentence 0
    for phrase in include:
        assert not any(contains(row, phrase) for row in plain[:2])
    assert any(contains(row, avoid) for row in plain[:2])
    constraints = [LexicalConstraints.from_token_ids(include=include, avoid=[avoid]), None,
                   LexicalConstraints.from_token_ids(include=[(20, 21, 22)])]  # fmt: skip
    forward_rows = []
    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: forward_rows.append(kwargs["decoder_input_ids"].shape[0]), with_kwargs=True
    )
    try:
        found = model.generate(SOURCE, logits_processor=LogitsProcessorList([EndSooner()]), constraints=constraints,
                               **options).tolist()  # fmt: skip
    finally:
        hook.remove()
    assert set(forward_rows) == {3 * 4}  # the beam does not grow with the constraints
    for row in found[:2]:
        assert all(contains(row, phrase) for phrase in include) and not contains(row, avoid)
        assert EOS in row  # met in time to end
    assert list(map(ended, found[2:4])) == list(map(ended, plain[2:4]))  # an unconstrained source: as plain search
    assert all(contains(row, (20, 21, 22)) for row in found[4:6])


def test_the_scores_are_the_log_probabilities_of_the_constrained_hypotheses(model):
    constraints = [LexicalConstraints.from_token_ids(include=[(40, 41)])] * 3
    output = model.generate(SOURCE, attention_mask=MASK, num_beams=3, max_new_tokens=6, length_penalty=1.0,
                            constraints=constraints, return_dict_in_generate=True)  # fmt: skip
    with torch.no_grad():
        for row, (sequence, found) in enumerate(zip(output.sequences, output.sequences_scores, strict=True)):
            labels = sequence[1:][None]
            logits = model(input_ids=SOURCE[row : row + 1], attention_mask=MASK[row : row + 1], labels=labels).logits
            total = logits.log_softmax(-1).gather(-1, labels[..., None]).sum().item()
            assert found.item() == pytest.approx(total / labels.shape[1], abs=1e-4)


def test_an_ensemble_meets_constraints_too(model):
    torch.manual_seed(1)
    other = HfAttentionForConditionalGeneration(model.config).eval()
    ensemble = EnsembleForConditionalGeneration([model, other]).eval()
    constraints = [LexicalConstraints.from_token_ids(include=[(44, 45)])] * 3
    found = ensemble.generate(SOURCE, attention_mask=MASK, num_beams=3, max_new_tokens=8, constraints=constraints)
    assert all(contains(row, (44, 45)) for row in found.tolist())


def test_constraints_the_search_cannot_take_are_refused(model):
    with pytest.raises(ValueError, match="constraints: 1 entries for 3 sources"):
        model.generate(SOURCE, num_beams=2, max_new_tokens=5, constraints=[None])
    with pytest.raises(ValueError, match=r"constraints\[0\]: 6 constraint tokens, more than the 5 new tokens"):
        model.generate(SOURCE, num_beams=2, max_new_tokens=5,
                       constraints=[LexicalConstraints.from_token_ids(include=[(7,) * 6])] * 3)  # fmt: skip
    with pytest.raises(ValueError, match=r"constraints: include\[0\] is empty"):
        LexicalConstraints.from_token_ids(include=[()])
    with pytest.raises(ValueError, match="leave do_sample out"):
        model.generate(SOURCE, do_sample=True, max_new_tokens=5, constraints=[None] * 3)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_toy_translation_model(tmp_path_factory.mktemp("model"))


def test_the_command_line_meets_each_line_s_constraints(tmp_path, model_dir):
    sentences = ["we buy two dogs", "i see cats", "you count three hundred"]
    source = tmp_path / "source.txt"
    source.write_text("\n".join(sentences) + "\n", encoding="utf-8")
    plain, constrained = tmp_path / "plain.txt", tmp_path / "constrained.txt"
    common = ["--model", str(model_dir), "--input", str(source), "--num_beams", "3", "--max_new_tokens", "12",
              "--quantization", "none"]  # fmt: skip
    main([*common, "--output", str(plain)])
    file = tmp_path / "constraints.jsonl"
    lines = [{"constraints": ["hunde kaufen"]}, {}, {"text": sentences[2], "constraints": ["drei"], "avoid": ["z"]}]
    file.write_text("\n".join(json.dumps(line) for line in lines) + "\n", encoding="utf-8")
    main([*common, "--output", str(constrained), "--constraints", str(file)])
    before = plain.read_text(encoding="utf-8").splitlines()
    after = constrained.read_text(encoding="utf-8").splitlines()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert "hunde kaufen" not in before[0] and "hunde kaufen" in after[0]
    assert after[1] == before[1]
    assert "drei" in after[2] and "z" not in tokenizer.tokenize(after[2])


@pytest.mark.parametrize(
    "lines, extra, message",
    [
        (['{"constraints": ["a"]}'], [], "--constraints {file}: 1 lines for 2 in --input"),
        (["{nope", "{}"], [], "line 1 is not JSON"),
        (['{"constraint": ["a"]}', ""], [], "(unknown keys: constraint)"),
        (['{"constraints": "a"}', ""], [], 'line 1 must be an object whose "constraints"'),
        (['{"constraints": ["hunde kaufen zwei hunde"]}', ""], ["--max_new_tokens", "3"], "line 1 has"),
        (["{}", "{}"], ["--engine", "ctranslate2", "--quantization", "int8"], "not with ctranslate2"),
        (["{}", "{}"], ["--do_sample", "true"], "not with sampling"),
    ],
    ids=["count", "json", "key", "type", "too-long", "engine", "sampling"],
)
def test_bad_constraints_are_refused_before_anything_is_written(tmp_path, model_dir, lines, extra, message):
    source = tmp_path / "source.txt"
    source.write_text("we buy two dogs\ni see cats\n", encoding="utf-8")
    file = tmp_path / "constraints.jsonl"
    file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    output = tmp_path / "out.txt"
    with pytest.raises(SystemExit) as stopped:
        main(["--model", str(model_dir), "--input", str(source), "--output", str(output), "--constraints", str(file),
              *extra])  # fmt: skip
    assert message.format(file=file) in str(stopped.value) and not output.exists()
