"""generate(): every standard strategy through transformers' GenerationMixin, with and without the KV cache."""

import copy
import types

import pytest
import torch
from transformers import GenerationMixin
from transformers.cache_utils import DynamicLayer, EncoderDecoderCache

from hf_attention import HfAttentionForConditionalGeneration, generation_hf_attention
from hf_attention.generation_hf_attention import GrowingCacheLayer

from .helpers import BOS, EOS, padded_batch

STRATEGIES = {
    "greedy": {},
    "beam_search": {"num_beams": 4},
    "beam_search_several_returned": {"num_beams": 3, "num_return_sequences": 2},
    "sampling": {"do_sample": True, "temperature": 0.7, "top_k": 10, "top_p": 0.9},
    "constrained_lengths_and_words": {"min_new_tokens": 6, "bad_words_ids": [[7], [8, 9]]},
    "forced_bos_and_eos": {"forced_bos_token_id": 4, "forced_eos_token_id": EOS},
}


@pytest.fixture
def model(tiny_config):
    torch.manual_seed(0)
    return HfAttentionForConditionalGeneration(tiny_config).eval()


def generate(model, use_cache, **kwargs):
    torch.manual_seed(1)  # sampling draws the same numbers in both runs
    batch = padded_batch([7, 4, 6], max_length=7)
    return model.generate(**batch, use_cache=use_cache, **{"max_new_tokens": 12, **kwargs})


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_cached_generation_matches_uncached(model, strategy):
    cached = generate(model, True, **STRATEGIES[strategy])
    uncached = generate(model, False, **STRATEGIES[strategy])
    assert torch.equal(cached, uncached)


def test_generation_options_take_effect(model):
    assert generate(model, True, num_beams=3, num_return_sequences=2).shape[0] == 6
    forced = generate(model, True, forced_bos_token_id=4, max_new_tokens=3)
    assert forced[:, 0].tolist() == [BOS] * 3 and forced[:, 1].tolist() == [4] * 3
    banned = generate(model, True, bad_words_ids=[[7]], min_new_tokens=12)
    assert not (banned == 7).any() and not (banned[:, 1:] == EOS).any()
    assert generate(model, True, max_new_tokens=5).shape[1] <= 6


def test_cached_step_by_step_decoding_matches_one_full_forward(model):
    batch = padded_batch([7, 4, 6], max_length=7)
    target = torch.tensor([[BOS, 5, 6, 7, 8]] * 3)
    with torch.no_grad():
        full = model(**batch, decoder_input_ids=target).logits
        encoder_outputs = model.get_encoder()(**batch)
        cache, steps = None, []
        for position in range(target.shape[1]):
            output = model(
                encoder_outputs=encoder_outputs,
                attention_mask=batch["attention_mask"],
                decoder_input_ids=target[:, position : position + 1],
                cache=cache,
                use_cache=True,
            )
            cache = output.cache
            steps.append(output.logits)
    assert isinstance(cache, EncoderDecoderCache) and cache.get_seq_length() == target.shape[1]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_cross_attention_keys_are_projected_once_per_generation(model):
    calls = []
    hook = model.model.decoder.layers[0].encoder_attn.k_proj.register_forward_hook(lambda *_: calls.append(1))
    generate(model, True, max_new_tokens=8, min_new_tokens=8)
    hook.remove()
    assert len(calls) == 1


def stock_transformers_generation(model):
    """The model with transformers' own expansion, cache and beam reordering: one encoder output per hypothesis."""
    stock = copy.deepcopy(model)
    for name in ("_expand_inputs_for_generation", "_prepare_cache_for_generation", "prepare_inputs_for_generation"):
        setattr(stock, name, types.MethodType(getattr(GenerationMixin, name), stock))

    def reorder_every_cache(cache, beam_idx):
        cache.reorder_cache(beam_idx)
        return cache

    stock._reorder_cache = reorder_every_cache
    return stock


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("strategy", ["beam_search", "beam_search_several_returned", "sampling_several_returned"])
def test_hypotheses_sharing_one_encoder_output_generate_what_stock_transformers_generates(
    tiny_config, strategy, attention
):
    options = {**STRATEGIES, "sampling_several_returned": {**STRATEGIES["sampling"], "num_return_sequences": 3}}
    torch.manual_seed(0)
    model = HfAttentionForConditionalGeneration(tiny_config).eval()
    model.set_attn_implementation(attention)
    stock = stock_transformers_generation(model)
    settings = {"return_dict_in_generate": True, "output_scores": True, **options[strategy]}
    ours, theirs = generate(model, True, **settings), generate(stock, True, **settings)
    assert torch.equal(ours.sequences, theirs.sequences)
    torch.testing.assert_close(torch.stack(ours.scores), torch.stack(theirs.scores), atol=1e-5, rtol=1e-5)
    sources, hypotheses = 3, 3 * max(settings.get("num_beams", 1), settings.get("num_return_sequences", 1))
    assert ours.cache.cross_attention_cache.layers[0].keys.shape[0] == sources
    assert theirs.cache.cross_attention_cache.layers[0].keys.shape[0] == hypotheses
    assert all(isinstance(layer, GrowingCacheLayer) for layer in ours.cache.self_attention_cache.layers)


@pytest.mark.parametrize("cache_implementation", [None, "static"])
@pytest.mark.parametrize("strategy", ["greedy", "beam_search", "constrained_lengths_and_words"])
def test_step_inputs_prepared_here_give_what_transformers_preparation_gives(model, strategy, cache_implementation):
    stock = stock_transformers_generation(model)
    settings = {"return_dict_in_generate": True, "output_scores": True, "cache_implementation": cache_implementation}
    settings.update(STRATEGIES[strategy])
    ours, theirs = generate(model, True, **settings), generate(stock, True, **settings)
    assert torch.equal(ours.sequences, theirs.sequences)
    torch.testing.assert_close(torch.stack(ours.scores), torch.stack(theirs.scores), atol=1e-5, rtol=1e-5)


def test_step_inputs_not_prepared_here_go_to_transformers_preparation(model, monkeypatch):
    """A decoder mask (here, with a decoder prompt) is left to transformers, which extends it at every step."""
    calls = []
    general = GenerationMixin.prepare_inputs_for_generation

    def spy(self, *args, **kwargs):
        calls.append(kwargs.get("decoder_attention_mask"))
        return general(self, *args, **kwargs)

    monkeypatch.setattr(GenerationMixin, "prepare_inputs_for_generation", spy)
    prompt = torch.tensor([[BOS, 5], [BOS, 6], [BOS, 7]])
    with_mask = generate(model, True, decoder_input_ids=prompt, decoder_attention_mask=torch.ones_like(prompt))
    assert len(calls) == 12 and [mask.shape[1] for mask in calls] == list(range(2, 14))
    calls.clear()
    assert torch.equal(generate(model, True, decoder_input_ids=prompt), with_mask)
    assert calls == []


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_k_targets_per_source_give_the_outputs_of_a_repeated_encoder_output(model, attention):
    """Cross-attention from k targets of one source at once (extra query positions) = each target on its own copy."""
    model.set_attn_implementation(attention)
    batch = padded_batch([7, 4], max_length=7)
    targets = torch.randint(3, 99, (6, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        encoded = model.get_encoder()(**batch)
        shared = model(encoder_outputs=encoded, attention_mask=batch["attention_mask"], decoder_input_ids=targets,
                       output_attentions=attention == "eager")  # fmt: skip
        repeated = model(
            encoder_outputs=(encoded.last_hidden_state.repeat_interleave(3, dim=0),),
            attention_mask=batch["attention_mask"].repeat_interleave(3, dim=0),
            decoder_input_ids=targets,
            output_attentions=attention == "eager",
        )
    torch.testing.assert_close(shared.logits, repeated.logits, atol=1e-5, rtol=1e-5)
    if attention == "eager":
        for ours, theirs in zip(shared.cross_attentions, repeated.cross_attentions, strict=True):
            torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="k targets per source"):
        model(encoder_outputs=encoded, attention_mask=batch["attention_mask"], decoder_input_ids=targets[:5])


# 12 right-padded sources of 20 positions: 109 tokens, 131 positions of padding
GROUPED_LENGTHS = [3, 12, 4, 20, 5, 6, 19, 7, 3, 18, 8, 4]


def encoder_feed_forward_rows(model) -> list:
    """The shape of every input of the first encoder layer's fc1 (all but its last dimension), from now on."""
    shapes = []
    model.model.encoder.layers[0].fc1.register_forward_hook(lambda module, args, output: shapes.append(
        tuple(args[0].shape[:-1])))  # fmt: skip
    return shapes


@pytest.mark.parametrize("strategy", ["greedy", "beam_search_several_returned", "sampling"])
def test_a_batch_encoded_without_padding_generates_what_the_padded_encoding_generates(model, strategy, monkeypatch):
    batch = padded_batch(GROUPED_LENGTHS, max_length=20)
    shapes = encoder_feed_forward_rows(model)

    def run():
        torch.manual_seed(1)
        settings = {"max_new_tokens": 8, "return_dict_in_generate": True, "output_scores": True}
        return model.generate(**batch, **settings, **STRATEGIES[strategy])

    without_padding = run()
    assert shapes == [(sum(GROUPED_LENGTHS),)]  # the tokens' rows only
    monkeypatch.setattr(generation_hf_attention.HfAttentionGenerationMixin, "_encode_without_padding",
                        lambda *args: None)  # fmt: skip
    padded = run()
    assert shapes[1:] == [(12, 20)]
    assert torch.equal(without_padding.sequences, padded.sequences)
    torch.testing.assert_close(torch.stack(without_padding.scores), torch.stack(padded.scores), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_the_encoder_without_padding_computes_every_token_as_the_padded_batch_does(model, attention, padding_side):
    model.set_attn_implementation(attention)
    batch = padded_batch(GROUPED_LENGTHS, max_length=20)
    if padding_side == "left":  # the positions count from the left edge either way
        batch = {name: tensor.flip(1) for name, tensor in batch.items()}
    with torch.no_grad():
        skipped = model.get_encoder()(**batch, skip_padding=True).last_hidden_state
        whole = model.get_encoder()(**batch).last_hidden_state
    tokens = batch["attention_mask"].bool()
    torch.testing.assert_close(skipped[tokens], whole[tokens], atol=1e-6, rtol=1e-6)
    assert not skipped[~tokens].any()  # the padding: zeros


def test_batches_without_padding_or_asking_for_the_encoder_s_outputs_are_encoded_as_transformers_does(model):
    def encoded(batch, **config):
        configuration = copy.deepcopy(model.generation_config)
        configuration.update(**config)
        return model._encode_without_padding(batch["input_ids"], dict(batch), "input_ids", configuration)

    padded = padded_batch(GROUPED_LENGTHS, max_length=20)
    assert encoded(padded) is not None
    assert encoded(padded_batch([20] * 3, max_length=20)) is None  # no padding to skip
    assert encoded(padded, output_hidden_states=True) is None  # the encoder's own outputs were asked for
    assert encoded(padded, output_attentions=True) is None


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("strategy", ["greedy", "beam_search_several_returned"])
def test_source_keys_projected_without_the_padding_generate_what_the_padded_projection_generates(
    model, attention, strategy, monkeypatch
):
    """A padded batch's cross-attention keys and values come from its tokens only (109 rows, not 12 x 20), cached
    before the first step; a batch without padding is projected whole, before the first step too. (For a model set
    up by `optimize_for_inference`, as here; a model as loaded projects in its first step.)"""
    model.set_attn_implementation(attention)
    model.decode_with_cached_attention = True
    rows = []
    projection = model.model.decoder.layers[0].encoder_attn.k_proj
    hook = projection.register_forward_hook(lambda module, args, output: rows.append(tuple(args[0].shape[:-1])))

    def run(lengths):
        settings = {"max_new_tokens": 8, "return_dict_in_generate": True, "output_scores": True}
        return model.generate(**padded_batch(lengths, max_length=20), **settings, **STRATEGIES[strategy])

    without_padding = run(GROUPED_LENGTHS)
    run([20] * 3)
    monkeypatch.setattr(generation_hf_attention.HfAttentionGenerationMixin, "_project_source_without_padding",
                        lambda *args: None)  # fmt: skip
    padded = run(GROUPED_LENGTHS)
    monkeypatch.undo()
    model.decode_with_cached_attention = False  # a model as loaded (or sharded by FSDP): the first step projects
    run(GROUPED_LENGTHS)
    hook.remove()
    assert rows == [(sum(GROUPED_LENGTHS),), (3, 20), (12, 20), (12, 20)]
    assert torch.equal(without_padding.sequences, padded.sequences)
    torch.testing.assert_close(torch.stack(without_padding.scores), torch.stack(padded.scores), atol=1e-5, rtol=1e-5)


def test_a_growing_cache_layer_holds_what_a_dynamic_layer_holds():
    """Appends, beam reorders, a crop and a batch selection, on both layers: the same keys and values throughout."""
    generator = torch.Generator().manual_seed(0)
    growing, dynamic = GrowingCacheLayer(), DynamicLayer()

    def step(length):
        keys, values = (torch.randn(4, 2, length, 3, generator=generator) for _ in range(2))
        for ours, theirs in zip(growing.update(keys, values), dynamic.update(keys, values), strict=True):
            assert torch.equal(ours, theirs)

    step(5)
    for _ in range(20):  # past the first capacity (16), so the buffers grow
        step(1)
        beam_idx = torch.randint(0, 4, (4,), generator=generator)
        growing.reorder_cache(beam_idx)
        dynamic.reorder_cache(beam_idx)
    growing.crop(-3)
    dynamic.crop(-3)
    step(2)
    growing.batch_select_indices(torch.tensor([0, 2]))
    dynamic.batch_select_indices(torch.tensor([0, 2]))
    growing.reorder_cache(torch.tensor([1, 1]))
    dynamic.reorder_cache(torch.tensor([1, 1]))
    keys, values = (torch.randn(2, 2, 1, 3, generator=generator) for _ in range(2))
    for ours, theirs in zip(growing.update(keys, values), dynamic.update(keys, values), strict=True):
        assert torch.equal(ours, theirs)
    assert growing.get_seq_length() == dynamic.get_seq_length() == 25


@pytest.mark.parametrize("style", ["transformers", "gnmt"])
def test_gnmt_length_penalty_scores_hypotheses_by_wu_et_al_s_formula(model, style):
    """§6.1's penalty, ((5 + |Y|) / 6)^α, rides on transformers' private beam-search arithmetic (`length ** α` with
    an int length; `GnmtLengthPenalty`): this test fails when transformers applies the penalty another way."""
    alpha, batch = 0.6, padded_batch([7, 4, 6], max_length=7)
    model.generation_config.length_penalty_style = style  # the saved field; "transformers" is the default
    output = model.generate(**batch, num_beams=4, num_return_sequences=4, max_new_tokens=10, length_penalty=alpha,
                            return_dict_in_generate=True, output_scores=True)  # fmt: skip
    steps = model.compute_transition_scores(output.sequences, output.scores, output.beam_indices)
    lengths = (output.beam_indices >= 0).sum(dim=1).float()  # generated tokens, the end token included
    penalty = ((5 + lengths) / 6) ** alpha if style == "gnmt" else lengths**alpha
    assert torch.allclose(output.sequences_scores, steps.sum(dim=1) / penalty, atol=1e-5)
    ranked = output.sequences_scores.view(3, 4)
    assert (ranked[:, :-1] >= ranked[:, 1:]).all()  # each source's hypotheses come best first by that score
    other = "transformers" if style == "gnmt" else "gnmt"  # the argument overrides the config
    overridden = model.generate(**batch, num_beams=4, max_new_tokens=10, length_penalty=alpha, output_scores=True,
                                length_penalty_style=other, return_dict_in_generate=True)  # fmt: skip
    assert not torch.allclose(overridden.sequences_scores, output.sequences_scores.view(3, 4)[:, 0])
    with pytest.raises(ValueError, match="length_penalty_style 'wu': must be one of transformers, gnmt"):
        model.generate(**batch, num_beams=2, max_new_tokens=3, length_penalty_style="wu")
