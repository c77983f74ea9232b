"""Beam search over a self-attention cache it never reorders: `AncestralCacheLayer` and our C++ operation
`torch.ops.hf_attention.cached_attention`, which `optimize_for_inference` installs on a CPU. Every test compares
against the path that moves the cache (transformers' `DynamicLayer`, eager attention)."""

import pytest
import torch
from transformers.cache_utils import DynamicLayer

from hf_attention import HfAttentionForConditionalGeneration, optimize_for_inference
from hf_attention import generation_hf_attention as generation
from hf_attention.generation_hf_attention import AncestralCacheLayer, GrowingCacheLayer

from .helpers import padded_batch, require_cpu_kernel

B, H, DH = 6, 4, 8


def reference_attention(query, keys, values, ancestors, length, scaling):
    """What the operation computes, with torch: each row's positions gathered through `ancestors`, then softmax."""
    positions = torch.arange(length)
    gathered_keys = keys[positions, ancestors[:, :length]].float().transpose(1, 2)  # (B, H, L, Dh)
    gathered_values = values[positions, ancestors[:, :length]].float().transpose(1, 2)
    weights = torch.softmax(query.float()[:, :, None] @ gathered_keys.transpose(-1, -2) * scaling, dim=-1)
    return (weights @ gathered_values)[:, :, 0].to(query.dtype)


# 8 and 64 (Table 3's) take the vectorised kernels, 12 the one for any head size
@pytest.mark.parametrize("head_dim", [8, 64, 12])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_operation_attends_through_the_ancestors(dtype, head_dim):
    require_cpu_kernel("attention")
    generator = torch.Generator().manual_seed(0)
    capacity = 20
    keys, values = (torch.randn(capacity, B, H, head_dim, generator=generator).to(dtype) for _ in range(2))
    ancestors = torch.randint(0, B, (B, capacity), generator=generator)
    query = torch.randn(B, H, head_dim, generator=generator).to(dtype)
    for length in (1, 7, capacity):
        got = torch.ops.hf_attention.cached_attention(query, keys, values, ancestors, length, 0.3)
        expected = reference_attention(query, keys, values, ancestors, length, 0.3)
        assert got.dtype == dtype and got.shape == (B, H, head_dim)
        torch.testing.assert_close(got, expected, **({"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {}))


def test_the_operation_attends_from_a_sources_hypotheses_to_its_one_copy_under_the_padding_bias():
    """Cross-attention's use: keys in (sources, H, S, Dh) read through a permuted view, k queries per source, the
    source padding as an additive bias; against softmax attention over keys repeated per hypothesis."""
    require_cpu_kernel("attention")
    generator = torch.Generator().manual_seed(2)
    sources, per_source, length = 3, 2, 7
    keys, values = (torch.randn(sources, H, length, DH, generator=generator) for _ in range(2))
    query = torch.randn(sources * per_source, H, DH, generator=generator)
    bias = torch.zeros(sources, length)
    bias[1, 4:] = float("-inf")  # source 1 has 4 tokens
    rows = (torch.arange(sources * per_source) // per_source)[:, None].expand(-1, length)
    got = torch.ops.hf_attention.cached_attention(
        query, keys.permute(2, 0, 1, 3), values.permute(2, 0, 1, 3), rows, length, 0.4, bias
    )
    repeated_keys, repeated_values = (states.repeat_interleave(per_source, 0) for states in (keys, values))
    scores = (
        query[:, :, None] @ repeated_keys.transpose(-1, -2) * 0.4
        + bias.repeat_interleave(per_source, 0)[:, None, None]
    )
    expected = (torch.softmax(scores, dim=-1) @ repeated_values)[:, :, 0]
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("head_dim", [64, 12])
def test_a_row_attends_alike_in_any_batch_and_under_any_padding(head_dim):
    """A server's answers must not depend on the batch: a row's output is bit for bit the same alone, among other
    rows, and with its source padded further (masked positions weigh exactly 0)."""
    require_cpu_kernel("attention")
    generator = torch.Generator().manual_seed(3)
    length, padded = 11, 19
    keys, values = (torch.randn(padded, B, H, head_dim, generator=generator) * 4 for _ in range(2))
    query = torch.randn(B, H, head_dim, generator=generator) * 4
    rows = torch.arange(B)[:, None].expand(-1, padded).contiguous()
    bias = torch.zeros(B, padded)
    bias[:, length:] = float("-inf")
    operation = torch.ops.hf_attention.cached_attention
    batched = operation(query, keys, values, rows, length, 0.125)
    assert torch.equal(batched, operation(query, keys, values, rows, padded, 0.125, bias))
    additive = bias.clamp(min=torch.finfo(torch.float32).min)  # as transformers' additive masks have it
    assert torch.equal(batched, operation(query, keys, values, rows, padded, 0.125, additive))
    for row in range(B):
        alone = operation(query[row : row + 1], keys[:, row : row + 1], values[:, row : row + 1],
                          torch.zeros(1, padded, dtype=torch.long), length, 0.125)  # fmt: skip
        assert torch.equal(alone, batched[row : row + 1])
    bias[2, 3] = bias[4, length - 1] = float("-inf")  # masked positions before the last one attended
    scores = torch.einsum("bhd,jbhd->bhj", query, keys) * 0.125 + bias[:, None]
    expected = torch.einsum("bhj,jbhd->bhd", torch.softmax(scores, dim=-1), values)
    torch.testing.assert_close(operation(query, keys, values, rows, padded, 0.125, bias), expected)


def test_the_operation_names_what_is_wrong_with_its_operands():
    require_cpu_kernel("attention")
    keys, ancestors = torch.randn(5, B, H, DH), torch.zeros(B, 5, dtype=torch.long)
    with pytest.raises(RuntimeError, match="length 6 outside 1..5"):
        torch.ops.hf_attention.cached_attention(torch.randn(B, H, DH), keys, keys, ancestors, 6, 1.0)
    with pytest.raises(RuntimeError, match="do not match the query"):
        torch.ops.hf_attention.cached_attention(torch.randn(B, H + 1, DH), keys, keys, ancestors, 1, 1.0)
    with pytest.raises(RuntimeError, match=r"ancestors\[2, 0\] = 6 names no row of the keys \(0..5\)"):
        torch.ops.hf_attention.cached_attention(
            torch.randn(B, H, DH), keys, keys, ancestors.index_fill(0, torch.tensor([2]), 6), 1, 1.0
        )


@pytest.mark.parametrize("state_dtype", [None, torch.bfloat16])
def test_the_layer_holds_what_a_reordered_dynamic_layer_holds_and_attends_as_eager_attention(state_dtype):
    """Updates, beam reorders and one-step attention, side by side with transformers' `DynamicLayer` (which moves
    the cache) and softmax attention over its keys; the layer here uses the torch reference as its operation, so
    this holds without the C++ build too. Stored in bf16, it holds and attends over the keys and values rounded to
    bf16, and gives them back in float32."""
    generator = torch.Generator().manual_seed(1)
    layer, plain = AncestralCacheLayer(reference_attention, state_dtype), DynamicLayer()

    def stored(states):  # as the layer stores them
        return states if state_dtype is None else states.to(state_dtype).float()

    def states(steps):
        return [torch.randn(B, H, steps, DH, generator=generator) for _ in range(2)]

    prompt = states(3)
    assert [torch.equal(a, b) for a, b in zip(layer.update(*prompt), plain.update(*prompt), strict=True)] == [1, 1]
    for step in range(20):  # past the first buffer's 16 positions: the buffers grow
        beam_idx = torch.randint(0, B, (B,), generator=generator)
        layer.reorder_cache(beam_idx)
        plain.reorder_cache(beam_idx)
        query, (key, value) = torch.randn(B, H, 1, DH, generator=generator), states(1)
        output = layer.attend_step(query, key, value, 0.5)  # (B, 1, H, Dh)
        keys, values = (stored(states) for states in plain.update(key, value))
        expected = torch.softmax(query @ keys.transpose(-1, -2) * 0.5, dim=-1) @ values  # (B, H, 1, Dh)
        torch.testing.assert_close(output, expected.transpose(1, 2))
        assert layer.get_seq_length() == plain.get_seq_length() == 4 + step
    assert layer.keys.dtype == layer.values.dtype == torch.float32
    assert torch.equal(layer.keys, stored(plain.keys)) and torch.equal(layer.values, stored(plain.values))
    if state_dtype is not None:  # rounded: different values, not the same ones
        assert not torch.equal(layer.keys, plain.keys)

    layer.batch_select_indices(torch.tensor([4, 1]))  # assigned from outside: a plain DynamicLayer from now on
    plain.batch_select_indices(torch.tensor([4, 1]))
    more = [torch.randn(2, H, 1, DH, generator=generator) for _ in range(2)]
    assert layer.attend_step(torch.randn(2, H, 1, DH), *more, 0.5) is None  # declines: nothing stored
    held, expected = layer.update(*more)[0], plain.update(*more)[0]  # the earlier positions as stored
    assert torch.equal(held[:, :, :-1], stored(expected[:, :, :-1])) and torch.equal(held[:, :, -1], more[0][:, :, 0])
    assert layer.get_seq_length() == 24


@pytest.fixture
def model(tiny_config):
    torch.manual_seed(0)
    model = HfAttentionForConditionalGeneration(tiny_config).eval()
    model.generation_config.forced_eos_token_id = None
    return model


def steps_through_the_operation(monkeypatch, method: str = "attend_step") -> list[bool]:
    """Each decoder self-attention (`attend_step`) or cross-attention (`attend_source`) call of the cache layers:
    True where the operation attended."""
    calls = []
    attend = getattr(AncestralCacheLayer, method)

    def counted(self, *args):
        output = attend(self, *args)
        calls.append(output is not None)
        return output

    monkeypatch.setattr(AncestralCacheLayer, method, counted)
    return calls


@pytest.mark.parametrize("quantization", [None, "int8"])
@pytest.mark.parametrize(
    "options",
    [
        {"num_beams": 4},
        {"num_beams": 3, "num_return_sequences": 2, "length_penalty": 0.6},
        {"num_beams": 1},
        {"num_beams": 4, "decoder_input_ids": torch.tensor([[2, 7, 9]] * 3)},  # a target prefix: 3 steps at once
    ],
    ids=["beam4", "beam3-n2", "greedy", "beam4-prefix"],
)
def test_generate_decodes_the_same_tokens_and_scores_with_the_operation(model, quantization, options, monkeypatch):
    require_cpu_kernel("attention")
    optimize_for_inference(model, quantization, compile=False)
    assert model.decode_with_cached_attention  # installed on a CPU where the operation builds
    model.cached_attention_state_dtype = None  # the keys and values as computed (bf16 storage: the next test)
    batch = padded_batch([9, 5, 7], 9)
    arguments = dict(**batch, max_new_tokens=12, output_scores=True, return_dict_in_generate=True, **options)
    with torch.inference_mode():
        model.decode_with_cached_attention = False
        moved = model.generate(**arguments)
        model.decode_with_cached_attention = True
        calls = steps_through_the_operation(monkeypatch)
        source_calls = steps_through_the_operation(monkeypatch, "attend_source")
        kept = model.generate(**arguments)
    assert torch.equal(moved.sequences, kept.sequences)
    if options["num_beams"] > 1:
        torch.testing.assert_close(moved.sequences_scores, kept.sequences_scores)
    # the first step of each decoder layer fills the cache; every later one went through the operation
    layers = model.config.decoder_layers
    assert calls[:layers] == [False] * layers and len(calls) > 2 * layers and all(calls[layers:])
    # cross-attention too, once its keys and values are cached: from the first step on, as the padded batch's are
    # projected before it (`_project_source_without_padding`); a first step of 3 prefix tokens is not for it
    assert source_calls == ["decoder_input_ids" not in options] * layers + calls[layers:]


@pytest.mark.parametrize("options", [{"num_beams": 4}, {"num_beams": 1}], ids=["beam4", "greedy"])
def test_an_int8_model_stores_keys_and_values_in_bf16_and_decodes_as_with_float32_storage(model, options):
    """int8 models store the cache in bf16 (self- and cross-attention): the same tokens as stored in float32 here,
    scores within bf16's rounding; float32 models store float32."""
    require_cpu_kernel("attention")
    stored = []
    original = torch.ops.hf_attention.cached_attention

    def recorded(query, keys, values, *args):
        stored.append(keys.dtype)
        return original(query, keys, values, *args)

    optimize_for_inference(model, "int8", compile=False)
    assert model.cached_attention_state_dtype == torch.bfloat16
    model.cached_attention_state_dtype = None
    arguments = dict(**padded_batch([9, 5, 7], 9), max_new_tokens=12, output_scores=True, return_dict_in_generate=True,
                     **options)  # fmt: skip
    with torch.inference_mode():
        as_computed = model.generate(**arguments)
        model.cached_attention_state_dtype = torch.bfloat16
        generation_operation = model.cached_attention_operation
        model.cached_attention_operation = lambda *args: recorded
        rounded = model.generate(**arguments)
        model.cached_attention_operation = generation_operation
    assert stored and set(stored) == {torch.bfloat16}  # every step's self- and cross-attention read bf16
    assert torch.equal(as_computed.sequences, rounded.sequences)
    if options["num_beams"] > 1:  # (a step's scores of beam search are of beams that may change places)
        torch.testing.assert_close(as_computed.sequences_scores, rounded.sequences_scores, atol=0.05, rtol=0.0)
    else:
        for before, after in zip(as_computed.scores, rounded.scores, strict=True):
            torch.testing.assert_close(before, after, atol=0.05, rtol=0.0)
    assert not torch.equal(as_computed.scores[1], rounded.scores[1])  # rounded: not the float32 path renamed
    assert optimize_for_inference(HfAttentionForConditionalGeneration(model.config), None, compile=False)\
        .cached_attention_state_dtype is None  # fmt: skip


def test_calls_the_operation_cannot_serve_keep_the_growing_cache(model, monkeypatch):
    require_cpu_kernel("attention")
    optimize_for_inference(model, None, compile=False)
    model.set_attn_implementation("eager")  # whose attention weights generate(output_attentions=True) returns
    batch = padded_batch([9, 5, 7], 9)
    seen = []
    prepare = generation.HfAttentionGenerationMixin._prepare_cache_for_generation

    def recorded(self, generation_config, model_kwargs, *args):
        prepare(self, generation_config, model_kwargs, *args)
        seen.append({type(layer) for layer in model_kwargs["cache"].self_attention_cache.layers})

    monkeypatch.setattr(generation.HfAttentionGenerationMixin, "_prepare_cache_for_generation", recorded)
    prefix = torch.tensor([[2, 7, 9]] * 3)
    with torch.inference_mode():
        model.generate(**batch, num_beams=2, max_new_tokens=4)
        with_weights = model.generate(**batch, num_beams=2, max_new_tokens=4, output_attentions=True,
                                      return_dict_in_generate=True)  # fmt: skip
        model.generate(**batch, num_beams=2, max_new_tokens=4, decoder_input_ids=prefix,
                       decoder_attention_mask=torch.ones_like(prefix))  # fmt: skip
    assert seen == [{AncestralCacheLayer}, {GrowingCacheLayer}, {GrowingCacheLayer}]
    last_step_weights = with_weights.decoder_attentions[-1][0]  # (beams, H, 1, steps): every position attended
    assert last_step_weights.shape[-1] == len(with_weights.decoder_attentions)


def test_a_model_not_optimized_keeps_the_growing_cache(model):
    assert not model.decode_with_cached_attention  # the class default: a model as loaded never builds anything
