"""Marian <-> hf_attention conversion: same logits and generations, exact round trips, clear errors."""

import dataclasses
import json

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, MarianConfig, MarianMTModel, PreTrainedConfig
from transformers.testing_utils import CaptureLogger

from hf_attention import HfAttentionConfig, HfAttentionForConditionalGeneration
from hf_attention.data.tokenization import train_tokenizer
from hf_attention.hub import marian_conversion
from hf_attention.hub.marian_conversion import (
    MARIAN_ONLY_FIELDS,
    SHARED_FIELDS,
    UnsupportedMarianOption,
    convert_checkpoint,
    hf_attention_to_marian,
    marian_to_hf_attention,
)

MARIAN_PAD, MARIAN_EOS = 58, 0  # opus-mt conventions: eos 0, pad (= decoder start) the last id

# Random Marian models over the options that change the architecture or the weights' layout.
MARIAN_CONFIGS = {
    "opus_mt_like": {"scale_embedding": True, "activation_function": "swish"},
    "separate_decoder_vocabulary": {
        "share_encoder_decoder_embeddings": False,
        "decoder_vocab_size": 71,
        "encoder_layers": 1,
        "decoder_layers": 3,
    },
    "untied_separate_embeddings": {
        "share_encoder_decoder_embeddings": False,
        "tie_word_embeddings": False,
        "scale_embedding": False,
    },
    "wider_unscaled": {
        "d_model": 24,
        "encoder_attention_heads": 3,
        "decoder_attention_heads": 6,
        "encoder_ffn_dim": 40,
        "decoder_ffn_dim": 16,
        "scale_embedding": False,
        "activation_function": "relu",
    },
}


# Sizes and opus-mt special ids that both sides' small test models share.
SMALL_MODEL = {
    "vocab_size": 59,
    "d_model": 16,
    "encoder_layers": 2,
    "decoder_layers": 2,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 2,
    "encoder_ffn_dim": 32,
    "decoder_ffn_dim": 32,
    "pad_token_id": MARIAN_PAD,
    "decoder_start_token_id": MARIAN_PAD,
    "eos_token_id": MARIAN_EOS,
}


def random_marian(seed: int = 0, **overrides) -> MarianMTModel:
    fields = {
        **SMALL_MODEL,
        "max_position_embeddings": 64,
        "forced_eos_token_id": MARIAN_EOS,
        **overrides,
    }
    torch.manual_seed(seed)
    marian = MarianMTModel(MarianConfig(**fields)).eval()
    with torch.no_grad():
        marian.final_logits_bias.normal_()  # Marian initialises it to zero; trained opus-mt models have one
    return marian


def padded_sources(seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, MARIAN_PAD, (3, 9), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    for row, length in enumerate((9, 5, 7)):
        input_ids[row, length - 1] = MARIAN_EOS
        input_ids[row, length:] = MARIAN_PAD
        attention_mask[row, length:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def padded_targets() -> dict:
    decoder_input_ids = torch.tensor([[MARIAN_PAD, 5, 9, 13, 0], [MARIAN_PAD, 7, 0, MARIAN_PAD, MARIAN_PAD]] * 2)[:3]
    return {"decoder_input_ids": decoder_input_ids, "decoder_attention_mask": decoder_input_ids.ne(MARIAN_PAD).long()}


def assert_same_outputs(reference, converted) -> None:
    """Logits within 1e-5 on padded batches; identical greedy and beam-4 generations."""
    sources, targets = padded_sources(), padded_targets()
    targets["decoder_attention_mask"][:, 0] = 1  # the start token is real
    keep = targets["decoder_attention_mask"].bool()
    with torch.no_grad():
        expected = reference(**sources, **targets).logits
        actual = converted(**sources, **targets).logits
    torch.testing.assert_close(actual[keep], expected[keep], atol=1e-5, rtol=1e-5)
    for num_beams in (1, 4):
        expected_ids = reference.generate(**sources, num_beams=num_beams, max_new_tokens=12)
        actual_ids = converted.generate(**sources, num_beams=num_beams, max_new_tokens=12)
        assert torch.equal(actual_ids, expected_ids), f"num_beams={num_beams}"


@pytest.mark.parametrize("name", MARIAN_CONFIGS)
def test_converted_marian_gives_the_same_logits_and_generations(name):
    marian = random_marian(**MARIAN_CONFIGS[name])
    converted = marian_to_hf_attention(marian)
    assert isinstance(converted, HfAttentionForConditionalGeneration)
    assert converted.config.add_final_logits_bias and converted.config.sinusoidal_layout == "split"
    assert_same_outputs(marian, converted)


@pytest.mark.parametrize("name", MARIAN_CONFIGS)
def test_marian_round_trip_reproduces_the_state_dict_exactly(name):
    marian = random_marian(**MARIAN_CONFIGS[name])
    round_trip = hf_attention_to_marian(marian_to_hf_attention(marian))
    original, returned = marian.state_dict(), round_trip.state_dict()
    assert original.keys() == returned.keys()
    for key, tensor in original.items():
        assert torch.equal(returned[key], tensor), key
    assert round_trip.config.to_diff_dict() == marian.config.to_diff_dict()


def test_weight_sharing_survives_conversion():
    shared = marian_to_hf_attention(random_marian()).model
    assert shared.encoder.embed_tokens.weight is shared.decoder.embed_tokens.weight
    separate = marian_to_hf_attention(random_marian(**MARIAN_CONFIGS["separate_decoder_vocabulary"]))
    assert separate.lm_head.weight is separate.model.decoder.embed_tokens.weight
    assert separate.config.target_vocab_size == 71


def test_zero_logits_bias_converts_to_a_model_without_one():
    marian = random_marian()
    with torch.no_grad():
        marian.final_logits_bias.zero_()
    converted = marian_to_hf_attention(marian)
    assert not converted.config.add_final_logits_bias
    assert torch.equal(hf_attention_to_marian(converted).final_logits_bias, marian.final_logits_bias)


def test_shared_but_untied_marian_converts_to_the_separate_matrices_transformers_5_uses():
    marian = random_marian(tie_word_embeddings=False)
    with CaptureLogger(marian_conversion.logger) as captured:
        converted = marian_to_hf_attention(marian)
    assert "`model.shared.weight`, which MarianMTModel never uses, is dropped" in captured.out
    assert not converted.config.share_encoder_decoder_embeddings and not converted.config.tie_word_embeddings
    assert_same_outputs(marian, converted)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"share_encoder_decoder_embeddings": False, "decoder_vocab_size": 70},
        {"tie_word_embeddings": False},
        {"d_model": 15, "encoder_attention_heads": 3, "decoder_attention_heads": 5},  # odd d_model
    ],
)
def test_paper_layout_model_converts_to_marian_by_permuting_the_model_dimension(overrides):
    config = HfAttentionConfig(**{**SMALL_MODEL, "dropout": 0.0, "bos_token_id": None, **overrides})
    torch.manual_seed(0)
    ours = HfAttentionForConditionalGeneration(config).eval()
    assert config.sinusoidal_layout == "interleaved"
    assert_same_outputs(ours, hf_attention_to_marian(ours))


def test_every_marian_config_field_has_a_mapping():
    generic = {field.name for field in dataclasses.fields(PreTrainedConfig)}
    for field in dataclasses.fields(MarianConfig):
        assert field.name in SHARED_FIELDS or field.name in MARIAN_ONLY_FIELDS or field.name in generic, field.name
        if field.name in SHARED_FIELDS:
            assert hasattr(HfAttentionConfig(), field.name), field.name


@pytest.mark.parametrize("name", ["encoder_layerdrop", "decoder_layerdrop"])
def test_layerdrop_is_refused_by_name_unless_ignored(name):
    marian = random_marian(**{name: 0.1})
    with pytest.raises(UnsupportedMarianOption, match=f"`{name}=0.1`: hf_attention has no LayerDrop"):
        marian_to_hf_attention(marian)
    assert_same_outputs(marian, marian_to_hf_attention(marian, ignore_layerdrop=True))


def test_edited_position_table_is_refused():
    marian = random_marian()
    with torch.no_grad():
        marian.model.decoder.embed_positions.weight[3] += 0.1
    with pytest.raises(UnsupportedMarianOption, match="`model.decoder.embed_positions.weight` is not Marian's"):
        marian_to_hf_attention(marian)


def test_legacy_config_keys_marian_ignores_are_reported():
    marian = random_marian()
    marian.config.normalize_before = True  # in old opus-mt configs; MarianMTModel computes post-LN regardless
    with CaptureLogger(marian_conversion.logger) as captured:
        converted = marian_to_hf_attention(marian)
    assert "legacy `normalize_before=True`, which MarianMTModel ignores" in captured.out
    assert not converted.config.normalize_before
    assert_same_outputs(marian, converted)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"position_embedding_type": "learned"}, "`position_embedding_type='learned'`"),
        ({"normalize_before": True}, "`normalize_before=True`"),
    ],
)
def test_hf_attention_options_marian_lacks_are_refused_by_name(tiny_config, overrides, message):
    model = HfAttentionForConditionalGeneration(HfAttentionConfig(**{**tiny_config.to_dict(), **overrides}))
    with pytest.raises(UnsupportedMarianOption, match=message):
        hf_attention_to_marian(model)


@pytest.fixture
def marian_checkpoint(tmp_path):
    """A Marian checkpoint folder with a tokenizer and a model card, as on the Hub."""
    folder = tmp_path / "opus-mt-xx-yy"
    random_marian().save_pretrained(folder)
    tokenizer = train_tokenizer(["eins zwei drei", "one two three"] * 20, vocab_size=60)
    tokenizer.save_pretrained(folder)
    (folder / "README.md").write_text("---\nlicense: cc-by-4.0\nlanguage:\n- xx\n- yy\n---\n# opus-mt-xx-yy\n")
    return folder


def test_checkpoint_conversion_carries_tokenizer_and_card_and_reloads(marian_checkpoint, tmp_path):
    destination = tmp_path / "converted"
    marian_conversion.main([str(marian_checkpoint), str(destination)])
    config = json.loads((destination / "config.json").read_text())
    assert config["model_type"] == "hf_attention" and config["sinusoidal_layout"] == "split"
    assert (destination / "modeling_hf_attention.py").is_file()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (destination / name).read_bytes() == (marian_checkpoint / name).read_bytes()
    card = (destination / "README.md").read_text()
    assert "license: cc-by-4.0" in card and "# opus-mt-xx-yy" in card
    assert f"Converted from the marian checkpoint `{marian_checkpoint}`" in card
    assert AutoTokenizer.from_pretrained(destination)("one two").input_ids
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(destination)
    assert_same_outputs(MarianMTModel.from_pretrained(marian_checkpoint), reloaded)

    back = tmp_path / "back"
    assert convert_checkpoint(destination, back) == "marian"
    assert not (back / "modeling_hf_attention.py").exists()
    original, returned = MarianMTModel.from_pretrained(marian_checkpoint), MarianMTModel.from_pretrained(back)
    for key, tensor in original.state_dict().items():
        assert torch.equal(returned.state_dict()[key], tensor), key


def test_conversion_never_replaces_a_non_empty_destination_without_overwrite(marian_checkpoint, tmp_path):
    destination = tmp_path / "taken"
    destination.mkdir()
    (destination / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="taken is not empty; pass overwrite=True"):
        convert_checkpoint(marian_checkpoint, destination)
    assert (destination / "notes.txt").read_text() == "mine"
    convert_checkpoint(marian_checkpoint, destination, overwrite=True)
    assert not (destination / "notes.txt").exists() and (destination / "model.safetensors").is_file()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["opus-mt-xx-yy", "taken"]  # no staging left


def test_failed_conversion_leaves_nothing_behind(tmp_path):
    source = tmp_path / "layerdrop"
    random_marian(encoder_layerdrop=0.2).save_pretrained(source)
    with pytest.raises(UnsupportedMarianOption):
        convert_checkpoint(source, tmp_path / "out")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["layerdrop"]


def test_sources_that_are_not_marian_or_hf_attention_are_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bart"}))
    with pytest.raises(ValueError, match="model_type 'bart'"):
        convert_checkpoint(tmp_path, tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="No config.json in .*empty"):
        convert_checkpoint(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="No checkpoint folder at .*missing"):
        convert_checkpoint(tmp_path / "missing", tmp_path / "out")


def test_command_line_reports_errors_without_a_traceback(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bart"}))
    with pytest.raises(SystemExit, match="error: .*model_type 'bart'"):
        marian_conversion.main([str(tmp_path), str(tmp_path / "out")])


def test_a_truncated_marian_weights_file_is_named(marian_checkpoint, tmp_path):
    weights = marian_checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(SystemExit, match=r"error: The weights of .*opus-mt-xx-yy cannot be read .*truncated"):
        marian_conversion.main([str(marian_checkpoint), str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
