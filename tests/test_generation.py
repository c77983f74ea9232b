"""generate(): every standard strategy through transformers' GenerationMixin, with and without the KV cache."""

import pytest
import torch
from transformers.cache_utils import EncoderDecoderCache

from hf_attention import HfAttentionForConditionalGeneration

from .conftest import BOS, EOS, padded_batch

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
