"""optimize_for_inference: int8 and bf16 models that generate, pipeline, save and reload; a static cache compiled with
torch.compile(fullgraph=True) that generates the tokens of eager decoding."""

import copy
import functools
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from torch import nn
from torch._dynamo.utils import counters
from transformers import AutoModelForSeq2SeqLM, CompileConfig, StaticCache, pipeline

from hf_attention import HfAttentionConfig, HfAttentionForConditionalGeneration, hardware, optimize_for_inference
from hf_attention.generation_hf_attention import AncestralCacheLayer, GrowingCacheLayer
from hf_attention.inference import int8_vnni, quantization
from hf_attention.inference.int8_linear import (
    DEQUANTIZE_FROM_ROWS,
    INT8_KERNELS,
    Int8Linear,
    can_prepack_bf16,
    compiled_int8_kernel,
)
from hf_attention.inference.int8_vnni import int8_avx2_available, pack_weight
from hf_attention.inference.quantization import HfAttentionInt8Config, PrepackedLinear, compile_without_module_guards

from .helpers import padded_batch, require_cpu_kernel, require_module, toy_tokenizer, with_capabilities

SOURCES = ["we buy two dogs", "they sell ninety one trees", "i see five cats"]


def random_model(tiny_config, seed: int = 0) -> HfAttentionForConditionalGeneration:
    torch.manual_seed(seed)
    return HfAttentionForConditionalGeneration(tiny_config).eval()


def test_an_int8_layer_computes_the_product_with_its_dequantized_weights():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    quantized = Int8Linear.from_linear(linear)
    assert quantized.weight.dtype == torch.int8
    scale = quantized.weight_scale[:, None]
    assert ((quantized.dequantized_weight() - linear.weight).abs() <= scale / 2 + 1e-7).all()  # round to nearest
    inputs = torch.randn(5, 7, 64)
    expected = torch.nn.functional.linear(inputs, quantized.dequantized_weight(), linear.bias)
    with torch.no_grad():
        output = quantized(inputs)
    assert output.shape == (5, 7, 48)
    # what is left is the inputs' own 8-bit quantisation
    torch.testing.assert_close(output, expected, atol=0.05, rtol=0.05)
    assert not torch.allclose(output, linear(inputs).detach(), atol=1e-6)


@pytest.mark.parametrize("in_features", [64, 40])  # torch's int8 kernel is wrong unless 16 divides it
@pytest.mark.parametrize("rows", [3, DEQUANTIZE_FROM_ROWS + 5])
def test_a_weight_only_int8_layer_multiplies_bf16_inputs_by_its_dequantized_weights(rows, in_features):
    """Below DEQUANTIZE_FROM_ROWS rows through the int8 kernel, from there on through bf16 weights made for the call:
    the same product either way, to bf16's precision."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(in_features, 48)
    quantized = Int8Linear.from_linear(linear, kernel="weight_only")
    inputs = torch.randn(rows, in_features).to(torch.bfloat16)
    expected = torch.nn.functional.linear(inputs.float(), quantized.dequantized_weight(), linear.bias)
    with torch.no_grad():
        output = quantized(inputs)
    assert output.dtype == torch.bfloat16
    torch.testing.assert_close(output.float(), expected, atol=0.03, rtol=0.02)


@pytest.mark.skipif(not can_prepack_bf16(), reason="oneDNN has no bf16 products on this CPU")
def test_a_weight_only_int8_layer_multiplies_many_rows_by_a_packed_copy_rebuilt_when_the_weights_change():
    """Outside torch.compile, from DEQUANTIZE_FROM_ROWS rows on: the compiled graph's product (bf16 weights made for
    the call), by a copy that oneDNN packed once."""
    torch.manual_seed(0)
    quantized = Int8Linear.from_linear(torch.nn.Linear(64, 48), kernel="weight_only")
    inputs = torch.randn(DEQUANTIZE_FROM_ROWS + 5, 64).to(torch.bfloat16)

    def compiled_graphs_product():
        scale, bias = quantized.weight_scale.to(torch.bfloat16), quantized.bias.to(torch.bfloat16)
        return (inputs @ quantized.weight.to(torch.bfloat16).t()) * scale + bias

    with torch.no_grad():
        torch.testing.assert_close(quantized(inputs), compiled_graphs_product(), atol=0, rtol=0)
        packed = quantized._prepacked_bf16
        assert packed is not None
        quantized(inputs)
        assert quantized._prepacked_bf16 is packed
        quantized.weight.copy_(-quantized.weight)
        torch.testing.assert_close(quantized(inputs), compiled_graphs_product(), atol=0, rtol=0)
        assert quantized._prepacked_bf16 is not packed
        copied = copy.deepcopy(quantized)
        assert copied._prepacked_bf16 is None
        torch.testing.assert_close(copied(inputs), compiled_graphs_product(), atol=0, rtol=0)


def quantized_rows_product(rows: torch.Tensor, layer: Int8Linear) -> torch.Tensor:
    """The VNNI operation's product, in torch: each row rounded to int8 steps of max|row| / 127, exact integer
    products, then both scales (an all-zero row keeps scale 1)."""
    rows = rows.float()
    scale = rows.abs().amax(dim=1, keepdim=True) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    steps = torch.round(rows * (1 / scale)).clamp(-127, 127)
    products = (steps.double() @ layer.weight.double().t()).float()
    return products * scale * layer.weight_scale.float() + layer.bias.float()


def seeded_layer_and_rows(kernel: str, rows: int, outputs: int, inputs: int) -> tuple[Int8Linear, torch.Tensor]:
    """A seeded int8 layer with `kernel` and float32 input rows, the middle one all zeros (its scale is 1). dynamo
    forgets earlier compiles: each shape of these tests compiles `Int8Linear.forward` anew, past its recompile cap."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = Int8Linear.from_linear(torch.nn.Linear(inputs, outputs), kernel=kernel)
    hidden = torch.randn(rows, inputs)
    hidden[rows // 2] = 0
    return layer, hidden


# the operation each of our kernels multiplies with, for `require_cpu_kernel`
OWN_KERNEL_OPERATION = {"vnni": "vnni", "vnni_float32": "vnni", "avx2": "avx2"}


@pytest.fixture
def vnni_kernel():
    require_cpu_kernel("vnni")


needs_vnni = pytest.mark.usefixtures("vnni_kernel")


@needs_vnni
@pytest.mark.parametrize("shape", [(1, 10, 100), (3, 4, 64), (23, 37, 130)])  # rows, outputs, inputs: every tail
def test_a_vnni_int8_layer_quantizes_each_row_to_int8_and_multiplies_exactly(shape):
    rows, outputs, inputs = shape
    torch.manual_seed(0)
    layer = Int8Linear.from_linear(torch.nn.Linear(inputs, outputs), kernel="vnni")
    hidden = torch.randn(rows, inputs).to(torch.bfloat16)
    hidden[rows // 2] = 0
    expected = quantized_rows_product(hidden, layer)
    with torch.no_grad():
        assert torch.equal(layer(hidden.float()), expected)
        assert torch.equal(torch.compile(layer, fullgraph=True)(hidden.float()), expected)
        # the bias added by the operation itself, after the scales, as the reference adds it
        fused = torch.ops.hf_attention.int8_vnni_matmul(hidden, layer.weight_packed, layer.weight_scale,
                                                        layer.weight_sums, layer.bias)  # fmt: skip
        assert torch.equal(fused, expected)
        activated = torch.ops.hf_attention.int8_vnni_matmul(hidden, layer.weight_packed, layer.weight_scale,
                                                            layer.weight_sums, layer.bias, True)  # fmt: skip
        assert torch.equal(activated, torch.relu(expected)) and (expected < 0).any()  # then ReLU, in the same pass


@needs_vnni
def test_a_vnni_int8_layer_computes_as_weight_only_from_24_rows_and_where_the_operation_is_missing(monkeypatch):
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    vnni = Int8Linear.from_linear(linear, kernel="vnni")
    weight_only = Int8Linear.from_linear(linear, kernel="weight_only")
    many, few = torch.randn(DEQUANTIZE_FROM_ROWS, 64).to(torch.bfloat16), torch.randn(3, 64).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(vnni(many), weight_only(many))
        assert not torch.equal(vnni(few), weight_only(few))  # rows quantised to int8
        monkeypatch.setitem(int8_vnni._state, "built", False)
        assert torch.equal(vnni(few), weight_only(few))


@needs_vnni
def test_the_vnni_operation_refuses_scales_sums_and_sizes_it_cannot_use():
    layer = Int8Linear.from_linear(torch.nn.Linear(40, 6), kernel="vnni")
    rows = torch.randn(2, 40).to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="int8_vnni_matmul: weight_scale and weight_sums need one value per"):
        torch.ops.hf_attention.int8_vnni_matmul(rows, layer.weight_packed, layer.weight_scale[:3], layer.weight_sums)
    with pytest.raises(RuntimeError, match=r"packed_weight \[6, 40\] is not pack_weight's layout for 6 outputs of 40"):
        torch.ops.hf_attention.int8_vnni_matmul(rows, layer.weight, layer.weight_scale, layer.weight_sums)
    wide = torch.zeros(2, 1 << 16, dtype=torch.int8)
    with pytest.raises(
        RuntimeError, match=r"int8_vnni_matmul: K = 65536 could overflow the 32-bit sums \(at most 65535\)"
    ):
        torch.ops.hf_attention.int8_vnni_matmul(
            torch.zeros(1, 1 << 16, dtype=torch.bfloat16), pack_weight(wide), torch.ones(2), torch.zeros(2).int()
        )


@needs_vnni
def test_a_vnni_int8_layer_sums_its_weight_rows_again_when_they_load():
    torch.manual_seed(0)
    layer = Int8Linear.from_linear(torch.nn.Linear(64, 48), kernel="vnni")
    other = Int8Linear.from_linear(torch.nn.Linear(64, 48), kernel="vnni")
    assert "weight_sums" not in layer.state_dict()  # derived, not saved
    layer.load_state_dict(other.state_dict())
    assert torch.equal(layer.weight_sums, other.weight.sum(dim=1, dtype=torch.int32))
    hidden = torch.randn(2, 64).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(layer(hidden), quantized_rows_product(hidden, other).to(torch.bfloat16))


@needs_vnni
@pytest.mark.parametrize("shape", [(1, 10, 100), (3, 4, 64), (23, 37, 130), (5, 40, 33)])  # rows, outputs, inputs
def test_a_vnni_float32_int8_layer_quantizes_each_float32_row_to_int8_and_multiplies_exactly(shape):
    layer, hidden = seeded_layer_and_rows("vnni_float32", *shape)  # every tail of 16 outputs and 4 inputs
    expected = quantized_rows_product(hidden, layer)
    with torch.no_grad():
        assert torch.equal(layer(hidden), expected)
        assert torch.equal(torch.compile(layer, fullgraph=True)(hidden), expected)
        hidden[0, 1] = float("nan")
        output = layer(hidden)
    assert output[0].isnan().all() and torch.isfinite(output[1:]).all()


@needs_vnni
def test_a_vnni_float32_layer_multiplies_many_rows_with_fbgemm_and_without_vnni_with_the_avx2_operation(monkeypatch):
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    layer = Int8Linear.from_linear(linear, kernel="vnni_float32")
    dynamic = Int8Linear.from_linear(linear, kernel="dynamic")
    many, few = torch.randn(DEQUANTIZE_FROM_ROWS, 64), torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(layer(many), dynamic(many))  # eager: the encoder's rows go to fbgemm
        with_capabilities(monkeypatch, "avx2")  # a model saved on a VNNI CPU, loaded on one without
        assert torch.equal(layer(few), seven_bit_rows_product(few, layer))


def test_the_int8_operations_are_unavailable_without_the_cpu_flags_or_a_build(monkeypatch):
    from torch.utils import cpp_extension

    built = []
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: built.append(kwargs) or None)
    monkeypatch.delitem(int8_vnni._state, "built", raising=False)
    with_capabilities(monkeypatch, "avx2-vnni")
    assert not int8_vnni.int8_vnni_available() and built == []  # no AVX512-VNNI: nothing is built
    with_capabilities(monkeypatch, "arm-dotprod")
    assert not int8_avx2_available() and built == []  # not x86: nothing is built

    path = os.environ.get("PATH", "")
    paths_seen = []

    def no_compiler(**kwargs):
        paths_seen.append(os.environ["PATH"])
        raise RuntimeError("Error building extension 'hf_attention_int8_vnni'\nc++: not found")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    vnni_machine = with_capabilities(monkeypatch, "avx512-vnni")
    monkeypatch.setattr(hardware, "detect", lambda: vnni_machine)  # as on a CPU with the instructions: the build fails
    with pytest.warns(
        UserWarning,
        match=r"int8 kernels \(VNNI, AVX2\) did not build \(Error building extension 'hf_attention_int8_vnni'\)",
    ):
        assert not int8_vnni.int8_vnni_available()
    assert not int8_avx2_available()  # one build holds both operations
    ninja = require_module("ninja")  # torch's builder runs ninja by name: the pip package's comes first
    assert paths_seen == [os.pathsep.join(filter(None, [ninja.BIN_DIR, path]))] and os.environ["PATH"] == path
    model = optimize_for_inference(HfAttentionForConditionalGeneration(HfAttentionConfig.from_preset("tiny")), "int8",
                                   compile=True)  # fmt: skip
    assert model.lm_head.kernel == "weight_only"


@pytest.mark.parametrize("rows", [3, DEQUANTIZE_FROM_ROWS + 5])
@pytest.mark.parametrize("kernel", INT8_KERNELS)
def test_concatenated_int8_layers_give_the_layers_outputs_side_by_side_and_save_nothing(kernel, rows):
    if kernel in ("vnni", "vnni_float32"):
        require_cpu_kernel("vnni")
    torch.manual_seed(0)
    layers = [Int8Linear.from_linear(nn.Linear(40, size), kernel=kernel) for size in (40, 40, 24)]
    fused = Int8Linear.concatenated(layers)
    inputs = torch.randn(rows, 40)
    assert torch.equal(fused(inputs), torch.cat([layer(inputs) for layer in layers], dim=-1))
    assert fused.state_dict() == {}
    layers[1].load_state_dict(Int8Linear.from_linear(nn.Linear(40, 40), kernel=kernel).state_dict())
    assert not torch.equal(fused(inputs)[:, 40:80], layers[1](inputs))
    fused.refresh_from(layers)
    assert torch.equal(fused(inputs), torch.cat([layer(inputs) for layer in layers], dim=-1))


@pytest.mark.parametrize("rows", [3, DEQUANTIZE_FROM_ROWS + 5])
@pytest.mark.parametrize("kernel", INT8_KERNELS)
def test_an_int8_layer_whose_weights_change_in_place_computes_with_the_new_ones(kernel, rows):
    if kernel in OWN_KERNEL_OPERATION:
        require_cpu_kernel(OWN_KERNEL_OPERATION[kernel])
    torch.manual_seed(0)
    layer, other = (Int8Linear.from_linear(nn.Linear(48, 32), kernel=kernel) for _ in range(2))
    inputs = torch.randn(rows, 48)
    with torch.no_grad():
        layer(inputs)  # its derived tensors (row sums, packed weights) taken
        for name in ("weight", "weight_scale", "bias"):
            getattr(layer, name).copy_(getattr(other, name))  # in place: the same tensors, new values
        assert torch.equal(layer(inputs), other(inputs))


@pytest.mark.parametrize("compile", [False, True])
def test_int8_self_attention_projects_q_k_and_v_in_one_product_with_the_results_of_three(tiny_config, compile):
    model = optimize_for_inference(random_model(tiny_config), "int8", compile=compile)
    fused = [module for module in model.modules() if getattr(module, "qkv_proj", None) is not None]
    assert fused == [layer.self_attn for layer in (*model.model.encoder.layers, *model.model.decoder.layers)]
    assert not any("qkv_proj" in name for name in model.state_dict())
    batch = padded_batch([7, 4, 6], max_length=7)
    options = {"max_new_tokens": 8, "disable_compile": True, "output_scores": True, "return_dict_in_generate": True}
    with_one_product = model.generate(**batch, **options)
    for module in fused:
        module.qkv_proj = None
    with_three = model.generate(**batch, **options)
    assert torch.equal(with_one_product.sequences, with_three.sequences)
    for ours, reference in zip(with_one_product.scores, with_three.scores, strict=True):
        assert torch.equal(ours, reference)


def test_loading_weights_into_an_int8_model_refreshes_its_fused_projections(tiny_config):
    model = optimize_for_inference(random_model(tiny_config), "int8")
    other = optimize_for_inference(random_model(tiny_config, seed=1), "int8")
    batch = padded_batch([7, 4, 6], max_length=7)
    expected = other.generate(**batch, max_new_tokens=8)
    assert not torch.equal(model.generate(**batch, max_new_tokens=8), expected)
    model.load_state_dict(other.state_dict())
    assert torch.equal(model.generate(**batch, max_new_tokens=8), expected)


def test_int8_model_generates_and_saves_int8_weights_that_reload_to_the_same_tokens(tiny_config, tmp_path):
    model = random_model(tiny_config)
    batch = padded_batch([7, 4, 6], max_length=7)
    with torch.no_grad():
        reference = model(**batch, decoder_input_ids=batch["input_ids"]).logits
    optimize_for_inference(model, "int8")
    assert all(type(module) is not torch.nn.Linear for module in model.modules())
    with torch.no_grad():
        logits = model(**batch, decoder_input_ids=batch["input_ids"]).logits
    assert (logits - reference).abs().max() < 0.05 * reference.abs().max()
    generated = model.generate(**batch, num_beams=4, max_new_tokens=8)

    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    # eagerly, fbgemm's product, or our VNNI operation for few rows on AVX512-VNNI CPUs without bf16
    kernel = "vnni_float32" if compiled_int8_kernel() == "vnni_float32" else "dynamic"
    assert config["quantization_config"] == {"quant_method": "hf_attention_int8", "kernel": kernel}
    with safe_open(tmp_path / "model.safetensors", "pt") as weights:
        assert weights.get_tensor("model.encoder.layers.0.self_attn.q_proj.weight").dtype == torch.int8
        assert weights.get_tensor("lm_head.weight").dtype == torch.int8
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path)
    assert isinstance(reloaded.lm_head, Int8Linear)
    with torch.no_grad():
        assert torch.equal(reloaded(**batch, decoder_input_ids=batch["input_ids"]).logits, logits)
    assert torch.equal(reloaded.generate(**batch, num_beams=4, max_new_tokens=8), generated)


@pytest.mark.parametrize("quantization", ["int8", "bf16"])
def test_the_translation_pipeline_runs_an_optimized_model_as_generate_does(quantization):
    tokenizer = toy_tokenizer()
    config = HfAttentionConfig.from_preset("tiny", vocab_size=len(tokenizer))
    model = optimize_for_inference(random_model(config), quantization)
    translator = pipeline("translation", model=model, tokenizer=tokenizer, device="cpu")
    outputs = [item["translation_text"] for item in translator(SOURCES, num_beams=2, max_new_tokens=6)]
    expected = []
    for source in SOURCES:
        encoded = tokenizer([source], return_tensors="pt")
        generated = model.generate(**encoded, num_beams=2, max_new_tokens=6)
        expected.append(tokenizer.decode(generated[0], skip_special_tokens=True))
    assert outputs == expected


def test_bf16_model_holds_bf16_weights_and_stays_close_to_fp32(tiny_config):
    model = random_model(tiny_config)
    batch = padded_batch([7, 4, 6], max_length=7)
    with torch.no_grad():
        reference = model(**batch, decoder_input_ids=batch["input_ids"]).logits
        optimize_for_inference(model, "bf16")
        logits = model(**batch, decoder_input_ids=batch["input_ids"]).logits
    assert {parameter.dtype for parameter in model.parameters()} == {torch.bfloat16}
    torch.testing.assert_close(logits.float(), reference, atol=0.1, rtol=0.05)
    assert model.generate(**batch, max_new_tokens=5).shape == (3, 6)


@pytest.mark.skipif(not can_prepack_bf16(), reason="oneDNN has no bf16 kernels for this CPU")
def test_bf16_on_a_cpu_multiplies_by_prepacked_weights_with_the_results_of_nn_linear(tiny_config, tmp_path):
    model = random_model(tiny_config)
    plain = random_model(tiny_config).to(torch.bfloat16)
    optimize_for_inference(model, "bf16")
    layers = [module for module in model.modules() if isinstance(module, nn.Linear)]
    assert layers and all(type(layer) is PrepackedLinear for layer in layers)
    assert model.lm_head.weight is model.model.shared.weight  # the tie is kept
    batch = padded_batch([7, 4, 6], max_length=7)
    with torch.inference_mode():
        assert torch.equal(model(**batch, decoder_input_ids=batch["input_ids"]).logits,
                           plain(**batch, decoder_input_ids=batch["input_ids"]).logits)  # fmt: skip
        assert model.lm_head._packed is not None
        assert torch.equal(model.generate(**batch, num_beams=3), plain.generate(**batch, num_beams=3))
        copy.deepcopy(model)  # the packed copy (opaque to pickling) is left out and rebuilt on use
        rows = torch.randn(5, tiny_config.d_model, dtype=torch.bfloat16)
        layer = model.model.decoder.layers[0].fc1
        with torch.no_grad():
            layer.weight.mul_(2)  # a changed weight is packed again
        assert torch.equal(layer(rows), nn.functional.linear(rows, layer.weight, layer.bias))
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path)
    assert type(reloaded.lm_head) is nn.Linear and torch.equal(reloaded.lm_head.weight, model.lm_head.weight)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_a_static_cache_compiled_with_fullgraph_generates_the_eager_tokens(tiny_config, num_beams):
    model = random_model(tiny_config)
    batch = padded_batch([7, 4, 6], max_length=7)
    eager = model.generate(**batch, num_beams=num_beams, max_new_tokens=8)
    static_eager = model.generate(**batch, num_beams=num_beams, max_new_tokens=8, cache_implementation="static")
    assert torch.equal(static_eager, eager)
    torch._dynamo.reset()
    counters.clear()
    optimize_for_inference(model, None, compile=True)
    compiled = model.generate(**batch, num_beams=num_beams, max_new_tokens=8, return_dict_in_generate=True)
    self_attention_cache = compiled.past_key_values.self_attention_cache
    if num_beams == 1:  # transformers compiles the step of greedy search and sampling, not of beam search
        assert counters["stats"]["unique_graphs"] > 0 and isinstance(self_attention_cache, StaticCache)
    else:  # which runs faster eagerly, with the growing cache (or, where our operation builds, the ancestral one)
        growing = AncestralCacheLayer if int8_vnni.cached_attention_available() else GrowingCacheLayer
        assert {type(layer) for layer in self_attention_cache.layers} == {growing}
    assert torch.equal(compiled.sequences, eager)
    assert model.generation_config.cache_implementation is None  # each call asks for the static cache


def test_a_compiled_model_saves_a_generation_config_a_reloaded_model_decodes_with(tiny_config, tmp_path):
    """The compiled steps are this process's: saved, the generation config asks for no static cache, so the reloaded
    model runs beam search on the growing cache and greedy search eagerly, with the tokens of the unoptimized model."""
    model = random_model(tiny_config)
    batch = padded_batch([7, 4, 6], max_length=7)
    expected = {beams: model.generate(**batch, num_beams=beams, max_new_tokens=8) for beams in (1, 3)}
    optimize_for_inference(model, None, compile=True).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "generation_config.json").read_text())
    assert "cache_implementation" not in saved and "compile_config" not in saved
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval()
    for beams, tokens in expected.items():
        output = reloaded.generate(**batch, num_beams=beams, max_new_tokens=8, return_dict_in_generate=True)
        assert torch.equal(output.sequences, tokens)
        layers = output.past_key_values.self_attention_cache.layers
        assert {type(layer) for layer in layers} == {GrowingCacheLayer}


def test_a_compiled_step_on_a_cpu_skips_the_module_guards_and_still_recompiles_for_new_inputs(
    tiny_config, tmp_path, monkeypatch
):
    """Dynamo's guards on the model's modules are left out on a CPU; those on the inputs stay: a batch of another
    size or length compiles its own step, and every batch generates its eager tokens."""
    model = random_model(tiny_config)
    batches = [padded_batch([7, 4, 6], max_length=7), padded_batch([5, 3], max_length=5)]
    eager = [model.generate(**batch, max_new_tokens=8) for batch in batches]
    torch._dynamo.reset()
    counters.clear()
    kept = []
    module_guard_filter = torch.compiler.skip_guard_on_all_nn_modules_unsafe

    def spy(entries):
        kept.append(module_guard_filter(entries))
        return kept[-1]

    monkeypatch.setattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe", spy)
    optimize_for_inference(model, None, compile=True)
    compiled_call = model._compiled_call
    compiled = [model.generate(**batch, max_new_tokens=8) for batch in batches]
    assert model._compiled_call is compiled_call  # transformers decoded with it
    model.save_pretrained(tmp_path)  # the generation config holds nothing that JSON cannot write
    assert counters["stats"]["unique_graphs"] >= 2
    assert len(kept) == counters["stats"]["unique_graphs"] and all(sum(k) < len(k) / 2 for k in kept)
    for ours, reference in zip(compiled, eager, strict=True):
        assert torch.equal(ours, reference)
    assert torch.equal(model.generate(**batches[0], max_new_tokens=8), eager[0])


@pytest.mark.parametrize("mode", [None, "reduce-overhead", "max-autotune-no-cudagraphs"])
def test_compile_without_module_guards_takes_the_modes_options_with_the_guard_filter(mode, monkeypatch):
    compiled_with = {}
    monkeypatch.setattr(torch, "compile", lambda function, **kwargs: compiled_with.update(kwargs) or function)
    compile_without_module_guards(print, CompileConfig(mode=mode, options={"cpp_wrapper": True}))
    assert "mode" not in compiled_with and compiled_with["fullgraph"] is False
    expected = {**(torch._inductor.list_mode_options(mode) if mode else {}), "cpp_wrapper": True}
    expected["guard_filter_fn"] = torch.compiler.skip_guard_on_all_nn_modules_unsafe
    assert compiled_with["options"] == expected


# The compiled int8 kernel each CPU gets: (kernel, the faked CPU's flags, parameters' dtype); the operations run only
# where this CPU has the instructions as well
COMPILED_KERNELS = [
    ("vnni", {"avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16"}, torch.bfloat16),  # Zen 4/5
    ("vnni_float32", {"avx2", "fma", "avx512f", "avx512bw", "avx512_vnni"}, torch.float32),  # Cascade/Ice Lake
    ("avx2", {"avx2", "fma", "avx512f", "avx512bw"}, torch.float32),  # no VNNI, bf16 emulated: float32 throughout
    ("weight_only", {"avx2", "fma", "avx512f", "avx512bw", "avx512_bf16"}, torch.bfloat16),  # native bf16, no VNNI
]


@pytest.mark.parametrize("kernel, flags, dtype", COMPILED_KERNELS, ids=[kernel for kernel, _, _ in COMPILED_KERNELS])
def test_compiled_int8_uses_the_machines_kernel_and_generates_its_eager_tokens(
    tiny_config, tmp_path, kernel, flags, dtype, monkeypatch
):
    """fbgemm's packed weights cannot be compiled: with compile, decoding steps' activations are quantised to int8 by
    our operations (VNNI; AVX2 where bf16 would be emulated), or multiply the int8 weights in bf16."""
    if kernel in OWN_KERNEL_OPERATION:
        require_cpu_kernel(OWN_KERNEL_OPERATION[kernel])
    if flags is not None:
        monkeypatch.setattr(hardware, "_installed", [hardware.Capabilities("x86_64", "faked", frozenset(flags))])
    batch = padded_batch([7, 4, 6], max_length=7)
    torch._dynamo.reset()
    counters.clear()
    model = optimize_for_inference(random_model(tiny_config), "int8", compile=True)
    assert {module.kernel for module in model.modules() if isinstance(module, Int8Linear)} == {kernel}
    assert {parameter.dtype for parameter in model.parameters()} == {dtype}
    eager = model.generate(**batch, max_new_tokens=8, disable_compile=True)
    assert counters["stats"]["unique_graphs"] == 0
    assert torch.equal(model.generate(**batch, max_new_tokens=8), eager)
    assert counters["stats"]["unique_graphs"] > 0
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["kernel"] == kernel
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path)
    assert reloaded.lm_head.kernel == kernel
    assert all(layer.self_attn.qkv_proj is not None for layer in reloaded.model.decoder.layers)
    # torch's int8 kernel crashes on weights that are not 64-byte aligned, as the loader's views of the file are
    assert all(module.weight.data_ptr() % 64 == 0 for module in reloaded.modules() if isinstance(module, Int8Linear))
    assert torch.equal(reloaded.generate(**batch, max_new_tokens=8, disable_compile=True), eager)


def seven_bit_rows_product(rows: torch.Tensor, layer: Int8Linear) -> torch.Tensor:
    """The AVX2 operation's product, in torch: each float32 row rounded to steps of max|row| / 63 (7 bits, so that
    vpmaddubsw's 16-bit pair sums cannot saturate), exact integer products, then both scales."""
    scale = rows.abs().amax(dim=1, keepdim=True) / 63
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    steps = torch.round(rows * (1 / scale)).clamp(-63, 63)
    products = (steps.double() @ layer.weight.double().t()).float()
    return products * scale * layer.weight_scale.float() + layer.bias.float()


@pytest.fixture
def avx2_kernel():
    require_cpu_kernel("avx2")


needs_avx2_operation = pytest.mark.usefixtures("avx2_kernel")


@needs_avx2_operation
@pytest.mark.parametrize("shape", [(1, 10, 100), (3, 4, 64), (23, 37, 130), (2, 5, 32), (64, 9, 33)])
def test_an_avx2_int8_layer_quantizes_each_row_to_7_bits_and_multiplies_exactly(shape):
    rows, outputs, inputs = shape  # every tail of 32 inputs, odd and even row counts
    layer, hidden = seeded_layer_and_rows("avx2", rows, outputs, inputs)
    expected = seven_bit_rows_product(hidden, layer)
    with torch.no_grad():
        product = torch.ops.hf_attention.int8_avx2_matmul(hidden, layer.weight_packed, layer.weight_scale,
                                                          layer.weight_sums)  # fmt: skip
        assert torch.equal(product + layer.bias, expected)
        fused = torch.ops.hf_attention.int8_avx2_matmul(hidden, layer.weight_packed, layer.weight_scale,
                                                        layer.weight_sums, layer.bias)  # fmt: skip
        assert torch.equal(fused, expected)  # the bias added by the operation, after the scales
        activated = torch.ops.hf_attention.int8_avx2_matmul(hidden, layer.weight_packed, layer.weight_scale,
                                                            layer.weight_sums, layer.bias, True)  # fmt: skip
        assert torch.equal(activated, torch.relu(expected)) and (expected < 0).any()  # then ReLU, in the same pass
        if rows < DEQUANTIZE_FROM_ROWS:  # eager decoding steps and compiled ones both use the operation
            assert torch.equal(layer(hidden), expected)
            assert torch.equal(torch.compile(layer, fullgraph=True)(hidden), expected)
        else:  # eager calls with many rows (the encoder) go to fbgemm, as the "dynamic" kernel
            dynamic = Int8Linear.from_linear(torch.nn.Linear(inputs, outputs), kernel="dynamic")
            dynamic.load_state_dict(layer.state_dict())
            assert torch.equal(layer(hidden), dynamic(hidden))


@needs_avx2_operation
def test_the_avx2_operation_gives_nan_for_a_row_with_nan_and_refuses_sizes_it_cannot_sum():
    torch.manual_seed(0)
    layer = Int8Linear.from_linear(torch.nn.Linear(40, 6), kernel="avx2")
    hidden = torch.randn(3, 40)
    hidden[1, 7] = float("nan")
    hidden[2, 0] = float("inf")
    with torch.no_grad():
        output = torch.ops.hf_attention.int8_avx2_matmul(hidden, layer.weight_packed, layer.weight_scale,
                                                         layer.weight_sums)  # fmt: skip
    assert torch.isfinite(output[0]).all() and output[1:].isnan().all()
    with torch.no_grad():  # ReLU keeps NaN NaN, as torch.relu does
        activated = torch.ops.hf_attention.int8_avx2_matmul(hidden, layer.weight_packed, layer.weight_scale,
                                                            layer.weight_sums, None, True)  # fmt: skip
    assert activated[1:].isnan().all() and torch.equal(activated[0], torch.relu(output[0]))
    with pytest.raises(RuntimeError, match="weight_scale and weight_sums need one value per output"):
        torch.ops.hf_attention.int8_avx2_matmul(hidden, layer.weight_packed, layer.weight_scale[:3], layer.weight_sums)
    with pytest.raises(RuntimeError, match=r"int8_avx2_matmul: bias must be float32 with one value per output \(6\)"):
        torch.ops.hf_attention.int8_avx2_matmul(hidden, layer.weight_packed, layer.weight_scale, layer.weight_sums,
                                                layer.bias[:5])  # fmt: skip
    wide = torch.zeros(2, 1 << 17, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="could overflow the 32-bit sums"):
        torch.ops.hf_attention.int8_avx2_matmul(torch.zeros(1, 1 << 17), pack_weight(wide), torch.ones(2),
                                                torch.zeros(2).int())  # fmt: skip


def test_bad_options_are_refused_in_one_line(tiny_config, tmp_path):
    model = random_model(tiny_config)
    with pytest.raises(ValueError, match=r"quantization='int4': must be one of 'auto', None, 'int8', 'bf16'"):
        optimize_for_inference(model, "int4")
    assert all(type(module) is not Int8Linear for module in model.modules())  # nothing changed
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="only loads models saved in int8; load the fp32 model"):
        AutoModelForSeq2SeqLM.from_pretrained(tmp_path, quantization_config=HfAttentionInt8Config())


@pytest.mark.parametrize("kernel", INT8_KERNELS)
def test_int8_scales_and_biases_stay_float32_when_the_model_turns_bf16(kernel, tiny_config, tmp_path):
    """Issue 24's item 11: `model.to(torch.bfloat16)` rounded the per-row scales (a gain error up to 0.4%)."""
    if kernel == "vnni":
        require_cpu_kernel(kernel)
    torch.manual_seed(0)
    layer = Int8Linear.from_linear(nn.Linear(64, 48), kernel=kernel)
    scale, bias = layer.weight_scale.clone(), layer.bias.clone()
    layer.to(torch.bfloat16)
    assert layer.weight_scale.dtype == layer.bias.dtype == torch.float32 and layer.weight.dtype == torch.int8
    assert torch.equal(layer.weight_scale, scale) and torch.equal(layer.bias, bias)
    model = optimize_for_inference(random_model(tiny_config), "int8", compile=True)  # turns the model bf16 or not
    scales = {module.weight_scale.dtype for module in model.modules() if isinstance(module, Int8Linear)}
    assert scales == {torch.float32}
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as weights:
        assert weights.get_tensor("lm_head.weight_scale").dtype == torch.float32


def test_the_int8_quantizer_tells_transformers_it_cannot_be_trained(tiny_config, monkeypatch):
    """Issue 24's item 14: as a method, `is_trainable` was a bound method, which transformers' guard read as true."""
    from transformers import trainer_utils

    model = optimize_for_inference(random_model(tiny_config), "int8")
    assert model.hf_quantizer.is_trainable is False
    monkeypatch.setattr(trainer_utils, "_is_peft_model", lambda model: True)  # past the adapters check
    with pytest.raises(ValueError, match="hf_attention_int8 but that quantization method do not support training"):
        trainer_utils.validate_quantization_for_training(model)


@pytest.mark.parametrize("kernel", ["dynamic", "batch_invariant"])
def test_batch_invariant_int8_gives_each_row_the_output_it_gets_alone(tiny_config, kernel):
    """fbgemm quantises a whole batch's activations with one scale, so a loud row changes its neighbours' outputs;
    `batch_invariant=True` quantises each row with its own: a sentence decodes the same in any company."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    rows = torch.randn(DEQUANTIZE_FROM_ROWS + 16, 64)
    rows[0] *= 50  # one row of much larger activations
    layer = Int8Linear.from_linear(linear, kernel="dynamic" if kernel == "dynamic" else compiled_int8_kernel())
    if kernel == "batch_invariant":
        layer.rows_for_own_kernel = sys.maxsize
    together = layer(rows)
    alone = torch.cat([layer(rows[index : index + 1]) for index in range(1, len(rows))])
    assert torch.equal(together[1:], alone) == (kernel == "batch_invariant")
    if kernel == "dynamic":
        return
    model = optimize_for_inference(random_model(tiny_config), "int8", compile=False, batch_invariant=True)
    assert all(m.rows_for_own_kernel == sys.maxsize for m in model.modules() if isinstance(m, Int8Linear))
    batch = padded_batch([7, 4, 6], max_length=7)
    together = model.generate(**batch, max_new_tokens=8, num_beams=2, output_scores=True, return_dict_in_generate=True)
    for row in range(3):
        length = int(batch["attention_mask"][row].sum())
        single = {"input_ids": batch["input_ids"][row : row + 1, :length],
                  "attention_mask": batch["attention_mask"][row : row + 1, :length]}  # fmt: skip
        alone = model.generate(**single, max_new_tokens=8, num_beams=2, output_scores=True,
                               return_dict_in_generate=True)  # fmt: skip
        generated = alone.sequences[0]
        assert torch.equal(together.sequences[row, : len(generated)], generated)
        assert together.sequences_scores[row].item() == pytest.approx(alone.sequences_scores[0].item(), abs=1e-5)


@pytest.mark.skipif(int8_vnni.fcntl is None, reason="no flock on this system")
def test_a_build_killed_midway_leaves_no_lock_that_hangs_later_uses(tmp_path):
    """torch's builder waits forever on the `lock` file a killed build leaves; ours clears it under an flock."""
    require_cpu_kernel("avx2")
    folder = int8_vnni.build_directory()
    (folder / "lock").write_text("")  # torch's FileBaton, as a build killed midway leaves it
    check = "from hf_attention.inference.int8_vnni import int8_avx2_available as a; print(a())"
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=300)
    assert result.stdout.strip() == "True", result.stderr[-2000:]
    assert not (folder / "lock").exists()


@pytest.mark.skipif(int8_vnni.fcntl is None, reason="no flock on this system")
def test_a_build_held_by_another_process_is_waited_for_and_then_given_up(tmp_path):
    import fcntl

    with open(tmp_path / "hf_attention.flock", "w") as holder:  # another build in progress
        fcntl.flock(holder, fcntl.LOCK_EX)
        with int8_vnni.exclusive_build(tmp_path, wait_seconds=0.3) as building:
            assert building is False
    (tmp_path / "lock").write_text("")
    with int8_vnni.exclusive_build(tmp_path, wait_seconds=0.3) as building:  # released: ours, stale lock removed
        assert building is True and not (tmp_path / "lock").exists()


@pytest.mark.parametrize("kernel", INT8_KERNELS)
def test_an_int8_feed_forward_network_applies_its_relu_in_fc1_and_computes_as_before(kernel, tiny_config):
    """`optimize_for_inference(quantization="int8")` gives each fc1 the ReLU (`fused_relu`) and the layer an identity
    activation: every kernel's fc1 then returns ReLU of its own product, and the model's logits are unchanged."""
    if kernel in OWN_KERNEL_OPERATION:
        require_cpu_kernel(OWN_KERNEL_OPERATION[kernel])
    torch.manual_seed(0)
    model = HfAttentionForConditionalGeneration(tiny_config).eval()
    batch = padded_batch([9, 5, 7], 9)
    with torch.no_grad():
        quantization.replace_linear_layers(model, functools.partial(Int8Linear.from_linear, kernel=kernel))
        if kernel in ("weight_only", "vnni"):
            model.to(torch.bfloat16)
        layer = model.model.encoder.layers[0]
        hidden = torch.randn(2, 4, tiny_config.d_model, dtype=model.dtype)
        unfused_fc1, unfused = layer.fc1(hidden), model(**batch, decoder_input_ids=batch["input_ids"]).logits
        quantization.fuse_feed_forward_activation(model)
        assert layer.fc1.fused_relu and isinstance(layer.activation_fn, torch.nn.Identity)
        assert (unfused_fc1 < 0).any() and torch.equal(layer.fc1(hidden), torch.relu(unfused_fc1))
        torch.testing.assert_close(model(**batch, decoder_input_ids=batch["input_ids"]).logits, unfused, atol=0,
                                   rtol=0)  # fmt: skip
