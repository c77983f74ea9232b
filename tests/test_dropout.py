"""Dropout (§5.4) with the CPU's cheaper mask: the law of `nn.functional.dropout` (each element zeroed with
probability p, the rest scaled by 1 / (1 - p)), reproducible under a seed, and used at every dropout site of the
model."""

import pytest
import torch

from hf_attention import HfAttentionConfig, HfAttentionForConditionalGeneration, dropout_hf_attention
from hf_attention.dropout_hf_attention import apply_dropout


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_each_element_is_dropped_with_probability_p_and_the_rest_scaled_to_keep_the_mean(p):
    torch.manual_seed(0)
    inputs = torch.rand(400, 1000) + 0.5
    outputs = apply_dropout(inputs, p, training=True)
    kept = outputs != 0
    assert abs(1 - kept.float().mean().item() - p) < 0.003  # 400,000 draws: the standard error is under 0.001
    torch.testing.assert_close(outputs[kept], inputs[kept] / (1 - p), rtol=1e-4, atol=0)
    assert abs(outputs.mean().item() / inputs.mean().item() - 1) < 0.005


def test_the_gradient_passes_the_kept_elements_scaled_and_no_other():
    inputs = torch.randn(64, 36, 32, dtype=torch.bfloat16, requires_grad=True)
    outputs = apply_dropout(inputs, 0.1, training=True)
    outputs.backward(torch.ones_like(outputs))
    expected = torch.where(outputs != 0, 1 / 0.9, 0.0).to(torch.bfloat16)
    assert torch.equal(inputs.grad, expected) and outputs.dtype == torch.bfloat16


def test_the_same_seed_gives_the_same_mask_and_another_seed_another():
    inputs = torch.ones(50, 50)
    masks = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        masks.append(apply_dropout(inputs, 0.2, training=True) != 0)
    assert torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])


@pytest.mark.parametrize("p, training", [(0.0, True), (0.3, False)])
def test_no_dropout_returns_the_input_itself(p, training):
    inputs = torch.randn(3, 4)
    assert apply_dropout(inputs, p, training) is inputs


def test_every_dropout_site_of_the_model_draws_its_mask_here(monkeypatch):
    config = HfAttentionConfig.from_preset("tiny", vocab_size=50, dropout=0.1, attention_dropout=0.1,
                                           activation_dropout=0.1)  # fmt: skip
    config._attn_implementation = "eager"  # the attention weights' dropout is eager attention's
    model = HfAttentionForConditionalGeneration(config).train()
    calls = []
    original = dropout_hf_attention.apply_dropout

    def counted(hidden_states, p, training):
        calls.append(p)
        return original(hidden_states, p, training)

    monkeypatch.setattr("hf_attention.modeling_hf_attention.apply_dropout", counted)
    monkeypatch.setattr("hf_attention.attention_hf_attention.apply_dropout", counted)
    batch = torch.tensor([[5, 6, 7, 2]])
    model(input_ids=batch, labels=batch)
    layers = config.encoder_layers + config.decoder_layers
    sublayers = 2 * config.encoder_layers + 3 * config.decoder_layers
    # embeddings (2), each sublayer's output, each FFN's activation, each attention's weights
    assert len(calls) == 2 + sublayers + layers + (sublayers - layers)
