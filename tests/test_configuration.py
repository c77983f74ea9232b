"""HfAttentionConfig: paper defaults, presets, validation, serialisation."""

import pytest
from huggingface_hub.errors import StrictDataclassFieldValidationError
from transformers import AutoConfig

from hf_attention import PRESETS, HfAttentionConfig


def test_defaults_are_the_paper_base_model():
    config = HfAttentionConfig()
    assert (config.encoder_layers, config.decoder_layers, config.d_model) == (6, 6, 512)
    assert (config.encoder_ffn_dim, config.encoder_attention_heads, config.dropout) == (2048, 8, 0.1)
    assert config.position_embedding_type == "sinusoidal" and not config.normalize_before
    assert config.scale_embedding and config.share_encoder_decoder_embeddings and config.tie_word_embeddings
    assert config.activation_function == "relu"


def test_big_preset_matches_table_3():
    config = HfAttentionConfig.from_preset("big", vocab_size=1000)
    assert (config.d_model, config.encoder_ffn_dim, config.decoder_attention_heads, config.dropout) == (
        1024,
        4096,
        16,
        0.3,
    )
    assert config.vocab_size == 1000


def test_every_preset_builds_a_valid_config():
    for name in PRESETS:
        assert HfAttentionConfig.from_preset(name).model_type == "hf_attention"


def test_unknown_preset_is_named_in_the_error():
    with pytest.raises(ValueError, match="'huge'"):
        HfAttentionConfig.from_preset("huge")


def test_common_attribute_names_map_to_seq2seq_fields():
    config = HfAttentionConfig(d_model=64, encoder_attention_heads=4, encoder_layers=3)
    assert (config.hidden_size, config.num_attention_heads, config.num_hidden_layers) == (64, 4, 3)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("encoder_attention_heads", 7, "divisible by `encoder_attention_heads`"),
        ("decoder_attention_heads", 5, "divisible by `decoder_attention_heads`"),
        ("d_model", 0, "`d_model` 0: must be a positive integer"),
        ("encoder_layers", -1, "`encoder_layers` -1: must be a positive integer"),
        ("vocab_size", 0, "`vocab_size` 0: must be a positive integer"),
        ("dropout", 1.0, r"`dropout` must be in \[0, 1\)"),
        ("attention_dropout", -0.1, "`attention_dropout` must be in"),
        ("pad_token_id", 99, "`pad_token_id` must lie in"),
        ("eos_token_id", [2, 500], "`eos_token_id` must lie in"),
        ("decoder_start_token_id", -3, "`decoder_start_token_id` must lie in"),
    ],
)
def test_invalid_values_raise_value_error_naming_the_field(field, value, message):
    kwargs = {"vocab_size": 99, "d_model": 64, field: value}
    with pytest.raises(ValueError, match=message):
        HfAttentionConfig(**kwargs)


def test_unknown_position_embedding_type_is_rejected():
    with pytest.raises(Exception, match="position_embedding_type"):
        HfAttentionConfig(position_embedding_type="rotary")


def test_save_and_reload_through_auto_config(tmp_path):
    config = HfAttentionConfig.from_preset(
        "tiny", vocab_size=321, normalize_before=True, position_embedding_type="learned"
    )
    config.save_pretrained(tmp_path)
    reloaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(reloaded, HfAttentionConfig)
    saved, loaded = config.to_dict(), reloaded.to_dict()
    loaded.pop("_name_or_path"), saved.pop("_name_or_path")
    assert loaded == saved


def test_auto_config_for_model_accepts_overrides():
    config = AutoConfig.for_model("hf_attention", vocab_size=8000, d_model=256, encoder_layers=3, decoder_layers=3)
    assert isinstance(config, HfAttentionConfig)
    assert (config.vocab_size, config.d_model, config.encoder_layers) == (8000, 256, 3)


def test_decoder_vocab_size_defaults_to_vocab_size_and_is_kept_when_embeddings_are_separate():
    assert HfAttentionConfig(vocab_size=50).decoder_vocab_size == 50
    separate = HfAttentionConfig(vocab_size=50, decoder_vocab_size=40, share_encoder_decoder_embeddings=False)
    assert separate.target_vocab_size == 40
    assert separate.get_text_config(decoder=True).vocab_size == 40
    reloaded = HfAttentionConfig.from_dict(separate.to_dict())
    assert reloaded.target_vocab_size == 40


def test_shared_embeddings_use_vocab_size_for_the_target_side():
    config = HfAttentionConfig(vocab_size=50, decoder_vocab_size=40)
    assert config.decoder_vocab_size == config.target_vocab_size == 50
    config.vocab_size = 60  # e.g. set after adding tokens
    assert config.target_vocab_size == 60
    assert HfAttentionConfig.from_dict(config.to_dict()).target_vocab_size == 60


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"decoder_vocab_size": 0, "share_encoder_decoder_embeddings": False}, "`decoder_vocab_size` 0: must be"),
        (
            {"decoder_vocab_size": 2, "share_encoder_decoder_embeddings": False},
            r"`eos_token_id` must lie in \[0, 2\)",
        ),
    ],
)
def test_bad_target_vocabulary_is_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        HfAttentionConfig(vocab_size=50, **overrides)


def test_unknown_sinusoidal_layout_is_rejected():
    with pytest.raises(StrictDataclassFieldValidationError, match="sinusoidal_layout"):
        HfAttentionConfig(sinusoidal_layout="halves")
