"""Word alignments from cross-attention (`hf_attention.inference.alignment`, `translate.py --alignments`): the argmax
rule over a designed attention pattern, subwords merged into words, special tokens left out, the command line's
column, the alignment error rate, and bad layers refused before anything is written."""

import json
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer

from hf_attention import HfAttentionForConditionalGeneration
from hf_attention.inference.alignment import align, alignment_error_rate, format_alignment
from hf_attention.inference.translate import main

from .helpers import require_module, save_toy_translation_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_toy_translation_model(tmp_path_factory.mktemp("model"))


class AttentionPattern(torch.nn.Module):
    """A stand-in model whose every cross-attention layer is one designed pattern: target token t attends to source
    token `looks_at[t]`."""

    def __init__(self, looks_at: list[list[int]], layers: int = 2, heads: int = 2):
        super().__init__()
        self.looks_at = looks_at
        self.config = SimpleNamespace(
            decoder_layers=layers, decoder_attention_heads=heads, _attn_implementation="sdpa"
        )
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.implementations = []

    @property
    def device(self):
        return self.anchor.device

    def set_attn_implementation(self, name):
        self.implementations.append(name)
        self.config._attn_implementation = name

    def forward(self, input_ids, attention_mask, labels, output_attentions):
        assert output_attentions and self.config._attn_implementation == "eager"
        batch, source_length = input_ids.shape
        weights = torch.full((batch, self.config.decoder_attention_heads, labels.shape[1], source_length), 0.01)
        for row, targets in enumerate(self.looks_at):
            for t, s in enumerate(targets):
                weights[row, :, t, s] = 0.9
        return SimpleNamespace(cross_attentions=[weights] * self.config.decoder_layers)


def test_each_target_word_links_to_the_source_words_its_tokens_attend_to_most(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    source, target = "we buy two dogs", "wir kaufen zwei"
    source_tokens = tokenizer.convert_ids_to_tokens(tokenizer(source)["input_ids"])
    target_tokens = tokenizer.convert_ids_to_tokens(tokenizer(text_target=target)["input_ids"])
    assert source_tokens[-1] == target_tokens[-1] == "</s>" and len(source_tokens) > 5  # "dogs" is several tokens
    # target token 0 looks at "we", the others at the last token of "dogs" (source word 3), and the end token at the
    # source's end token (special tokens are never linked)
    looks_at = [[0] + [len(source_tokens) - 2] * (len(target_tokens) - 2) + [len(source_tokens) - 1]]
    stand_in = AttentionPattern(looks_at)
    (found,) = align(stand_in, tokenizer, [source], [target])
    target_words = tokenizer(text_target=target).word_ids()
    expected = {(0, target_words[0])} | {(3, word) for word in target_words[1:-1]}
    assert found == sorted(expected, key=lambda pair: (pair[1], pair[0]))
    assert stand_in.implementations == ["eager", "sdpa"]  # the pass ran eager, and the model was set back


def test_a_real_model_aligns_by_the_argmax_of_its_chosen_layer_s_mean_attention(model_dir):
    model = HfAttentionForConditionalGeneration.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    source, target = "they sell ninety one trees", "sie verkaufen bäume"
    encoded = tokenizer([source], return_tensors="pt")
    labels = tokenizer(text_target=[target], return_tensors="pt")
    model.set_attn_implementation("eager")
    with torch.no_grad():
        attention = model(**encoded, labels=labels["input_ids"], output_attentions=True).cross_attentions
    model.set_attn_implementation("sdpa")
    source_words, target_words = encoded.word_ids(0), labels.word_ids(0)
    for layer, head in ((0, None), (1, None), (1, 3)):
        weights = attention[layer][0].mean(0) if head is None else attention[layer][0, head]
        expected = {(source_words[int(weights[t, :-1].argmax())], word)
                    for t, word in enumerate(target_words) if word is not None}  # fmt: skip
        (found,) = align(model, tokenizer, [source], [target], layer=layer, head=head)
        assert set(found) == expected and len(found) == len(expected)
    assert align(model, tokenizer, [source], [target]) == align(model, tokenizer, [source], [target], layer=0)


def test_the_alignment_error_rate_is_och_and_ney_s():
    assert alignment_error_rate([[(0, 0), (1, 1), (2, 1)]], [[(0, 0), (1, 1)]], [[(2, 1)]]) == 0.0
    assert alignment_error_rate([[(0, 1)]], [[(0, 0)]]) == 1.0
    assert alignment_error_rate([[(0, 0), (0, 1)]], [[(0, 0), (1, 1)]]) == pytest.approx(1 - 2 / 4)
    assert format_alignment([(0, 0), (2, 1)]) == "0-0 2-1"


def test_the_command_line_writes_each_hypothesis_s_alignment(tmp_path, model_dir):
    source = tmp_path / "source.txt"
    sentences = ["we buy two dogs", "i see cats"]
    source.write_text("\n".join(sentences) + "\n", encoding="utf-8")
    text, jsonl = tmp_path / "out.tsv", tmp_path / "out.jsonl"
    common = ["--model", str(model_dir), "--input", str(source), "--num_beams", "2", "--max_new_tokens", "8",
              "--quantization", "none", "--alignments", "true", "--alignment_layer", "1"]  # fmt: skip
    main([*common, "--output", str(text), "--n_best", "2"])
    main([*common, "--output", str(jsonl), "--output_format", "jsonl"])
    model = HfAttentionForConditionalGeneration.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = [line.split("\t") for line in text.read_text(encoding="utf-8").splitlines()]
    assert [int(row[0]) for row in rows] == [0, 0, 1, 1]
    generated = []  # each hypothesis's tokens as generate() chose them (alone: a batch decodes the same)
    for sentence in sentences:
        output = model.generate(**tokenizer([sentence], return_tensors="pt"), num_beams=2, num_return_sequences=2,
                                max_new_tokens=8)  # fmt: skip
        generated += [[i for i in row[1:] if i != tokenizer.pad_token_id] for row in output.tolist()]
    expected = align(model, tokenizer, [sentences[int(r[0])] for r in rows], generated, layer=1)
    assert [row[2] for row in rows] == [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in generated]
    assert [row[3] for row in rows] == [format_alignment(pairs) for pairs in expected]
    objects = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines()]
    assert [o["hypotheses"][0]["alignment"] for o in objects] == [rows[0][3], rows[2][3]]


@pytest.mark.parametrize("num_beams", ["1", "2"])
def test_the_ctranslate2_engine_aligns_as_the_torch_engine(tmp_path, model_dir, num_beams):
    require_module("ctranslate2")
    # An untrained model attends almost evenly, and the two engines' rounding would break its near-ties: sharpen
    # the aligning layer's attention (the penultimate, layer 0 of 2), so that each row has one clear maximum.
    sharp = tmp_path / "sharp"
    model = HfAttentionForConditionalGeneration.from_pretrained(model_dir)
    with torch.no_grad():
        model.model.decoder.layers[0].encoder_attn.q_proj.weight.mul_(40.0)
    model.save_pretrained(sharp)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(sharp)
    model_dir = sharp
    source = tmp_path / "source.txt"
    source.write_text("we buy two dogs\nthey sell ninety one trees and five houses\ni see cats\n", encoding="utf-8")
    outputs = {}
    for engine, quantization in (("torch", "none"), ("ctranslate2", "float32")):
        outputs[engine] = tmp_path / f"{engine}.tsv"
        main(["--model", str(model_dir), "--engine", engine, "--quantization", quantization, "--input", str(source),
              "--output", str(outputs[engine]), "--num_beams", num_beams, "--max_new_tokens", "8",
              "--alignments", "true"])  # fmt: skip
    torch_lines = outputs["torch"].read_text(encoding="utf-8").splitlines()
    assert outputs["ctranslate2"].read_text(encoding="utf-8").splitlines() == torch_lines
    assert all("\t" in line for line in torch_lines) and any(line.split("\t")[1] for line in torch_lines)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--alignments", "true", "--alignment_layer", "2"], "--alignment_layer 2: the decoder has layers 0 to 1"),
        (["--alignments", "true", "--alignment_head", "9"], "--alignment_head 9: the cross-attention has heads"),
        (["--alignment_layer", "0"], "--alignment_layer/--alignment_head: alignment options; give --alignments"),
        (["--alignments", "true", "--engine", "onnx", "--quantization", "auto"], "the onnx graphs give none"),
        (["--alignments", "true", "--engine", "ctranslate2", "--alignment_layer", "0"], "chosen when the model was"),
    ],
    ids=["layer", "head", "without-alignments", "onnx", "ctranslate2-layer"],
)
def test_bad_alignment_options_are_refused_before_anything_is_written(tmp_path, model_dir, extra, message):
    source = tmp_path / "source.txt"
    source.write_text("we buy two dogs\n", encoding="utf-8")
    output = tmp_path / "out.txt"
    with pytest.raises(SystemExit) as stopped:
        main(["--model", str(model_dir), "--input", str(source), "--output", str(output), *extra])
    assert message in str(stopped.value) and not output.exists()
