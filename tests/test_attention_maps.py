"""Attention heatmaps: the weights are the model's, tokens label the axes, one PNG per kind and layer."""

import pytest
import torch

from hf_attention import HfAttentionConfig, HfAttentionForConditionalGeneration
from hf_attention.attention_maps import attention_maps, plot_attention_maps

from .helpers import toy_tokenizer


@pytest.fixture
def model_and_tokenizer():
    tokenizer = toy_tokenizer()
    torch.manual_seed(0)
    config = HfAttentionConfig.from_preset("tiny", vocab_size=len(tokenizer), encoder_layers=2, decoder_layers=3)
    model = HfAttentionForConditionalGeneration(config)
    model.set_attn_implementation("sdpa")
    return model, tokenizer


def test_maps_hold_each_layers_weights_with_the_tokens_on_the_axes(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    maps = attention_maps(model, tokenizer, "we buy two dogs", "wir kaufen zwei hunde")
    assert maps.source_tokens[-1] == "</s>" and maps.target_tokens[0] == "<s>"
    source_length, target_length = len(maps.source_tokens), len(maps.target_tokens)
    assert [tuple(w.shape) for w in maps.weights["encoder_attentions"]] == [(4, source_length, source_length)] * 2
    assert [tuple(w.shape) for w in maps.weights["decoder_attentions"]] == [(4, target_length, target_length)] * 3
    assert [tuple(w.shape) for w in maps.weights["cross_attentions"]] == [(4, target_length, source_length)] * 3
    for layers in maps.weights.values():
        for weights in layers:
            torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))
    assert torch.triu(maps.weights["decoder_attentions"][0], diagonal=1).abs().max() == 0  # causal
    assert model.config._attn_implementation == "sdpa"  # restored after the eager pass


@pytest.mark.slow  # 13 s of plotting; the maps' numbers are tested above
def test_one_png_per_kind_and_layer(model_and_tokenizer, tmp_path):
    model, tokenizer = model_and_tokenizer
    maps = attention_maps(model, tokenizer, "they sell five trees")  # target: the model's own translation
    paths = plot_attention_maps(maps, tmp_path / "maps")
    names = [path.name for path in paths]
    assert names == [
        "encoder_self_attention_layer0.png",
        "encoder_self_attention_layer1.png",
        *(f"decoder_self_attention_layer{i}.png" for i in range(3)),
        *(f"cross_attention_layer{i}.png" for i in range(3)),
    ]
    assert all(path.read_bytes()[:4] == b"\x89PNG" for path in paths)
