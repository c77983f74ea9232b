"""The architecture: the paper's math, attention back-ends, masks, loss, and errors on bad input."""

import math

import pytest
import torch

from hf_attention import HfAttentionConfig, HfAttentionForConditionalGeneration, HfAttentionModel
from hf_attention.modeling_hf_attention import MultiHeadAttention, SinusoidalPositionalEncoding, shift_tokens_right

from .helpers import BOS, MARIAN_STYLE, PAD, padded_batch

VARIANTS = {
    "paper": {},
    "pre_ln": {"normalize_before": True},
    "learned_positions": {"position_embedding_type": "learned"},
    "separate_embeddings": {"share_encoder_decoder_embeddings": False},
    "untied_output": {"tie_word_embeddings": False},
    "marian_style": MARIAN_STYLE,
}


def make_model(config: HfAttentionConfig, attn_implementation: str = "eager", **overrides):
    config = HfAttentionConfig(**{**config.to_dict(), **overrides})
    torch.manual_seed(0)
    model = HfAttentionForConditionalGeneration(config).eval()
    model.set_attn_implementation(attn_implementation)
    return model


def logits_of(model, source, target, **kwargs):
    with torch.no_grad():
        return model(
            **source,
            decoder_input_ids=target["input_ids"],
            decoder_attention_mask=target["attention_mask"],
            **kwargs,
        ).logits


@pytest.mark.parametrize("variant", VARIANTS)
# flex_attention compiles its kernel on a CPU (30 s of the default suite): an opt-in backend, checked with -m slow
@pytest.mark.parametrize("backend", ["sdpa", pytest.param("flex_attention", marks=pytest.mark.slow)])
def test_attention_backends_agree_with_eager(tiny_config, source_batch, target_batch, variant, backend):
    eager = logits_of(make_model(tiny_config, "eager", **VARIANTS[variant]), source_batch, target_batch)
    other = logits_of(make_model(tiny_config, backend, **VARIANTS[variant]), source_batch, target_batch)
    keep = target_batch["attention_mask"].bool()
    torch.testing.assert_close(other[keep], eager[keep], atol=1e-5, rtol=1e-5)


def test_sinusoidal_encoding_is_the_papers_formula():
    d_model = 10
    encoding = SinusoidalPositionalEncoding(d_model)(torch.arange(50))
    for pos in (0, 1, 7, 49):
        for i in range(d_model // 2):
            angle = pos / 10000 ** (2 * i / d_model)
            assert encoding[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-5)
            assert encoding[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-5)


def test_token_embeddings_are_scaled_by_sqrt_d_model(tiny_config):
    model = make_model(tiny_config)
    ids = torch.tensor([[5, 6, 7]])
    embedded = model.model.encoder.embed_tokens(ids)
    torch.testing.assert_close(embedded, model.model.shared.weight[ids] * math.sqrt(tiny_config.d_model))
    unscaled = make_model(tiny_config, scale_embedding=False)
    torch.testing.assert_close(unscaled.model.encoder.embed_tokens(ids), unscaled.model.shared.weight[ids])


def test_multi_head_attention_is_concat_of_per_head_scaled_dot_product(tiny_config):
    """§3.2.2 written out head by head: MultiHead(Q,K,V) = Concat(head_1..head_h) W^O."""
    torch.manual_seed(0)
    tiny_config._attn_implementation = "eager"
    attention = MultiHeadAttention(tiny_config, num_heads=4).eval()
    queries, memory = torch.randn(2, 3, 16), torch.randn(2, 5, 16)
    output, _ = attention(queries, key_value_states=memory)

    d_k = 16 // 4
    heads = []
    for h in range(4):
        rows = slice(h * d_k, (h + 1) * d_k)
        q = queries @ attention.q_proj.weight[rows].T + attention.q_proj.bias[rows]
        k = memory @ attention.k_proj.weight[rows].T + attention.k_proj.bias[rows]
        v = memory @ attention.v_proj.weight[rows].T + attention.v_proj.bias[rows]
        heads.append(torch.softmax(q @ k.transpose(1, 2) / math.sqrt(d_k), dim=-1) @ v)
    expected = attention.out_proj(torch.cat(heads, dim=-1))
    torch.testing.assert_close(output, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_padding_does_not_change_outputs_of_real_tokens(tiny_config, backend):
    model = make_model(tiny_config, backend)
    batch = padded_batch([6, 3], max_length=6)
    target = padded_batch([4, 2], max_length=4, seed=1)
    batched = logits_of(model, batch, target)
    for row in range(2):
        source_length, target_length = batch["attention_mask"][row].sum(), target["attention_mask"][row].sum()
        alone_source = {k: v[row : row + 1, :source_length] for k, v in batch.items()}
        alone_target = {k: v[row : row + 1, :target_length] for k, v in target.items()}
        alone = logits_of(model, alone_source, alone_target)
        torch.testing.assert_close(batched[row, :target_length], alone[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_future_target_tokens_do_not_change_earlier_positions(tiny_config, source_batch, backend):
    model = make_model(tiny_config, backend)
    target = torch.tensor([[BOS, 5, 6, 7, 8]] * 3)
    changed = target.clone()
    changed[:, 3:] = torch.tensor([40, 41])
    with torch.no_grad():
        original = model(**source_batch, decoder_input_ids=target).logits
        altered = model(**source_batch, decoder_input_ids=changed).logits
    torch.testing.assert_close(original[:, :3], altered[:, :3])
    assert not torch.allclose(original[:, 3:], altered[:, 3:])


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fully_padded_rows_never_produce_nan(tiny_config, backend, dtype):
    model = make_model(tiny_config, backend).to(dtype)
    source = padded_batch([5, 2], max_length=5)
    source["input_ids"][1] = PAD
    source["attention_mask"][1] = 0
    target = torch.tensor([[BOS, 5, 6], [BOS, PAD, PAD]])
    target_mask = torch.tensor([[1, 1, 1], [0, 0, 0]])
    with torch.no_grad():
        output = model(**source, decoder_input_ids=target, decoder_attention_mask=target_mask)
    assert torch.isfinite(output.logits).all()
    assert torch.isfinite(output.encoder_last_hidden_state).all()


def test_loss_ignores_minus_100_and_matches_cross_entropy(tiny_config, source_batch):
    model = make_model(tiny_config)
    labels = torch.tensor([[5, 6, 7, 2], [8, 2, -100, -100], [9, 10, 2, -100]])
    output = model(**source_batch, labels=labels)
    expected = torch.nn.functional.cross_entropy(output.logits.reshape(-1, 99), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(output.loss, expected)


def test_num_items_in_batch_turns_the_loss_into_a_token_sum_over_that_count(tiny_config, source_batch):
    model = make_model(tiny_config)
    labels = torch.tensor([[5, 6, 7, 2], [8, 2, -100, -100], [9, 10, 2, -100]])
    mean_loss = model(**source_batch, labels=labels).loss
    tokens = int((labels != -100).sum())
    per_token_sum = model(**source_batch, labels=labels, num_items_in_batch=torch.tensor(tokens)).loss
    torch.testing.assert_close(per_token_sum, mean_loss)
    doubled = model(**source_batch, labels=labels, num_items_in_batch=torch.tensor(2 * tokens)).loss
    torch.testing.assert_close(doubled, mean_loss / 2)


def test_decoder_inputs_are_labels_shifted_right(tiny_config, source_batch):
    model = make_model(tiny_config)
    labels = torch.tensor([[5, 6, 2], [7, 2, -100], [8, 9, 2]])
    shifted = shift_tokens_right(labels, PAD, BOS)
    assert shifted.tolist() == [[BOS, 5, 6], [BOS, 7, 2], [BOS, 8, 9]]
    with torch.no_grad():
        from_labels = model(**source_batch, labels=labels).logits
        explicit = model(**source_batch, decoder_input_ids=shifted).logits
    torch.testing.assert_close(from_labels, explicit)


def test_outputs_attentions_and_hidden_states_for_every_layer(tiny_config, source_batch, target_batch):
    model = make_model(tiny_config)
    output = model(
        **source_batch,
        decoder_input_ids=target_batch["input_ids"],
        output_attentions=True,
        output_hidden_states=True,
    )
    batch, heads, source_length, target_length = 3, 4, 7, 5
    assert len(output.encoder_attentions) == len(output.decoder_attentions) == len(output.cross_attentions) == 2
    assert output.encoder_attentions[0].shape == (batch, heads, source_length, source_length)
    assert output.decoder_attentions[0].shape == (batch, heads, target_length, target_length)
    assert output.cross_attentions[0].shape == (batch, heads, target_length, source_length)
    assert len(output.encoder_hidden_states) == len(output.decoder_hidden_states) == 3  # embeddings + 2 layers
    # Causal: no decoder position attends to a later one.
    assert torch.all(output.decoder_attentions[0].triu(diagonal=1) == 0)
    # Padding: no attention weight on padded source positions.
    padded = ~source_batch["attention_mask"].bool()
    assert torch.all(output.cross_attentions[0] * padded[:, None, None, :] == 0)
    assert torch.all(output.encoder_attentions[1] * padded[:, None, None, :] == 0)


def test_return_dict_false_gives_a_tuple_with_logits_first(tiny_config, source_batch, target_batch):
    model = make_model(tiny_config)
    as_tuple = model(**source_batch, decoder_input_ids=target_batch["input_ids"], return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(
        as_tuple[0], logits_of(model, source_batch, {"input_ids": target_batch["input_ids"], "attention_mask": None})
    )


def test_gradient_checkpointing_gives_the_same_gradients(tiny_config, source_batch):
    labels = torch.tensor([[5, 6, 7, 2], [8, 2, -100, -100], [9, 10, 2, -100]])
    gradients = []
    for checkpointing in (False, True):
        model = make_model(tiny_config).train()
        if checkpointing:
            model.activation_checkpointing_enable()
        model(**source_batch, labels=labels).loss.backward()
        gradients.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    assert gradients[0].keys() == gradients[1].keys()
    for name in gradients[0]:
        torch.testing.assert_close(gradients[0][name], gradients[1][name])


def test_dropout_acts_in_training_only(tiny_config, source_batch, target_batch):
    model = make_model(tiny_config, dropout=0.3).train()
    first, second = (logits_of(model, source_batch, target_batch) for _ in range(2))
    assert not torch.allclose(first, second)
    model.eval()
    torch.testing.assert_close(
        logits_of(model, source_batch, target_batch), logits_of(model, source_batch, target_batch)
    )


@pytest.mark.parametrize(
    "variant, tied_to_embedding, encoder_is_decoder",
    [("paper", True, True), ("untied_output", False, True), ("separate_embeddings", True, False)],
)
def test_weight_sharing_follows_the_config(tiny_config, variant, tied_to_embedding, encoder_is_decoder):
    model = make_model(tiny_config, **VARIANTS[variant])
    encoder, decoder = model.model.encoder.embed_tokens.weight, model.model.decoder.embed_tokens.weight
    assert (model.lm_head.weight is decoder) == tied_to_embedding
    assert (encoder is decoder) == encoder_is_decoder


def test_linear_weights_are_xavier_uniform(tiny_config):
    model = make_model(tiny_config)
    weight = model.model.encoder.layers[0].fc1.weight
    bound = math.sqrt(6 / sum(weight.shape))
    assert weight.abs().max() <= bound
    assert weight.abs().max() > 0.8 * bound  # uniform over the whole range, not a small normal
    assert torch.all(model.model.encoder.layers[0].fc1.bias == 0)


def test_base_model_returns_decoder_states(tiny_config, source_batch, target_batch):
    torch.manual_seed(0)
    model = HfAttentionModel(tiny_config).eval()
    output = model(**source_batch, decoder_input_ids=target_batch["input_ids"])
    assert output.last_hidden_state.shape == (3, 5, 16)
    assert output.encoder_last_hidden_state.shape == (3, 7, 16)


# Bad input: each raises a ValueError naming the argument before any computation.


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"input_ids": torch.tensor([5, 6, 2])}, r"`input_ids` must have shape \(batch, length\)"),
        ({"input_ids": torch.tensor([[5, 600, 2]])}, r"`input_ids` holds ids in \[2, 600\], outside the vocabulary"),
        ({"input_ids": torch.tensor([[5, -1, 2]])}, "`input_ids` holds ids"),
        ({"input_ids": torch.tensor([[5.0, 6.0]])}, "must hold integer token ids"),
        (
            {"input_ids": torch.tensor([[5, 6, 2]]), "attention_mask": torch.ones(1, 4)},
            r"`attention_mask` must have shape \(batch, length\) = \(1, 3\)",
        ),
        (
            {"input_ids": torch.tensor([[5, 6, 2]]), "decoder_input_ids": torch.tensor([[1, 200]])},
            "`decoder_input_ids` holds ids",
        ),
        (
            {"input_ids": torch.tensor([[5, 6, 2]]), "decoder_attention_mask": torch.ones(1, 5)},
            "`decoder_attention_mask` must have shape",
        ),
        ({"input_ids": torch.tensor([[5, 6, 2]]), "labels": torch.tensor([5, 2])}, "`labels` must have shape"),
        (
            {"input_ids": torch.tensor([[5, 6, 2]]), "labels": torch.tensor([[5, 300]])},
            "`labels` must hold -100 or ids",
        ),
        (
            {
                "input_ids": torch.tensor([[5, 6, 2]]),
                "decoder_input_ids": torch.tensor([[1, 5]]),
                "labels": torch.tensor([[5, 6, 2]]),
            },
            "`labels` shape",
        ),
    ],
)
def test_bad_input_raises_a_clear_value_error(tiny_config, arguments, message):
    model = make_model(tiny_config)
    arguments.setdefault("decoder_input_ids", torch.tensor([[BOS, 5]])) if "labels" not in arguments else None
    with pytest.raises(ValueError, match=message):
        model(**arguments)


def test_source_beyond_learned_positions_is_rejected(tiny_config):
    model = make_model(tiny_config, position_embedding_type="learned", max_position_embeddings=8)
    with pytest.raises(ValueError, match="`input_ids` reaches position 9, beyond max_position_embeddings=8"):
        model(input_ids=torch.full((1, 9), 5), decoder_input_ids=torch.tensor([[BOS]]))


def test_sinusoidal_positions_extrapolate_beyond_max_position_embeddings(tiny_config):
    model = make_model(tiny_config, max_position_embeddings=8)
    with torch.no_grad():
        logits = model(input_ids=torch.full((1, 20), 5), decoder_input_ids=torch.full((1, 12), 6)).logits
    assert torch.isfinite(logits).all()


def test_split_sinusoid_layout_holds_the_same_values_sines_first():
    positions = torch.arange(40)
    for d_model in (10, 11):
        interleaved = SinusoidalPositionalEncoding(d_model, "interleaved")(positions)
        split = SinusoidalPositionalEncoding(d_model, "split")(positions)
        sines_then_cosines = torch.cat((torch.arange(0, d_model, 2), torch.arange(1, d_model, 2)))
        torch.testing.assert_close(split, interleaved[:, sines_then_cosines], atol=0, rtol=0)


def test_final_logits_bias_is_added_to_every_position(tiny_config, source_batch, target_batch):
    model = make_model(tiny_config, add_final_logits_bias=True)
    without_bias = logits_of(model, source_batch, target_batch)
    model.final_logits_bias.normal_()
    with_bias = logits_of(model, source_batch, target_batch)
    torch.testing.assert_close(with_bias, without_bias + model.final_logits_bias)
    assert "final_logits_bias" in model.state_dict()
    assert "final_logits_bias" not in make_model(tiny_config).state_dict()


def test_separate_target_vocabulary_sizes_decoder_and_output(tiny_config, source_batch):
    model = make_model(tiny_config, share_encoder_decoder_embeddings=False, decoder_vocab_size=40)
    assert model.model.encoder.embed_tokens.num_embeddings == 99
    assert model.model.decoder.embed_tokens.num_embeddings == 40 and model.lm_head.out_features == 40
    labels = torch.tensor([[5, 39, 2], [7, 2, -100], [38, 6, 2]])
    output = model(**source_batch, labels=labels)
    assert output.logits.shape == (3, 3, 40) and torch.isfinite(output.loss)
    with pytest.raises(ValueError, match=r"`labels` must hold -100 or ids in \[0, 40\)"):
        model(**source_batch, labels=torch.tensor([[5, 45, 2]] * 3))
    with pytest.raises(ValueError, match="`decoder_input_ids` holds ids in"):
        model(**source_batch, decoder_input_ids=torch.tensor([[1, 45]] * 3))


def test_resizing_the_shared_vocabulary_resizes_outputs_and_logits_bias(tiny_config, source_batch):
    model = make_model(tiny_config, add_final_logits_bias=True)
    model.final_logits_bias.fill_(0.5)
    model.resize_token_embeddings(110, mean_resizing=False)
    assert model.config.vocab_size == model.config.decoder_vocab_size == 110
    assert model.lm_head.weight is model.model.shared.weight and model.lm_head.out_features == 110
    assert model.final_logits_bias.shape == (1, 110)
    assert model.final_logits_bias[0, :99].eq(0.5).all() and model.final_logits_bias[0, 99:].eq(0).all()
    assert model(**source_batch, decoder_input_ids=torch.tensor([[1, 105]] * 3)).logits.shape == (3, 2, 110)


def test_resizing_separate_vocabularies_is_refused(tiny_config):
    model = make_model(tiny_config, share_encoder_decoder_embeddings=False)
    with pytest.raises(ValueError, match="share_encoder_decoder_embeddings=False"):
        model.resize_token_embeddings(120)
